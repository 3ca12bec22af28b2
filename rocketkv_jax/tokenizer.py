"""Hugging Face `tokenizers` wrapper with the chat template (no torch, no transformers)."""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from .user_text import check_utf8


class TokenizerError(ValueError):
    """A checkpoint directory whose tokenizer files are missing or unusable."""


class Tokenizer:
    """Encode/decode text and render chat prompts from a checkpoint's tokenizer files.

    Reads `tokenizer.json` and, when present, `tokenizer_config.json` (chat_template,
    bos/eos tokens) from `directory`.
    """

    def __init__(self, directory: str | Path):
        if not isinstance(directory, str | os.PathLike):
            raise TokenizerError(f"directory must be a path (str or Path), got "
                                 f"{type(directory).__name__}")
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {directory}: convert the model with rocketkv-convert, "
                "which copies the tokenizer next to the checkpoint"
            )
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a truncated file
            raise TokenizerError(
                f"{path} is damaged or not a tokenizer file ({e}); convert the model "
                f"again, which writes it next to the checkpoint"
            ) from None
        cfg_path = directory / "tokenizer_config.json"
        try:
            self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{cfg_path} is damaged (not valid json: {e}); convert "
                                 f"the model again") from None
        if not isinstance(self.config, dict):
            raise TokenizerError(f"{cfg_path} is damaged (not a json object); convert the "
                                 f"model again")
        self.chat_template: str | None = self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, which must be valid Unicode (TokenizerError otherwise)."""
        check_utf8(text, "the text to encode", TokenizerError)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
                raise TokenizerError(f"decode takes token ids (integers >= 0), got {i!r}")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` ([{"role", "content"}]) with the model's Jinja chat template."""
        if not self.chat_template:
            raise TokenizerError("this model's tokenizer has no chat template; drop --chat")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:  # the template's raise_exception, or a broken one
            raise TokenizerError(f"the model's chat template cannot render these messages: "
                                 f"{e}") from None

    def encode_chat(self, user_message: str) -> list[int]:
        """Token ids of a one-turn chat prompt ending with the assistant header."""
        text = self.apply_chat_template([{"role": "user", "content": user_message}])
        return self.encode(text, add_special_tokens=False)


def _token_text(token) -> str | None:
    if isinstance(token, dict):  # old transformers AddedToken serialisation
        return token.get("content")
    return token

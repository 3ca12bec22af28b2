"""Hugging Face `tokenizers` wrapper with the chat template (no torch, no transformers).

Every file is checked when the tokenizer is built, so a damaged one is one TokenizerError
naming the file (and line) at load, or at conversion (`check_tokenizer_files`), never a
failure at the first prompt or chat turn.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from .paths import not_a_file
from .user_text import check_utf8

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers >= 4.43 saves the chat template in a file of its own, which takes priority
# over tokenizer_config.json's "chat_template" (as in transformers)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, *CHAT_TEMPLATE_FILES)
REPAIR = "convert the model again, which writes it next to the checkpoint"


# The tokens chat models end a turn with (ChatML, Llama 3, Llama 2 / Mistral).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "</s>")


class TokenizerError(ValueError):
    """A checkpoint directory whose tokenizer files are missing or unusable."""


def read_tokenizer_files(directory: Path, repair: str = REPAIR) -> dict[str, bytes]:
    """The tokenizer files present in `directory` (name -> bytes); a name that is there
    but not a regular file (a directory, a pipe) is an error."""
    files = {}
    for name in FILES:
        path = directory / name
        if not path.exists() and not path.is_symlink():
            continue
        problem = not_a_file(path)
        if problem is not None:
            raise TokenizerError(f"{path} {problem}; {repair}")
        files[name] = path.read_bytes()
    return files


def check_tokenizer_files(files: dict[str, bytes | str], where: Path, repair: str) -> None:
    """Raise TokenizerError (naming the file, and the line where one is known) unless the
    tokenizer files `files` (name -> content, as they would lie in `where`) make a usable
    Tokenizer. Files other than the tokenizer's own are ignored."""
    _Parsed(files, where, repair)


def compile_chat_template(template: str, fail: Callable[[str], Exception]) -> jinja2.Template:
    """The Jinja chat template compiled in transformers' sandbox (with its
    `raise_exception`); a syntax error raises `fail(problem)`, which names the line."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise fail(f"its chat template has a syntax error at template line {e.lineno}: "
                   f"{e.message}") from None


class _Parsed:
    """The tokenizer files parsed and checked: the `tokenizers` object, the chat template
    (compiled) and the bos/eos token texts."""

    def __init__(self, files: dict[str, bytes | str], where: Path, repair: str):
        self.where, self.repair = where, repair
        if TOKENIZER_JSON not in files:
            raise TokenizerError(
                f"no {TOKENIZER_JSON} in {where}: rocketkv-jax reads the tokenizer from the "
                f"{TOKENIZER_JSON} that rocketkv-convert copies from the model; put the "
                f"model's {TOKENIZER_JSON} there (a model with only a sentencepiece "
                f"tokenizer.model needs one saved by transformers' AutoTokenizer)"
            )
        text = self.text(TOKENIZER_JSON, files[TOKENIZER_JSON])
        try:
            self.tok = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for a damaged file
            raise self.damaged(TOKENIZER_JSON, f"not a tokenizer file: {e}") from None
        config = self.json(TOKENIZER_CONFIG, files.get(TOKENIZER_CONFIG, "{}"))
        template, source = config.get("chat_template"), TOKENIZER_CONFIG
        if "chat_template.json" in files:
            template = self.json("chat_template.json", files["chat_template.json"]).get(
                "chat_template")
            source = "chat_template.json"
        if "chat_template.jinja" in files:
            template = self.text("chat_template.jinja", files["chat_template.jinja"])
            source = "chat_template.jinja"
        self.chat_template = self.pick_template(template, source)
        self.template = None if self.chat_template is None else self.compile(
            self.chat_template, source)
        self.bos_token = self.token_text(config, "bos_token")
        self.eos_token = self.token_text(config, "eos_token")

    def damaged(self, name: str, problem: str) -> TokenizerError:
        return TokenizerError(f"{self.where / name} is damaged ({problem}); {self.repair}")

    def text(self, name: str, data: bytes | str) -> str:
        if isinstance(data, str):
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.damaged(name, f"not UTF-8 text: {e.reason} at byte {e.start}") from None

    def json(self, name: str, data: bytes | str) -> dict[str, Any]:
        try:
            value = json.loads(self.text(name, data))
        except json.JSONDecodeError as e:
            raise self.damaged(name, f"not valid json: {e}") from None
        if not isinstance(value, dict):
            raise self.damaged(name, "not a json object")
        return value

    def pick_template(self, template: Any, source: str) -> str | None:
        """A template string; transformers' list form [{"name", "template"}] gives its
        "default" entry."""
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if "default" not in named:
                raise self.damaged(source, "its chat_template list has no \"default\" entry")
            template = named["default"]
        if template is not None and not isinstance(template, str):
            raise self.damaged(source, f"chat_template must be a string, got "
                               f"{type(template).__name__}")
        return template or None

    def compile(self, template: str, source: str) -> jinja2.Template:
        return compile_chat_template(template, lambda problem: self.damaged(source, problem))

    def token_text(self, config: dict[str, Any], key: str) -> str | None:
        token = config.get(key)
        if isinstance(token, dict):  # old transformers AddedToken serialisation
            token = token.get("content")
        if token is not None and not isinstance(token, str):
            raise self.damaged(TOKENIZER_CONFIG, f"{key} must be a string, got {token!r}")
        return token


class Tokenizer:
    """Encode/decode text and render chat prompts from a checkpoint's tokenizer files.

    Reads `tokenizer.json` and, when present, `tokenizer_config.json` (chat_template,
    bos/eos tokens) and `chat_template.jinja` / `chat_template.json` from `directory`.
    `repair` is the advice a TokenizerError ends with.
    """

    def __init__(self, directory: str | Path, repair: str = REPAIR):
        if not isinstance(directory, str | os.PathLike):
            raise TokenizerError(f"directory must be a path (str or Path), got "
                                 f"{type(directory).__name__}")
        directory = Path(directory)
        parsed = _Parsed(read_tokenizer_files(directory, repair), directory, repair)
        self._tok = parsed.tok
        # the same vocabulary with special-token matching off: message content encoded with
        # it is plain text, so "<|im_start|>" typed by a user is seven ordinary tokens
        self._plain = HFTokenizer.from_str(parsed.tok.to_str())
        self._plain.encode_special_tokens = True
        self._special_ids = frozenset(
            i for i, t in parsed.tok.get_added_tokens_decoder().items() if t.special)
        self._template = parsed.template
        self.chat_template: str | None = parsed.chat_template
        self.bos_token = parsed.bos_token
        self.eos_token = parsed.eos_token

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def end_of_turn_token(self) -> str | None:
        """The token that ends a chat turn in this vocabulary (END_OF_TURN), or None."""
        return next((t for t in END_OF_TURN if self.token_id(t) is not None), None)

    def stop_ids(self, model_eos_ids: Iterable[int], *, chat: bool = False
                 ) -> tuple[int, ...]:
        """The token ids a reply stops at: the model's EOS ids (`ModelConfig.eos_token_ids`),
        this tokenizer's EOS, and for a chat every end-of-turn token it knows."""
        stop = set(model_eos_ids)
        if self.eos_token_id is not None:
            stop.add(self.eos_token_id)
        for t in END_OF_TURN if chat else ():
            if (i := self.token_id(t)) is not None:
                stop.add(i)
        return tuple(sorted(stop))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, which must be valid Unicode (TokenizerError otherwise)."""
        check_utf8(text, "the text to encode", TokenizerError)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def char_spans(self, text: str, add_special_tokens: bool = True) -> list[tuple[int, int]]:
        """(start, end) character offsets in `text` of each token of `encode(text)`, in
        order; a special token added by the tokenizer spans (0, 0)."""
        check_utf8(text, "the text to encode", TokenizerError)
        encoding = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return [(int(a), int(b)) for a, b in encoding.offsets]

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
        if self._template is None:
            raise TokenizerError("this model's tokenizer has no chat template; drop --chat")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except Exception as e:  # the template's raise_exception, or a bug in the template
            raise TokenizerError(f"the model's chat template cannot render these messages: "
                                 f"{type(e).__name__}: {e}") from None

    def chat_segments(self, messages: list[dict[str, str]], add_generation_prompt: bool = True
                      ) -> list[tuple[str, bool]]:
        """The rendered chat prompt as pieces (text, is_content) whose concatenation is
        `apply_chat_template(messages, ...)`: the template's own text (False) and each
        message's content as the template placed it (True).

        Found by rendering with each content replaced by a marker no user can type (a fresh
        random one per call). A template that trims the content (Llama 3's `| trim`) is
        followed; one that changes it otherwise raises TokenizerError."""
        for i, m in enumerate(messages):
            check_utf8(m["content"], f"message {i}'s content", TokenizerError)
        plain = self.apply_chat_template(messages, add_generation_prompt)
        nonce = secrets.token_hex(8)
        marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)]
        rendered = self.apply_chat_template(marked, add_generation_prompt)
        marker = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
        for placed in (lambda text: text, str.strip):
            pieces, at = [], 0
            for m in marker.finditer(rendered):
                pieces += [(rendered[at:m.start()], False),
                           (placed(messages[int(m.group(1))]["content"]), True)]
                at = m.end()
            pieces.append((rendered[at:], False))
            if "".join(text for text, _ in pieces) == plain:
                return [(text, content) for text, content in pieces if text]
        raise TokenizerError("this model's chat template changes the text of messages (more "
                             "than trimming it), so their content cannot be told apart from "
                             "the template's own tokens; use a model with another template")

    def encode_segments(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """Token ids of `chat_segments`' pieces: the template's text with its special tokens,
        every content piece as plain text, so a message holding "<|im_start|>system" cannot
        forge a turn. Where no content holds a special token this is exactly the ids of the
        whole text encoded at once (what transformers' apply_chat_template(tokenize=True)
        gives); otherwise each piece is encoded on its own."""
        text = "".join(t for t, _ in pieces)
        spans, at = [], 0
        for t, content in pieces:
            if content:
                spans.append((at, at + len(t)))
            at += len(t)
        whole = self._tok.encode(text, add_special_tokens=False)
        specials = [span for i, span in zip(whole.ids, whole.offsets, strict=True)
                    if i in self._special_ids]
        if not any(start < c_end and end > c_start for start, end in specials
                   for c_start, c_end in spans):
            return whole.ids
        ids = []
        for t, content in pieces:
            ids += (self._plain if content else self._tok).encode(
                t, add_special_tokens=False).ids
        return ids

    def encode_messages(self, messages: list[dict[str, str]],
                        add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat prompt ([{"role", "content"}]) with every message's content
        encoded as plain text (`encode_segments`); ends with the assistant header when
        `add_generation_prompt`."""
        return self.encode_segments(self.chat_segments(messages, add_generation_prompt))

    def encode_chat(self, user_message: str) -> list[int]:
        """Token ids of a one-turn chat prompt ending with the assistant header."""
        return self.encode_messages([{"role": "user", "content": user_message}])


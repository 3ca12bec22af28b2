"""Run one of NVIDIA's RULER generator scripts unmodified, with our tokenizer plugged in.

    python -m rocketkv_jax.eval.ruler_worker SCRIPT --tokenizer_type rocketkv \
        --tokenizer_path TOKENIZER_JSON [OTHER SCRIPT ARGS...]

The scripts (long_context_eval/data/synthetic/*.py from `nvidia-long-context-eval`) are
command-line programs: argparse, seeding and tokenizer construction run at import, and
they import `select_tokenizer` either as `tokenizer` or as
`long_context_eval.data.tokenizer`. That module only knows NeMo / HF-transformers /
tiktoken / Gemini tokenizers; we register a stand-in under both names whose
`select_tokenizer(type, path)` returns a counter over a `tokenizers` tokenizer.json, with
the same `encode` (special tokens included) that the engine uses on the prompt. Then the
script runs as `__main__`. The caller starts this worker in the script's folder, which `-m`
puts first on sys.path, as `python SCRIPT` would (the scripts import `constants`).

This runs in its own process (see `ruler.py`) because the scripts reseed the global
`random` / `numpy` generators and parse `sys.argv` at import.
"""

from __future__ import annotations

import os
import runpy
import sys
import types

TOKENIZER_TYPE = "rocketkv"


class TokenizerJsonCounter:
    """What RULER's scripts call on a tokenizer: `text_to_tokens` (only its length is
    used) and `tokens_to_text`."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(path)

    def text_to_tokens(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def tokens_to_text(self, tokens: list[int]) -> str:
        return self._tok.decode(list(tokens))


def _select_tokenizer(tokenizer_type: str, tokenizer_path: str) -> TokenizerJsonCounter:
    if tokenizer_type != TOKENIZER_TYPE:
        raise ValueError(
            f"ruler_worker only provides tokenizer type {TOKENIZER_TYPE!r}, got {tokenizer_type!r}"
        )
    return TokenizerJsonCounter(tokenizer_path)


def install_tokenizer_module() -> None:
    """Register the stand-in under both names the scripts import it by."""
    module = types.ModuleType("tokenizer")
    module.select_tokenizer = _select_tokenizer
    sys.modules["tokenizer"] = module
    sys.modules["long_context_eval.data.tokenizer"] = module


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m rocketkv_jax.eval.ruler_worker SCRIPT [ARGS...]")
    script, args = os.path.abspath(argv[0]), argv[1:]
    install_tokenizer_module()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])

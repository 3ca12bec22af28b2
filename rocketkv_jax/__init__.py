"""rocketkv-jax: RocketKV two-stage KV-cache compression for Llama/Mistral in JAX.

The public API is imported lazily, so `import rocketkv_jax.eval` or the CLI's `--help`
does not pay for importing JAX.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "rocketkv_jax.model_store",
    "Model": "rocketkv_jax.model_store",
    "generate_ids": "rocketkv_jax.engine.generate",
    "GenerateError": "rocketkv_jax.engine.requests",
    "make_prefill": "rocketkv_jax.engine.generate",
    "make_decode_step": "rocketkv_jax.engine.generate",
    "Sampling": "rocketkv_jax.sampling",
    "make_method": "rocketkv_jax.methods",
    "METHOD_NAMES": "rocketkv_jax.methods",
    "ModelConfig": "rocketkv_jax.models.config",
    "Tokenizer": "rocketkv_jax.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rocketkv_jax' has no attribute {name!r}")

"""Weight conversion: HF safetensors directories and Llama GGUF files -> orbax checkpoints.

    from rocketkv_jax.convert import convert_any, load_checkpoint
    convert_any("./SmolLM2.gguf", "./ckpt", "bfloat16")
    params, config = load_checkpoint("./ckpt")

torch and transformers are never imported here; they are only needed by the tests.
"""

from rocketkv_jax.models.config import ConfigError

from .checkpoint import (
    convert_any,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from .gguf import embedded_smollm2_gguf, load_gguf
from .hf import ConversionError, load_hf

__all__ = [
    "ConfigError",
    "ConversionError",
    "convert_any",
    "embedded_smollm2_gguf",
    "load_checkpoint",
    "load_gguf",
    "load_hf",
    "read_checkpoint_config",
    "save_checkpoint",
]

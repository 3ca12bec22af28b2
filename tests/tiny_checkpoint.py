"""A tiny converted checkpoint on disk (random weights, a word-level tokenizer) for CLI
tests that must not wait for SmolLM2: `make_tiny_checkpoint(dir)`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.params import unflatten

OUT_OF_VOCAB_WORD = "zzz"  # the tokenizer knows it, the model's embedding does not


def tiny_checkpoint_config(**overrides) -> ModelConfig:
    kw = dict(
        model_type="llama", vocab_size=61, hidden_size=48, intermediate_size=96,
        num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return ModelConfig(**{**kw, **overrides})


def tokenizer_json(vocab_size: int) -> str:
    """Words w1 .. w{V-1} are ids 1 .. V-1 ([UNK] is 0); OUT_OF_VOCAB_WORD is id V + 9."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)},
             OUT_OF_VOCAB_WORD: vocab_size + 9}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


def tiny_params(config: ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in config.param_shapes().items():
        w = rng.standard_normal(shape) * 0.3
        flat[path] = (1.0 + 0.1 * w if path.endswith("norm") else w).astype(np.float32)
    return unflatten(flat)


def make_tiny_checkpoint(out: Path, config: ModelConfig | None = None, params=None) -> Path:
    from rocketkv_jax.convert.checkpoint import save_checkpoint

    config = config or tiny_checkpoint_config()
    params = tiny_params(config) if params is None else params
    extra = {"tokenizer.json": tokenizer_json(config.vocab_size),
             "tokenizer_config.json": json.dumps({})}
    return save_checkpoint(out, params, config, extra)


def words(n: int, vocab_size: int = 61, seed: int = 0) -> str:
    """A prompt of exactly n tokens for `tokenizer_json(vocab_size)`."""
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(1, vocab_size, n))

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


HF_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, hidden_act="silu",
)


def make_hf_dir(d: Path, edit=None, **config) -> Path:
    """A tiny HF Llama directory written with numpy only (no torch): config.json, one
    model.safetensors and a word-level tokenizer.json; `edit(tensors)` may change the
    tensors before they are saved; `config` overrides config.json values (not sizes)."""
    from safetensors.numpy import save_file

    from rocketkv_jax.convert.hf import expected_hf_shapes

    cfg = {**HF_CONFIG, **config}
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text(tokenizer_json(HF_CONFIG["vocab_size"]))
    rng = np.random.default_rng(0)
    shapes = expected_hf_shapes(ModelConfig.from_hf_dict(HF_CONFIG))
    tensors = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in shapes.items()}
    if edit is not None:
        edit(tensors)
    save_file(tensors, d / "model.safetensors")
    return d

"""Qwen2 / Qwen3 / Llama-with-biases / linear-RoPE parity with transformers (float32).

Each tiny random HF model is saved with `save_pretrained`, converted by the CLI and run
through `forward_prefill` and token-by-token `forward_decode` with the full-KV plan.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.cli.convert import main
from rocketkv_jax.convert import load_checkpoint
from rocketkv_jax.methods import Full
from rocketkv_jax.models.config import ConfigError, ModelConfig
from rocketkv_jax.models.llama import forward_decode, forward_prefill

ATOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=112, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0)

# name -> (transformers class prefix, seed, T, config overrides)
CASES = {
    "qwen2-gqa7-untied": ("Qwen2", 20, 20, dict(tie_word_embeddings=False)),
    "qwen2-gqa7-tied": ("Qwen2", 21, 20, dict(tie_word_embeddings=True)),
    "qwen3-qknorm-d16": ("Qwen3", 22, 20, dict(head_dim=16, num_attention_heads=8,
                                              tie_word_embeddings=False)),
    "llama-attn-mlp-bias": ("Llama", 23, 20, dict(attention_bias=True, mlp_bias=True,
                                                  num_attention_heads=8, head_dim=16)),
    "llama-linear-rope": ("Llama", 24, 40, dict(num_attention_heads=8, head_dim=16,
                                                rope_scaling={"rope_type": "linear",
                                                              "factor": 4.0})),
}


def _build(prefix: str, seed: int, **overrides):
    import torch
    import transformers

    config = getattr(transformers, f"{prefix}Config")(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # distinct, O(1) values everywhere (HF zero-inits biases)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_libs):
    cache = {}

    def get(name):
        if name not in cache:
            prefix, seed, T, overrides = CASES[name]
            model = _build(prefix, seed, **overrides)
            src = tmp_path_factory.mktemp(f"hf-{name}")
            model.save_pretrained(src)
            out = tmp_path_factory.mktemp(f"ck-{name}") / "ckpt"
            assert main([str(src), str(out), "--dtype", "float32", "--quiet"]) == 0
            params, config = load_checkpoint(out)
            cache[name] = (model, params, config, T)
        return cache[name]

    return get


_prefill = jax.jit(forward_prefill, static_argnums=(1, 4))
_decode = jax.jit(forward_decode, static_argnums=(1, 5))


def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _diff(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_and_decode_match_transformers(converted, name):
    model, params, config, T = converted(name)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, T), dtype=np.int32)
    want = _hf_logits(model, tokens)
    assert np.abs(want).max() > 0.5
    plan = Full().plan(config, prompt_len=T, max_new_tokens=1)
    logits, _ = _prefill(params, config, jnp.asarray(tokens), jnp.full((2,), T, jnp.int32), plan)
    d = _diff(logits, want)
    assert d < ATOL, f"{name}: prefill max |logit diff| {d:.3g}"

    plan = Full().plan(config, prompt_len=1, max_new_tokens=T - 1)
    step, cache = _prefill(params, config, jnp.asarray(tokens[:, :1]),
                           jnp.ones((2,), jnp.int32), plan)
    diffs = [_diff(step[:, 0], want[:, 0])]
    for t in range(1, T):
        step, cache = _decode(params, config, jnp.asarray(tokens[:, t]),
                              jnp.full((2,), t, jnp.int32), cache, plan)
        diffs.append(_diff(step, want[:, t]))
    assert max(diffs) < ATOL, f"{name}: decode max |logit diff| {max(diffs):.3g}"


def test_configs_carry_the_features(converted):
    assert converted("qwen2-gqa7-untied")[2].qkv_bias
    assert not converted("qwen2-gqa7-untied")[2].o_bias
    assert "lm_head" not in converted("qwen2-gqa7-tied")[1]
    c = converted("qwen3-qknorm-d16")[2]
    assert c.qk_norm and c.head_dim == 16 and c.hidden_size != c.num_heads * c.head_dim
    c = converted("llama-attn-mlp-bias")[2]
    assert c.qkv_bias and c.o_bias and c.mlp_bias
    c = converted("llama-linear-rope")[2]
    assert c.rope_scaling.rope_type == "linear" and c.rope_scaling.factor == 4.0
    # the scaling really changes transformers' logits (so the parity above is not vacuous)
    model, _, config, T = converted("llama-linear-rope")
    plain = _build("Llama", 24, num_attention_heads=8, head_dim=16)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (1, T))
    assert np.abs(_hf_logits(model, tokens) - _hf_logits(plain, tokens)).max() > 1e-2


def _hf_dict(prefix: str, **overrides) -> dict:
    import transformers

    return getattr(transformers, f"{prefix}Config")(**{**BASE, **overrides}).to_dict()


def test_qwen2_sliding_window_is_refused(tmp_path, hf_libs):
    cfg = _hf_dict("Qwen2", use_sliding_window=True, sliding_window=64)
    with pytest.raises(ConfigError, match="use_sliding_window=true"):
        ModelConfig.from_hf_dict(cfg)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["dynamic", "yarn"])
def test_unimplemented_rope_scaling_is_refused(kind, hf_libs):
    cfg = _hf_dict("Llama", rope_scaling={"rope_type": kind, "factor": 2.0,
                                          "original_max_position_embeddings": 128})
    with pytest.raises(ConfigError, match=f"unsupported rope_scaling type '{kind}'"):
        ModelConfig.from_hf_dict(cfg)

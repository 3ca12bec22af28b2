"""Every method through the real model: prefill + decode steps under jax.jit with the plan
as a static argument, on a tiny random Llama / Mistral."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_decoder import tiny_config, tiny_params

from rocketkv_jax.methods import METHOD_NAMES, DensePlan, Full, make_method
from rocketkv_jax.models.llama import forward_decode, forward_prefill

T, N = 48, 5
LENGTHS = (48, 37)
# Budgets that compress at T=48, N=5 with the tiny model (head_dim 16), and overrides so
# windows/pages fit. rocketkv at M=16, window 8: capacity 37, prompt budget 32, page 2.
# stage2="on": at these sizes the cost model would attend densely (test_dense_fallback).
COMPRESSED = {
    "full": (None, {}),
    "streaming": (12, {}),
    "snapkv": (20, {"window": 8}),
    "snapkv++": (20, {"window": 8}),
    "quest": (16, {"page_size": 4, "stage2": "on"}),
    "sparq": (16, {"stage2": "on"}),
    "hybrid": (16, {"stage2": "on"}),
    "rocketkv": (16, {"window": 8, "stage2": "on"}),
    "topk": (16, {}),
}


prefill_jit = jax.jit(forward_prefill, static_argnames=("config", "plan", "all_logits"))
decode_jit = jax.jit(forward_decode, static_argnames=("config", "plan"))


def run(params, tokens, lengths, new_tokens, *, config, plan):
    """Prefill, then N teacher-forced decode steps (one compiled step reused); returns
    (last-token logits [B, V], step logits [N, B, V])."""
    logits, cache = prefill_jit(params, config, tokens, lengths, plan, all_logits=False)
    step_logits = []
    for i in range(new_tokens.shape[0]):
        out, cache = decode_jit(params, config, new_tokens[i], lengths + i, cache, plan)
        step_logits.append(out)
    return logits, jnp.stack(step_logits)


def inputs(config):
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, config.vocab_size, (len(LENGTHS), T))
    new_tokens = rng.integers(1, config.vocab_size, (N, len(LENGTHS)))
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(LENGTHS, jnp.int32), jnp.asarray(
        new_tokens, jnp.int32)


@functools.cache
def full_logits(config):
    tokens, lengths, new = inputs(config)
    plan = Full().plan(config, T, N)
    return tuple(np.asarray(x) for x in run(tiny_params(config), tokens, lengths, new,
                                            config=config, plan=plan))


@pytest.mark.parametrize("sliding_window", [None, 32])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_runs_under_jit(name, sliding_window):
    config = tiny_config(sliding_window)
    budget, over = COMPRESSED[name]
    plan = make_method(name, budget, **over).plan(config, T, N)
    hash(plan)  # a static jit argument
    if name != "full":
        assert not isinstance(plan, DensePlan), plan
        assert plan.describe()["name"] == name
        assert 0 < plan.read_tokens(T + N) <= T + N
    if name in ("snapkv", "snapkv++", "rocketkv"):  # stage 1 scores within the model's window
        assert plan.sliding_window == sliding_window
    tokens, lengths, new = inputs(config)
    prefill, steps = run(tiny_params(config), tokens, lengths, new, config=config, plan=plan)
    assert np.isfinite(np.asarray(prefill)).all()
    assert np.isfinite(np.asarray(steps)).all()
    want_prefill, want_steps = full_logits(config)
    # The prefill logits never depend on the method (compression happens after attention).
    np.testing.assert_allclose(np.asarray(prefill), want_prefill, rtol=1e-5, atol=1e-5)
    if name == "full":
        return
    # Compression changes the decode logits (otherwise the test would not exercise it).
    assert not np.allclose(np.asarray(steps), want_steps, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["snapkv", "snapkv++"])
def test_sliding_window_inside_the_budget_decodes_as_full(name):
    """Mistral, W = 16 <= budget 20: stage 1 keeps every prompt token a decode query can
    still see (not tokens that fell out of the window), so decoding equals full KV."""
    config = tiny_config(16)
    plan = make_method(name, 20, window=8).plan(config, T, N)
    assert not isinstance(plan, DensePlan) and plan.sliding_window == 16
    tokens, lengths, new = inputs(config)
    _, steps = run(tiny_params(config), tokens, lengths, new, config=config, plan=plan)
    np.testing.assert_allclose(np.asarray(steps), full_logits(config)[1], rtol=1e-5, atol=1e-6)


DENSE_CASES = [(n, None) for n in METHOD_NAMES if n != "full"] + [
    ("rocketkv", 20), ("streaming", 20)]


@pytest.mark.parametrize(("name", "sliding_window"), DENSE_CASES)
def test_budget_covering_sequence_equals_full(name, sliding_window):
    """M >= L: no eviction, exact dense attention, the same logits as `full`."""
    config = tiny_config(sliding_window)
    _, over = COMPRESSED[name]
    plan = make_method(name, T + N, **over).plan(config, T, N)
    assert isinstance(plan, DensePlan) and plan.name == name
    assert plan.read_tokens(T + N) == T + N
    tokens, lengths, new = inputs(config)
    prefill, steps = run(tiny_params(config), tokens, lengths, new, config=config, plan=plan)
    want_prefill, want_steps = full_logits(config)
    np.testing.assert_allclose(np.asarray(prefill), want_prefill, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(steps), want_steps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["quest", "sparq", "hybrid"])
def test_stage2_off_decodes_as_full(name):
    """The dense fallback of a method without stage 1 attends over the whole cache: the
    same logits as `full` (rocketkv's, over its stage-1 cache: test_dense_fallback)."""
    config = tiny_config(None)
    budget, over = COMPRESSED[name]
    plan = make_method(name, budget, **{**over, "stage2": "off"}).plan(config, T, N)
    assert getattr(plan, "fallback", "") == "off"
    tokens, lengths, new = inputs(config)
    prefill, steps = run(tiny_params(config), tokens, lengths, new, config=config, plan=plan)
    want_prefill, want_steps = full_logits(config)
    np.testing.assert_allclose(np.asarray(prefill), want_prefill, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(steps), want_steps, rtol=1e-5, atol=1e-6)

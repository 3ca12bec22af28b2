"""forward_mixed (one decode step of a cache's rows and one prefill chunk of another prompt
in one pass over the weights) against forward_decode and prefill_chunk run apart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_decoder import tiny_config, tiny_params

from rocketkv_jax.methods import make_method
from rocketkv_jax.models.llama import (
    forward_decode,
    forward_mixed,
    forward_prefill,
    init_prefill_state,
    prefill_chunk,
    prefill_finish,
)

T, N, C = 64, 8, 16
METHODS = {"full": (None, {}), "rocketkv": (24, {"window": 8}),
           "rocketkv-skip": (24, {"window": 8, "skip_layers": 1})}


def assert_trees_close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _decode_rows(config, params, plan, seed):
    """A cache of 3 rows prefilled with prompts of different lengths, their next tokens
    and positions."""
    rng = np.random.default_rng(seed)
    lengths = np.array([T, 41, 9], np.int32)
    tokens = rng.integers(1, config.vocab_size, (3, T)).astype(np.int32)
    _, cache = forward_prefill(params, config, jnp.asarray(tokens), jnp.asarray(lengths), plan,
                               all_logits=False)
    nxt = rng.integers(1, config.vocab_size, 3).astype(np.int32)
    return jnp.asarray(nxt), jnp.asarray(lengths), cache


@pytest.mark.parametrize("sliding_window", [None, 19], ids=["llama", "mistral-window"])
@pytest.mark.parametrize("method", list(METHODS))
def test_mixed_equals_decode_and_chunk_apart(method, sliding_window):
    config = tiny_config(sliding_window)
    params = tiny_params(config)
    budget, kw = METHODS[method]
    name = "rocketkv" if method.startswith("rocketkv") else method
    plan = make_method(name, budget, **kw).plan(config, T, N)
    tokens, positions, cache = _decode_rows(config, params, plan, seed=1)

    rng = np.random.default_rng(2)
    P = 45  # the prompt being prefilled: 3 chunks, its last token in the third
    prompt = np.zeros((1, 3 * C), np.int32)
    prompt[0, :P] = rng.integers(1, config.vocab_size, P)
    lengths = jnp.asarray([P], jnp.int32)
    state = init_prefill_state(config, 1, 3 * C, plan.query_window, jnp.float32)
    state, _ = prefill_chunk(params, config, state, jnp.asarray(prompt[:, :C]), 0, lengths)

    mixed = jax.jit(forward_mixed, static_argnames=("config", "plan"))
    got_logits, got_cache, got_state = mixed(
        params, config, tokens, positions, cache, plan, state,
        jnp.asarray(prompt[:, C:2 * C]), jnp.int32(C), lengths)
    want_logits, want_cache = forward_decode(params, config, tokens, positions, cache, plan)
    want_state, _ = prefill_chunk(params, config, state, jnp.asarray(prompt[:, C:2 * C]),
                                  jnp.int32(C), lengths)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert_trees_close(got_cache, want_cache)
    assert_trees_close(got_state, want_state)

    # the chunk holding the prompt's last token, then the prompt's own logits and cache
    # equal a one-shot prefill's
    _, _, got_state = mixed(params, config, tokens, positions + 1, got_cache, plan, got_state,
                            jnp.asarray(prompt[:, 2 * C:]), jnp.int32(2 * C), lengths)
    logits, prompt_cache = prefill_finish(params, config, got_state, lengths, plan, 3 * C)
    ref_logits, ref_cache = forward_prefill(params, config, jnp.asarray(prompt), lengths, plan,
                                            all_logits=False)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert_trees_close(prompt_cache, ref_cache)


def test_mixed_takes_one_prompt():
    config = tiny_config()
    params = tiny_params(config)
    plan = make_method("full").plan(config, T, N)
    tokens, positions, cache = _decode_rows(config, params, plan, seed=1)
    state = init_prefill_state(config, 2, C, 0, jnp.float32)
    with pytest.raises(ValueError, match="one prompt"):
        forward_mixed(params, config, tokens, positions, cache, plan, state,
                      jnp.zeros((2, C), jnp.int32), 0, jnp.asarray([C, C], jnp.int32))

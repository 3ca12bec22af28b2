"""Chunked, blockwise prefill against the one-shot dense prefill: same logits, same
compressed cache (identical kept tokens), and memory that grows linearly in T."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_decoder import tiny_config, tiny_params

from rocketkv_jax.methods import make_method
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.llama import forward_prefill

T, N = 100, 6
LENGTHS = (100, 61, 23)
METHODS = {
    "full": (None, {}),
    "snapkv": (40, {"window": 8}),
    "snapkv++": (40, {"window": 8}),
    "rocketkv": (24, {"window": 8}),
}

prefill = jax.jit(forward_prefill,
                  static_argnames=("config", "plan", "all_logits", "chunk", "kernels"))


def prompt(config, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, config.vocab_size, (len(LENGTHS), T)).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(LENGTHS, jnp.int32)


@pytest.mark.parametrize("sliding_window", [None, 19], ids=["llama", "mistral-window"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("chunk", [16, 48])
def test_chunked_prefill_equals_one_shot_dense(method, chunk, sliding_window):
    config = tiny_config(sliding_window)
    params = tiny_params(config)
    budget, kw = METHODS[method]
    plan = make_method(method, budget, **kw).plan(config, T, N)
    tokens, lengths = prompt(config)
    ref_logits, ref_cache = prefill(params, config, tokens, lengths, plan, kernels="dense")
    logits, cache = prefill(params, config, tokens, lengths, plan, chunk=chunk)
    real = (np.arange(T)[None, :] < np.asarray(lengths)[:, None])[..., None]
    np.testing.assert_allclose(np.where(real, logits, 0), np.where(real, ref_logits, 0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.pos), np.asarray(ref_cache.pos))
    np.testing.assert_array_equal(np.asarray(cache.length), np.asarray(ref_cache.length))
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(ref_cache.k), atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache.v), np.asarray(ref_cache.v), atol=1e-5)
    # last-token logits (what generate uses) also agree
    last, _ = prefill(params, config, tokens, lengths, plan, chunk=chunk, all_logits=False)
    want = np.asarray(ref_logits)[np.arange(len(LENGTHS)), np.asarray(lengths) - 1]
    np.testing.assert_allclose(np.asarray(last), want, rtol=1e-5, atol=1e-5)


def test_compressed_cache_really_evicts():
    """Control for the test above: the stage-1 plans do drop tokens at these sizes."""
    config = tiny_config()
    plan = make_method("snapkv++", 40, window=8).plan(config, T, N)
    _, cache = prefill(tiny_params(config), config, *prompt(config), plan, chunk=32)
    assert np.asarray(cache.length[0]).tolist() == [40, 40, 23]  # layer 0


def temp_bytes(config, T, plan, **kw) -> int:
    params = jax.eval_shape(lambda: tiny_params(config))
    fn = jax.jit(lambda p, t, n: forward_prefill(p, config, t, n, plan, all_logits=False, **kw))
    compiled = fn.lower(params, jax.ShapeDtypeStruct((1, T), jnp.int32),
                        jax.ShapeDtypeStruct((1,), jnp.int32)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_prefill_memory_is_linear_in_T():
    """XLA's memory analysis at T=16k on a small config: the dense path's [H, T, T] scores
    alone are 16k * 16k * 4 heads * 4 B = 4 GiB; the chunked blockwise prefill stays far
    below, and doubling T about doubles its temp."""
    config = ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=1 << 17, tie_word_embeddings=True)
    full = make_method("full", None)
    t16 = 16384
    dense = temp_bytes(config, t16, full.plan(config, t16, 8), kernels="dense")
    ours = temp_bytes(config, t16, full.plan(config, t16, 8), chunk=2048)
    ours32 = temp_bytes(config, 2 * t16, full.plan(config, 2 * t16, 8), chunk=2048)
    assert dense > 4 * 2**30
    assert ours < 128 * 2**20, ours
    assert ours32 < 2.2 * ours, (ours, ours32)


def test_a_chunk_does_not_copy_a_layer_of_the_buffers():
    """Each layer's attention reads its key blocks from the stacked [Ly, B, K, S, D]
    buffers where they lie: slicing the layer out first makes XLA:CPU copy all S of its
    positions at every chunk, however few the chunk sees (found in the optimized HLO)."""
    import re

    from rocketkv_jax.models.llama import init_prefill_state, prefill_chunk
    from rocketkv_jax.models.params import random_params

    config = ModelConfig(
        model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256,
        num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=1e4, max_position_embeddings=8192, tie_word_embeddings=False)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          random_params(config))
    S, C = 4096, 32
    state = jax.eval_shape(lambda: init_prefill_state(config, 1, S, 8, jnp.float32))
    chunk = jax.jit(lambda p, st, t, s, n: prefill_chunk(p, config, st, t, s, n,
                                                         kernels="reference")[0],
                    donate_argnums=(1,))
    i32 = jnp.int32
    hlo = chunk.lower(params, state, jax.ShapeDtypeStruct((1, C), i32),
                      jax.ShapeDtypeStruct((), i32),
                      jax.ShapeDtypeStruct((1,), i32)).compile().as_text()
    layer = r"= f32\[(1,)?1,2,4096,32\]\{[0-9,]*\} (fusion|dynamic-slice|copy)\("
    assert re.findall(layer, hlo) == []

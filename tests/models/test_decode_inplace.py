"""The decode step updates the stacked KV cache in place.

Regression guard for the layer loop: scanning the cache as `lax.scan` xs/ys made XLA copy
every layer's cache in and out of the loop (about 11x the cache bytes per step and a
cache-sized temporary). With the cache as loop carry, each layer writes its token in
place. Checked on XLA's own analyses of the compiled step, for a dense, a paged and a
compressing method, and with skip_layers (two stacks, one layer loop each). Batch 2 for
the temporaries (the per-row write); batch 1 for XLA's byte count, whose cost model
charges a scatter (the B > 1 write) the whole operand even when it runs in place.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.bench.xla_stats import loop_aware_bytes
from rocketkv_jax.cache import KVCache, append_token, page_bounds
from rocketkv_jax.engine.generate import make_decode_step, make_prefill
from rocketkv_jax.methods.registry import make_method
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.params import random_params, unstack_layers

CONFIG = ModelConfig(
    model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=4,
    num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=1e4,
    max_position_embeddings=8192, tie_word_embeddings=False,
)
T = 4096
# rocketkv with stage2 "on": its paged stage 2 is what this guards (at this size the cost
# model would attend densely over the stage-1 cache)
METHODS = [("full", {}), ("quest", {"token_budget": 256}),
           ("rocketkv", {"token_budget": 256, "stage2": "on"}),
           # two stacked caches (dense layers, method layers), one layer loop over each
           ("quest", {"token_budget": 256, "skip_layers": 1}),
           ("rocketkv", {"token_budget": 256, "skip_layers": 2, "stage2": "on"})]


def compiled_step(name, kw, B, layout="stacked"):
    params = jax.tree.map(jnp.asarray, random_params(CONFIG))
    if layout == "per-layer":  # the per-layer switch (models.llama.loop_layers)
        params = unstack_layers(params)
    plan = make_method(name, **kw).plan(CONFIG, T, 16)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    cache = jax.eval_shape(make_prefill(CONFIG, plan), params, tokens, lengths)[1]
    row = jax.ShapeDtypeStruct((B,), jnp.int32)
    compiled = make_decode_step(CONFIG, plan).lower(params, row, row, cache).compile()
    cache_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return compiled, cache_bytes


@pytest.mark.parametrize("layout", ["stacked", "per-layer"])
@pytest.mark.parametrize("name,kw", METHODS)
def test_decode_step_allocates_no_copy_of_the_cache(name, kw, layout):
    compiled, cache_bytes = compiled_step(name, kw, B=2, layout=layout)
    temp = compiled.memory_analysis().temp_size_in_bytes
    # at most one layer's slice may be materialised (4 layers here); a copy of the
    # stacked cache (the old scan) needs more than the whole cache
    assert temp < 0.5 * cache_bytes, (temp, cache_bytes)


@pytest.mark.parametrize("name,kw", METHODS)
def test_decode_step_reads_the_cache_about_once(name, kw):
    compiled, cache_bytes = compiled_step(name, kw, B=1)
    accessed = loop_aware_bytes(compiled)
    assert accessed is not None
    assert accessed < 6 * cache_bytes, accessed / cache_bytes  # was ~11x with the scan


def test_stacked_append_writes_one_layer_like_numpy():
    """append_token(..., layer) on a stacked cache: only that layer changes; each row's token
    lands at its own slot `length[b]` and its page's max/min take it in (numpy reference)."""
    Ly, B, K, C, D, page = 3, 2, 2, 8, 4, 2
    rng = np.random.default_rng(0)
    k = rng.standard_normal((Ly, B, K, C, D)).astype(np.float32)
    v = rng.standard_normal((Ly, B, K, C, D)).astype(np.float32)
    length = np.array([[3, 5], [2, 6], [4, 1]], np.int32)  # [Ly, B]
    pos = np.where(np.arange(C) < length[:, :, None, None], np.arange(C), -1)
    pos = np.broadcast_to(pos, (Ly, B, K, C)).astype(np.int32)
    kmax, kmin = page_bounds(jnp.asarray(k.reshape(Ly * B, K, C, D)),
                             jnp.asarray(pos.reshape(Ly * B, K, C)), page)
    cache = KVCache(*map(jnp.asarray, (k, v, pos, length)),
                    kmax.reshape(Ly, B, K, C // page, D), kmin.reshape(Ly, B, K, C // page, D))
    kn = rng.standard_normal((B, K, D)).astype(np.float32)
    vn = rng.standard_normal((B, K, D)).astype(np.float32)
    position = np.array([40, 41], np.int32)
    out = jax.jit(append_token)(cache, kn, vn, position, jnp.int32(1))

    want_k, want_v, want_pos = k.copy(), v.copy(), pos.copy()
    want_max, want_min = np.array(cache.page_max), np.array(cache.page_min)
    for b in range(B):
        s = length[1, b]
        want_k[1, b, :, s], want_v[1, b, :, s], want_pos[1, b, :, s] = kn[b], vn[b], position[b]
        want_max[1, b, :, s // page] = np.maximum(want_max[1, b, :, s // page], kn[b])
        want_min[1, b, :, s // page] = np.minimum(want_min[1, b, :, s // page], kn[b])
    np.testing.assert_array_equal(np.asarray(out.k), want_k)
    np.testing.assert_array_equal(np.asarray(out.v), want_v)
    np.testing.assert_array_equal(np.asarray(out.pos), want_pos)
    np.testing.assert_array_equal(np.asarray(out.length), length + np.array([[0], [1], [0]]))
    np.testing.assert_array_equal(np.asarray(out.page_max), want_max)
    np.testing.assert_array_equal(np.asarray(out.page_min), want_min)

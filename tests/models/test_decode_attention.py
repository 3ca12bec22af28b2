"""decode_attention (the blockwise dense decode attention) against the materialised
softmax it replaces and against a float64 numpy loop: f32 and bf16, GQA group sizes 1-8,
ragged lengths, a sliding window, heads with nothing visible, and blocks that do not
divide the cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.cache import KVCache, visible_slots
from rocketkv_jax.methods.dense import (
    dense_decode_attention,
    dense_decode_attention_reference,
    dense_decode_attention_stacked,
)
from rocketkv_jax.models.layers import decode_attention, decode_block_size, masked_mean


def numpy_decode(q, k, v, visible):
    """float64, one head and one key at a time. q [B, H, D], k/v [B, K, S, D]."""
    B, H, D = q.shape
    K, S = k.shape[1], k.shape[2]
    out = np.zeros((B, H, D))
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)
            idx = [s for s in range(S) if visible[b, kh, s]]
            if not idx:
                continue
            logits = np.array([q[b, h] @ k[b, kh, s] for s in idx]) / np.sqrt(D)
            w = np.exp(logits - logits.max())
            out[b, h] = sum(wi * v[b, kh, s] for wi, s in zip(w, idx, strict=True)) / w.sum()
    return out


def make_case(rng, B, K, G, S, D, dtype, window=None):
    """Random q/k/v (q scaled so the softmax is not flat), a cache whose rows hold ragged
    lengths (row 0 none: every head of it sees nothing), each row's query at its last
    token, and the visible slots."""
    q = rng.standard_normal((B, K * G, D)) * 2.0
    k = rng.standard_normal((B, K, S, D))
    v = rng.standard_normal((B, K, S, D)) + 0.5
    lengths = rng.integers(S // 3, S + 1, size=B)
    lengths[0] = 0  # a row with no visible key
    pos = np.where(np.arange(S)[None, None, :] < lengths[:, None, None],
                   np.arange(S)[None, None, :], -1).repeat(K, axis=1)
    cast = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64)  # noqa: E731
    q, k, v = cast(q), cast(k), cast(v)  # the values the dtype holds, for the f64 loop
    cache = KVCache(jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(pos, jnp.int32),
                    jnp.asarray(lengths, jnp.int32), jnp.zeros((B, K, 0, D), dtype),
                    jnp.zeros((B, K, 0, D), dtype))
    query_pos = jnp.asarray(np.maximum(lengths - 1, 0), jnp.int32)
    visible = visible_slots(cache, query_pos, window)
    return q, k, v, cache, visible


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("K,G", [(4, 1), (2, 2), (2, 3), (1, 4), (2, 8)])
@pytest.mark.parametrize("S,block", [(37, 8), (64, 16), (50, 64), (29, None)])
def test_matches_reference_and_numpy(dtype, tol, K, G, S, block):
    rng = np.random.default_rng(1000 * K + 10 * G + S)
    B, D = 3, 16
    q, k, v, cache, visible = make_case(rng, B, K, G, S, D, dtype)
    qj = jnp.asarray(q, dtype)
    got = decode_attention(qj, cache.k, cache.v, visible, block)
    assert got.dtype == dtype and got.shape == (B, K * G, D)
    got = np.asarray(got.astype(jnp.float32), np.float64)
    want = numpy_decode(q, k, v, np.asarray(visible))
    ref = np.asarray(dense_decode_attention_reference(qj, cache, visible).astype(jnp.float32))
    # bf16: both round the output to bf16, so compare at the output's precision
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol)
    np.testing.assert_allclose(got, ref, atol=tol * scale, rtol=tol)
    assert np.all(got[0] == 0)  # row 0 has no visible key


def test_sliding_window_and_default_block():
    """A window shorter than the cache, a block size that leaves a tail, the plan path."""
    rng = np.random.default_rng(7)
    B, K, G, S, D = 2, 2, 4, 75, 32
    q, k, v, cache, visible = make_case(rng, B, K, G, S, D, jnp.float32, window=20)
    assert 0 < np.asarray(visible)[1:].sum(-1).max() <= 20
    qj = jnp.asarray(q, jnp.float32)
    want = numpy_decode(q, k, v, np.asarray(visible))
    for block in (None, 16, 32, 128):
        got = np.asarray(decode_attention(qj, cache.k, cache.v, visible, block))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    got = np.asarray(dense_decode_attention(qj, cache, visible))  # the plans' entry point
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_large_logits_stay_finite():
    """Online softmax with scores far apart across blocks (a max found late)."""
    rng = np.random.default_rng(3)
    B, K, G, S, D = 1, 1, 2, 40, 8
    q, k, v, cache, visible = make_case(rng, B + 1, K, G, S, D, jnp.float32)
    k[1, 0, -3] = q[1, 0] * 40.0 / np.linalg.norm(q[1, 0])  # one key dominates, last block
    cache = KVCache(jnp.asarray(k, jnp.float32), *[getattr(cache, f) for f in
                                                    ("v", "pos", "length", "page_max",
                                                     "page_min")])
    visible = jnp.ones((B + 1, K, S), bool)
    got = np.asarray(decode_attention(jnp.asarray(q, jnp.float32), cache.k, cache.v,
                                      visible, 8))
    want = numpy_decode(q, k, v, np.ones((B + 1, K, S), bool))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_block_size_rule():
    assert decode_block_size(1, 8, 128) == 512  # 4 KiB per slot: capped at 512
    assert decode_block_size(8, 8, 128) == 128  # 32 KiB per slot: 4 MiB / 32 KiB
    assert decode_block_size(64, 32, 256) == 16  # floor of the range
    assert decode_block_size(3, 5, 96) == 512


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_cache_read_at_a_traced_layer(dtype):
    """With `layer`, the blocks are read from the stacked [L, ...] cache at that layer:
    the same output as the layer's own cache, under jit with a traced index."""
    rng = np.random.default_rng(11)
    B, K, G, S, D, L = 2, 2, 3, 45, 16, 3
    cases = [make_case(rng, B, K, G, S, D, dtype, window=30) for _ in range(L)]
    stack = jax.tree.map(lambda *a: jnp.stack(a), *[c[3] for c in cases])
    q = jnp.asarray(cases[0][0], dtype)
    query_pos = jnp.asarray([0, S - 1], jnp.int32)
    stacked = jax.jit(lambda s, i: dense_decode_attention_stacked(q, s, i, query_pos, 30))
    for i, (_, k, v, cache, _) in enumerate(cases):
        visible = visible_slots(cache, query_pos, 30)
        want = numpy_decode(np.asarray(q.astype(jnp.float32), np.float64), k, v,
                            np.asarray(visible))
        got = np.asarray(stacked(stack, jnp.int32(i)).astype(jnp.float32))
        tol = 2e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=tol)
        same = decode_attention(q, cache.k, cache.v, visible, 16)
        np.testing.assert_array_equal(
            np.asarray(decode_attention(q, stack.k, stack.v, visible, 16, layer=i)),
            np.asarray(same))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("S,block,window", [(37, 8, None), (64, 16, 30), (29, None, None)])
def test_masked_mean_matches_numpy(dtype, S, block, window):
    """masked_mean: the mean of each KV head's visible values (float64 numpy on the values
    the dtype holds), zeros for a row with nothing visible, on a plain cache and read at a
    traced layer of a stacked one."""
    rng = np.random.default_rng(5)
    tol = 1e-5  # f32 sums of values the dtype holds exactly
    B, K, D, L = 3, 2, 16, 2
    cases = [make_case(rng, B, K, 2, S, D, dtype, window) for _ in range(L)]
    stack_v = jnp.stack([c[3].v for c in cases])
    at_layer = jax.jit(lambda v, vis, i: masked_mean(v, vis, block, layer=i))
    for i, (_, _, v, cache, visible) in enumerate(cases):
        vis = np.asarray(visible)
        want = np.zeros((B, K, D))
        for b in range(B):
            for kh in range(K):
                if vis[b, kh].any():
                    want[b, kh] = v[b, kh][vis[b, kh]].mean(axis=0)
        assert not vis[0].any() and not want[0].any()  # make_case's row 0 sees nothing
        got = masked_mean(cache.v, visible, block)
        assert got.dtype == jnp.float32 and got.shape == (B, K, D)
        np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(at_layer(stack_v, visible, jnp.int32(i))), want,
                                   rtol=tol, atol=tol)

"""Stage 2 keeps its page max/min channel-major ([B, K, D, P]): the same selections and
outputs as the row-major [B, K, P, D] layout, with appends keeping it current. The
float64 numpy pins of the channel-major path itself are in test_sparse_decode_methods."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.cache import append_token, page_bounds
from rocketkv_jax.methods import make_method
from rocketkv_jax.methods.stage2 import hybrid_select
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.llama import window_queries

D, K, T, N = 16, 2, 64, 8


def config(G):
    return ModelConfig(
        model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64,
        num_layers=1, num_heads=K * G, num_kv_heads=K, head_dim=D, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
    )


def row_major(cache):
    return dataclasses.replace(cache, page_max=jnp.swapaxes(cache.page_max, 2, 3),
                               page_min=jnp.swapaxes(cache.page_min, 2, 3))


@pytest.mark.parametrize(("method", "kw"), [("hybrid", {"page_size": 4, "top_r": 5}),
                                            ("rocketkv", {"window": 8})])
@pytest.mark.parametrize(("G", "dtype"), [(1, jnp.float32), (3, jnp.bfloat16),
                                          (4, jnp.float32), (8, jnp.float32)])
def test_channel_major_metadata_selects_as_row_major(method, kw, G, dtype):
    plan = make_method(method, 16, stage2="on", **kw).plan(config(G), T, N)
    page = plan.cache_page_size
    assert page > 1
    rng = np.random.default_rng(G)

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 1.5, dtype)

    lengths = jnp.asarray([T, T - 13], jnp.int32)
    q_obs, _ = window_queries(rand(2, K * G, T, D), lengths, plan.query_window)
    cache = jax.jit(plan.compress)(rand(2, K, T, D), rand(2, K, T, D), q_obs, lengths)
    C = cache.k.shape[2]
    assert cache.page_max.shape == (2, K, D, C // page)  # [B, K, D, P]
    rows = row_major(cache)
    pos0 = np.asarray(cache.pos).max(axis=(1, 2)) + 1
    append_cm = jax.jit(plan.append)
    append_rm = jax.jit(append_token)
    for i in range(page + 3):  # fill a page and open the next
        k, v, p = rand(2, K, D), rand(2, K, D), jnp.asarray(pos0 + i, jnp.int32)
        cache, rows = append_cm(cache, k, v, p), append_rm(rows, k, v, p)
        kmax, kmin = page_bounds(cache.k, cache.pos, page)  # row-major, from the keys
        np.testing.assert_array_equal(np.asarray(jnp.swapaxes(cache.page_max, 2, 3)), kmax)
        np.testing.assert_array_equal(np.asarray(jnp.swapaxes(cache.page_min, 2, 3)), kmin)
        np.testing.assert_array_equal(np.asarray(rows.page_max), kmax)
    q = rand(2, K * G, D)
    qpos = jnp.asarray(pos0 + page + 2, jnp.int32)
    visible = (cache.pos >= 0) & (cache.pos <= qpos[:, None, None])
    select = jax.jit(hybrid_select, static_argnames=("page_size", "top_r", "k_top",
                                                     "channel_major"))
    args = dict(page_size=plan.page_size, top_r=plan.top_r, k_top=plan.k_top)
    idx_cm, s_cm = select(q, cache, visible, channel_major=True, **args)
    idx_rm, s_rm = select(q, rows, visible, channel_major=False, **args)
    np.testing.assert_array_equal(np.asarray(idx_cm), np.asarray(idx_rm))
    np.testing.assert_array_equal(np.asarray(s_cm), np.asarray(s_rm))
    assert np.isfinite(np.asarray(s_cm)).all()
    out = jax.jit(plan.attend, static_argnums=3)(q, cache, qpos, None)
    assert np.isfinite(np.asarray(out, np.float32)).all()

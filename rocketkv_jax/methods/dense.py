"""Dense-attention primitives shared by the methods that keep or attend to every token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..cache import KVCache
from ..models.layers import dense_attention


def keep_all(lengths: jax.Array, K: int, T: int) -> jax.Array:
    """Indices of every prompt token: [B, K, T] int32."""
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (lengths.shape[0], K, T))


def dense_decode_attention(
    q: jax.Array, cache: KVCache, visible: jax.Array
) -> jax.Array:
    """Dense attention of one decode query over the visible slots. q [B, H, D],
    visible [B, K, C] bool -> [B, H, D]."""
    out = dense_attention(q[:, :, None], cache.k, cache.v, visible[:, :, None, :])
    return out[:, :, 0]

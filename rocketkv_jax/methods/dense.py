"""Dense-attention primitives shared by the methods that keep or attend to every token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..cache import KVCache, visible_positions
from ..models.layers import decode_attention, dense_attention


def keep_all(lengths: jax.Array, K: int, T: int) -> jax.Array:
    """Indices of every prompt token: [B, K, T] int32."""
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (lengths.shape[0], K, T))


def dense_decode_attention(
    q: jax.Array, cache: KVCache, visible: jax.Array, attention: str = "blockwise"
) -> jax.Array:
    """Dense attention of one decode query over the visible slots. q [B, H, D],
    visible [B, K, C] bool -> [B, H, D].

    attention: "blockwise" streams the cache once (`decode_attention`); "reference" is
    the materialised [B, H, C] softmax (`dense_decode_attention_reference`), kept as the
    baseline of tests and benchmarks.
    """
    if attention == "reference":
        return dense_decode_attention_reference(q, cache, visible)
    if attention != "blockwise":
        raise ValueError(f"dense decode attention {attention!r}: use 'blockwise' or "
                         "'reference'")
    return decode_attention(q, cache.k, cache.v, visible)


def dense_decode_attention_stacked(
    q: jax.Array, stack: KVCache, layer, query_pos: jax.Array, sliding_window: int | None,
    attention: str = "blockwise",
) -> jax.Array:
    """`dense_decode_attention` over every visible slot of layer `layer` of a stacked
    cache (leading layer axis), reading the layer's keys and values where they lie. The
    reference slices the layer out first, as every dense step did before."""
    visible = visible_positions(stack.pos[layer], query_pos, sliding_window)
    if attention == "blockwise":
        return decode_attention(q, stack.k, stack.v, visible, layer=layer)
    return dense_decode_attention(q, jax.tree.map(lambda a: a[layer], stack), visible,
                                  attention)


def dense_decode_attention_reference(
    q: jax.Array, cache: KVCache, visible: jax.Array
) -> jax.Array:
    """`dense_attention` with one query: scores [B, H, C], softmax, weighted values. On
    XLA:CPU the scores' dot transposes the whole key cache first, so it reads the keys
    three times (`decode_attention` reads them once)."""
    out = dense_attention(q[:, :, None], cache.k, cache.v, visible[:, :, None, :])
    return out[:, :, 0]

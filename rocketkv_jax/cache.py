"""The KV cache pytree and the pure functions that fill it.

One `KVCache` holds one layer (the model stacks layers on a leading axis). Its capacity
C is static; how many slots are filled is data (`length`). Keys are stored after RoPE,
so a kept token keeps its original position without re-rotation; `pos` remembers that
position for masks (sliding window, streaming sinks) and for debugging selections.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer KV cache. Shapes (without the optional leading layer axis):

    k, v:      [B, K, C, D]  keys (RoPE applied) and values; empty slots are zero
    pos:       [B, K, C]     int32 original token position, -1 for an empty slot
    length:    [B]           int32 filled slots per row (the same for every KV head)
    page_max:  [B, K, P, D]  element-wise max of K over each page (-inf where empty)
    page_min:  [B, K, P, D]  element-wise min of K over each page (+inf where empty)
    P = C // page_size for methods that keep page metadata, else P = 0.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    page_max: jax.Array
    page_min: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[-2]

    @property
    def page_size(self) -> int:
        """Tokens per page, 0 when the cache keeps no page metadata."""
        P = self.page_max.shape[-2]
        return self.capacity // P if P else 0


def page_bounds(k: jax.Array, pos: jax.Array, page_size: int) -> tuple[jax.Array, jax.Array]:
    """Element-wise key max/min per page. k [B, K, C, D], pos [B, K, C] -> 2 x [B, K, P, D]."""
    B, K, C, D = k.shape
    if page_size == 0:
        empty = jnp.zeros((B, K, 0, D), k.dtype)
        return empty, empty
    if C % page_size:
        raise ValueError(f"cache capacity {C} is not a multiple of the page size {page_size}")
    filled = (pos >= 0)[..., None]  # [B, K, C, 1]
    pages = (B, K, C // page_size, page_size, D)
    kmax = jnp.where(filled, k, -jnp.inf).reshape(pages).max(axis=3)  # [B, K, P, D]
    kmin = jnp.where(filled, k, jnp.inf).reshape(pages).min(axis=3)  # [B, K, P, D]
    return kmax, kmin


def cache_from_prompt(
    k: jax.Array,
    v: jax.Array,
    keep: jax.Array,
    keep_length: jax.Array,
    capacity: int,
    page_size: int = 0,
) -> KVCache:
    """Build a cache holding the kept prompt tokens, compacted to the front.

    k, v: [B, K, T, D] prompt keys/values (right-padded, token t at position t).
    keep: [B, K, n] int32 ascending prompt indices to keep; entries at or beyond
      keep_length[b] are ignored. keep_length: [B] int32, at most n and capacity.
    Returns a KVCache of capacity C = capacity with `length = keep_length`.
    """
    B, K, T, D = k.shape
    n = keep.shape[-1]
    if n > capacity:
        raise ValueError(f"cannot keep {n} tokens in a cache of capacity {capacity}")
    slot = jnp.arange(n)
    filled = slot[None, None, :] < keep_length[:, None, None]  # [B, 1, n]
    idx = jnp.clip(keep, 0, T - 1)
    kk = jnp.take_along_axis(k, idx[..., None], axis=2)  # [B, K, n, D]
    vv = jnp.take_along_axis(v, idx[..., None], axis=2)  # [B, K, n, D]
    kk = jnp.where(filled[..., None], kk, 0)
    vv = jnp.where(filled[..., None], vv, 0)
    pos = jnp.where(filled, keep, -1).astype(jnp.int32)  # [B, K, n]
    pad = capacity - n
    kk = jnp.pad(kk, ((0, 0), (0, 0), (0, pad), (0, 0)))
    vv = jnp.pad(vv, ((0, 0), (0, 0), (0, pad), (0, 0)))
    pos = jnp.pad(pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    kmax, kmin = page_bounds(kk, pos, page_size)
    return KVCache(kk, vv, pos, keep_length.astype(jnp.int32), kmax, kmin)


def append_token(cache: KVCache, k: jax.Array, v: jax.Array, position: jax.Array) -> KVCache:
    """Write one new token per row at slot `length` and keep its page's max/min current.

    k, v: [B, K, D]; position: [B] int32. The caller sizes the cache so it never
    overflows (generate reserves max_new_tokens slots).
    """
    C = cache.capacity
    slot = jnp.minimum(cache.length, C - 1)  # [B]
    # one dynamic_update_slice per row (vmapped): a scatter whose window is the token's
    # [K, 1, D] row, so XLA updates the cache in place without relayouting it
    write = jax.vmap(lambda buf, x, s: jax.lax.dynamic_update_slice_in_dim(buf, x, s, axis=1))
    new_k = write(cache.k, k[:, :, None].astype(cache.k.dtype), slot)  # [B, K, C, D]
    new_v = write(cache.v, v[:, :, None].astype(cache.v.dtype), slot)  # [B, K, C, D]
    pos = jnp.broadcast_to(position.astype(jnp.int32)[:, None, None], cache.pos.shape[:2] + (1,))
    new_pos = write(cache.pos, pos, slot)  # [B, K, C]
    page_max, page_min = cache.page_max, cache.page_min
    if cache.page_size:
        page = slot // cache.page_size  # [B]
        read = jax.vmap(lambda buf, p: jax.lax.dynamic_slice_in_dim(buf, p, 1, axis=1))
        kf = k[:, :, None].astype(page_max.dtype)  # [B, K, 1, D]
        page_max = write(page_max, jnp.maximum(read(page_max, page), kf), page)
        page_min = write(page_min, jnp.minimum(read(page_min, page), kf), page)
    return KVCache(new_k, new_v, new_pos, cache.length + 1, page_max, page_min)


def visible_slots(
    cache: KVCache, query_pos: jax.Array, sliding_window: int | None
) -> jax.Array:
    """Slots the decode query at query_pos [B] may attend: bool [B, K, C]."""
    q = query_pos[:, None, None]
    mask = (cache.pos >= 0) & (cache.pos <= q)
    if sliding_window is not None:
        mask &= (q - cache.pos) < sliding_window
    return mask

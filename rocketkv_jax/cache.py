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

from .partitioned import write_column, write_rows


def _axes(*names: str):
    """A cache field whose per-layer dims have these logical axes (`sharding.ShardingRules`
    maps them to mesh axes; a stacked cache's leading layer axes come before them)."""
    return dataclasses.field(metadata={"axes": names})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer KV cache. Shapes (without the optional leading layer axis):

    k, v:      [B, K, C, D]  keys (RoPE applied) and values; empty slots are zero
    pos:       [B, K, C]     int32 original token position, -1 for an empty slot
    length:    [B]           int32 filled slots per row (the same for every KV head)
    page_max:  [B, K, P, D]  element-wise max of K over each page (-inf where empty)
    page_min:  [B, K, P, D]  element-wise min of K over each page (+inf where empty)
    P = C // page_size for methods that keep page metadata, else P = 0. The stage-2 plans
    (hybrid, rocketkv) store them channel-major, [B, K, D, P], so that reading R of the D
    channels reads R contiguous runs of pages; the plan knows its layout (`page_size`
    below is the row-major one's).
    """

    k: jax.Array = _axes("batch", "kv_heads", "slots", "head_dim")
    v: jax.Array = _axes("batch", "kv_heads", "slots", "head_dim")
    pos: jax.Array = _axes("batch", "kv_heads", "slots")
    length: jax.Array = _axes("batch")
    # channel-major swaps the last two; neither is split
    page_max: jax.Array = _axes("batch", "kv_heads", "pages", "head_dim")
    page_min: jax.Array = _axes("batch", "kv_heads", "pages", "head_dim")

    @classmethod
    def logical_axes(cls) -> dict[str, tuple[str, ...]]:
        """Field name -> logical axes of its per-layer dims."""
        return {f.name: f.metadata["axes"] for f in dataclasses.fields(cls)}

    @property
    def capacity(self) -> int:
        return self.k.shape[-2]

    @property
    def page_size(self) -> int:
        """Tokens per page, 0 when the cache keeps no page metadata."""
        P = self.page_max.shape[-2]
        return self.capacity // P if P else 0


def page_bounds(
    k: jax.Array, pos: jax.Array, page_size: int, channel_major: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Element-wise key max/min per page. k [B, K, C, D], pos [B, K, C] -> 2 x [B, K, P, D]
    ([B, K, D, P] with `channel_major`; page_size 0 gives empty [B, K, 0, D] either way)."""
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
    if channel_major:
        return jnp.swapaxes(kmax, 2, 3), jnp.swapaxes(kmin, 2, 3)  # [B, K, D, P]
    return kmax, kmin


def cache_from_prompt(
    k: jax.Array,
    v: jax.Array,
    keep: jax.Array,
    keep_length: jax.Array,
    capacity: int,
    page_size: int = 0,
    channel_major: bool = False,
) -> KVCache:
    """Build a cache holding the kept prompt tokens, compacted to the front.

    k, v: [B, K, T, D] prompt keys/values (right-padded, token t at position t).
    keep: [B, K, n] int32 ascending prompt indices to keep; entries at or beyond
      keep_length[b] are ignored. keep_length: [B] int32, at most n and capacity.
    Returns a KVCache of capacity C = capacity with `length = keep_length`, page metadata
    of `page_size` (none for 0), channel-major [B, K, D, P] when `channel_major`.
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
    kmax, kmin = page_bounds(kk, pos, page_size, channel_major)
    return KVCache(kk, vv, pos, keep_length.astype(jnp.int32), kmax, kmin)


def append_token(
    cache: KVCache,
    k: jax.Array,
    v: jax.Array,
    position: jax.Array,
    layer: jax.Array | int | None = None,
    channel_major: bool = False,
) -> KVCache:
    """Write one new token per row at slot `length` and keep its page's max/min current.

    k, v: [B, K, D]; position: [B] int32. With `layer` (a traced or static index), `cache`
    is the stacked cache of all layers (leading layer axis) and only that layer's slot is
    written, in place inside the decode layer loop, so a step touches the cache only where
    attention reads it. Without `layer`, `cache` is one layer's. The caller sizes the cache
    so it never overflows (generate reserves max_new_tokens slots). `channel_major`: the
    page metadata is [.., D, P] (the stage-2 plans' layout, see KVCache).
    """
    if layer is None:
        stacked = jax.tree.map(lambda a: a[None], cache)
        out = append_token(stacked, k, v, position, 0, channel_major)
        return jax.tree.map(lambda a: a[0], out)
    C = cache.capacity
    slot = jnp.minimum(cache.length[layer], C - 1)  # [B]
    layer = jnp.asarray(layer, jnp.int32)

    def write(buf, x, index, combine="set"):  # buf [L, B, K, S, ...], x [B, K, ...]
        x5 = x.astype(buf.dtype).reshape(x.shape[:2] + (-1,))  # [B, K, E]
        buf5 = buf.reshape(buf.shape[:4] + (-1,))  # [L, B, K, S, E]
        return write_rows(buf5, x5, layer, index, combine).reshape(buf.shape)

    new_k = write(cache.k, k, slot)  # [L, B, K, C, D]
    new_v = write(cache.v, v, slot)
    pos = jnp.broadcast_to(position.astype(jnp.int32)[:, None], k.shape[:2])  # [B, K]
    new_pos = write(cache.pos, pos, slot)  # [L, B, K, C]
    page_max, page_min = cache.page_max, cache.page_min
    if channel_major and page_max.size:  # (no metadata is [.., 0, D] in either layout)
        page = slot // (C // page_max.shape[-1])  # [B]
        page_max = write_column(page_max, k, layer, page, "max")
        page_min = write_column(page_min, k, layer, page, "min")
    elif not channel_major and cache.page_size:
        page = slot // cache.page_size  # [B]
        page_max = write(page_max, k, page, "max")
        page_min = write(page_min, k, page, "min")
    length = cache.length.at[layer].add(1)
    return KVCache(new_k, new_v, new_pos, length, page_max, page_min)


def visible_slots(
    cache: KVCache, query_pos: jax.Array, sliding_window: int | None
) -> jax.Array:
    """Slots the decode query at query_pos [B] may attend: bool [B, K, C]."""
    return visible_positions(cache.pos, query_pos, sliding_window)


def visible_positions(
    pos: jax.Array, query_pos: jax.Array, sliding_window: int | None
) -> jax.Array:
    """`visible_slots` from the slots' positions pos [B, K, C] (-1: empty)."""
    q = query_pos[:, None, None]
    mask = (pos >= 0) & (pos <= q)
    if sliding_window is not None:
        mask &= (q - pos) < sliding_window
    return mask


def tree_bytes(tree) -> int:
    """Bytes of a pytree of arrays or shape structs (a cache, its stand-in, a state)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))

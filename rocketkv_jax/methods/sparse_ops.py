"""Sparse decode attention shared by the methods that select tokens: quest, sparq, hybrid,
rocketkv and topk.

The contract: a sparse plan writes only its selection,

    select(q, cache, visible) -> indices [B, K, M] int32

the cache slots each KV head attends, shared by its G query heads, -1 for none (q [B, H, D],
visible [B, K, C] bool). Gathering and attending on them is shared: `attend_selected`, and
the `SelectsSlots` plan mixin, whose `attend` is visible slots -> `select` ->
`attend_selected`. (`stage2.select_tokens` turns per-slot scores into such indices.)

The two primitives that have GPU kernels are plugged in here, behind the plan's `kernels`
backend name (one of `names.KERNEL_BACKENDS`; the choice itself is made in
`kernels/backend.py`): `approx_scores` (per-page upper bound of q.k on R of the D channels)
and `sparse_decode_attention` (exact attention on gathered slot indices), with the
contracts of `kernels/approx_scores.py` and `kernels/sparse_decode_attention.py`.
`jax.lax.top_k` stays in XLA either way (Pallas-Triton has no sort).
"""

from __future__ import annotations

import jax

from .. import kernels as kernel_lib
from ..cache import KVCache, visible_slots
from ..kernels.backend import check_backend_name


def check_kernels(name: str, kernels: str) -> None:
    """Raise ValueError unless `kernels` names a backend (`kernels.backend.check_backend_name`),
    where a method is built, before anything is traced."""
    check_backend_name(kernels, name)


def approx_scores(
    q: jax.Array,
    page_max: jax.Array,
    page_min: jax.Array,
    channels: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    kernels: str = "auto",
    channel_major: bool = False,
) -> jax.Array:
    """Stage-2 approximate page scores.

    q [B, K, G, D]; page_max, page_min [B, K, P, D] ([B, K, D, P] if `channel_major`);
    channels [B, K, R] int32;
    lengths [B] int32 filled slots per row. Returns [B, K, G, P] float32, -inf for pages
    with no filled slot (never NaN).
    """
    check_kernels("approx_scores", kernels)
    return kernel_lib.approx_scores(
        q, page_max, page_min, channels, lengths, page_size=page_size, kernels=kernels,
        channel_major=channel_major,
    )


def sparse_decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, *, kernels: str = "auto"
) -> jax.Array:
    """Exact attention of each group's queries on its selected slots.

    q [B, K, G, D]; k, v [B, K, C, D]; indices [B, K, M] int32 slot indices, -1 = none.
    Returns [B, K, G, D] in q's dtype; a head with no selected slot gets zeros.
    """
    check_kernels("sparse_decode_attention", kernels)
    return kernel_lib.sparse_decode_attention(q, k, v, indices, kernels=kernels)


def group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """q [B, H, D] -> [B, K, G, D] (query heads k*G .. k*G + G - 1 share KV head k)."""
    B, H, D = q.shape
    return q.reshape(B, num_kv_heads, H // num_kv_heads, D)


def attend_selected(
    q: jax.Array, cache: KVCache, indices: jax.Array, *, kernels: str = "auto"
) -> jax.Array:
    """The gather-and-attend of every sparse method: exact attention of each query head on
    the slots its KV head selected. q [B, H, D]; indices [B, K, M] int32, -1 = none ->
    [B, H, D] in q's dtype (zeros for a head with no selected slot)."""
    qg = group_queries(q, cache.k.shape[1])  # [B, K, G, D]
    out = sparse_decode_attention(qg, cache.k, cache.v, indices, kernels=kernels)
    return out.reshape(q.shape)  # [B, H, D]


class SelectsSlots:
    """Plan mixin of the sparse methods: the plan writes `select(q, cache, visible) ->
    indices [B, K, M]` (-1 = none) and has a `kernels` backend name; `attend` is shared."""

    kernels: str

    def select(self, q: jax.Array, cache: KVCache, visible: jax.Array) -> jax.Array:
        """q [B, H, D]; visible [B, K, C] bool -> [B, K, M] int32 slots, -1 = none."""
        raise NotImplementedError

    def attend(self, q, cache: KVCache, query_pos, sliding_window) -> jax.Array:
        """q [B, H, D] -> [B, H, D]: exact attention on the selected slots."""
        visible = visible_slots(cache, query_pos, sliding_window)  # [B, K, C]
        indices = self.select(q, cache, visible)  # [B, K, M]
        return attend_selected(q, cache, indices, kernels=self.kernels)

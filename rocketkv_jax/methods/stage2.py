"""Stage 2: hybrid sparse decode attention (SparQ's head reduction x Quest's page bounds).

Every decode step, per layer and KV head: keep the R channels where the group's queries
are largest, bound q.k per page of `page_size` cached tokens from the page's key max/min
on those channels (one of the two per channel, by the sign of the group's summed query),
turn the bounds into approximate probabilities with SparQ's temperature, pick the
`k_top` tokens with the highest group-mean probability and attend exactly on them.

`TwoStagePlan` serves both `hybrid` (stage 2 on the uncompressed cache) and `rocketkv`
(stage-1 SnapKV++ first): its `select` is `hybrid_select`, and gathering and attending on
the selection is the shared `sparse_ops.attend_selected`. The stage-2 settings both
methods resolve (`resolve_page_and_channels`, `check_stage2_overrides`) live here too.

With page_size 1 the page bounds are the keys themselves, so the cache keeps no separate
page metadata and the keys are passed as both bounds. Larger pages keep their max/min
channel-major, [B, K, D, P]: the R channels stage 2 reads are R contiguous runs of pages
(row-major [B, K, P, D] would scatter them over every page's row).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ..cache import KVCache, append_token, visible_slots
from ..models.layers import NEG_INF
from ..partitioned import top_k  # lax.top_k that stays local to each KV head's device
from .base import (
    NO_KERNELS,
    AppendsTokens,
    cached_tokens,
    check_page_size,
    check_positive_int,
    check_top_r,
)
from .dense import dense_decode_attention, dense_decode_attention_stacked
from .sparse_ops import SelectsSlots, approx_scores, check_kernels, group_queries
from .stage1 import compress_prompt


def resolve_page_and_channels(
    name: str, c2: float, head_dim: int, page_size: int | None, top_r: int | None,
    default: tuple[int, int],
) -> tuple[int, int]:
    """(page, r): the derived `default` unless overridden. An explicit page size re-derives
    r = int(D * page / c2) (clamped to [1, D]); an explicit top_r wins over both."""
    page, r = default
    if page_size is not None:
        page = page_size
        r = min(max(int(head_dim * page / c2), 1), head_dim)
    if top_r is not None:
        check_top_r(name, top_r, head_dim)
        r = top_r
    return page, r


def check_stage2_overrides(name: str, page_size, top_r, kernels: str) -> None:
    """Raise unless the optional stage-2 overrides of `hybrid` / `rocketkv` can work."""
    if page_size is not None:
        check_page_size(name, page_size)
    if top_r is not None:
        check_positive_int(name, "top_r", top_r)
    check_kernels(name, kernels)


def select_channels(qg: jax.Array, top_r: int) -> jax.Array:
    """The top_r channels of largest mean_g |q| per KV head: qg [B, K, G, D] -> [B, K, R]."""
    B, K, _, D = qg.shape
    if top_r >= D:
        return jnp.broadcast_to(jnp.arange(D, dtype=jnp.int32), (B, K, D))
    magnitude = jnp.abs(qg.astype(jnp.float32)).mean(axis=2)  # [B, K, D]
    return top_k(magnitude, top_r)[1].astype(jnp.int32)  # [B, K, R]


def sparq_temperature(qg: jax.Array, channels: jax.Array) -> jax.Array:
    """SparQ's softmax temperature sqrt(D * sum|q[channels]| / sum|q|): [B, K, G] f32."""
    D = qg.shape[-1]
    q_abs = jnp.abs(qg.astype(jnp.float32))  # [B, K, G, D]
    kept = jnp.take_along_axis(q_abs, channels[:, :, None, :], axis=-1).sum(-1)  # [B, K, G]
    total = jnp.maximum(q_abs.sum(-1), jnp.finfo(jnp.float32).tiny)  # [B, K, G]
    return jnp.sqrt(D * kept / total)


def approximate_probabilities(
    qg: jax.Array,
    cache: KVCache,
    visible: jax.Array,
    channels: jax.Array,
    *,
    page_size: int,
    kernels: str,
    channel_major: bool = True,
) -> jax.Array:
    """Stage-2 approximate attention probabilities over the cache slots.

    qg [B, K, G, D]; visible [B, K, C] bool; channels [B, K, R] int32. page_size 1 scores
    the keys themselves (no page metadata needed); otherwise the cache's page metadata is
    [B, K, D, P] (`channel_major`, the plans' layout) or [B, K, P, D]. Returns s_hat
    [B, K, G, C] float32, exactly 0 on slots that are not visible.
    """
    if page_size == 1:
        page_max = page_min = cache.k  # [B, K, C, D]
        channel_major = False
    else:
        page_max, page_min = cache.page_max, cache.page_min  # [B, K, D, P]
    approx = approx_scores(
        qg, page_max, page_min, channels, cache.length, page_size=page_size, kernels=kernels,
        channel_major=channel_major,
    )  # [B, K, G, P]
    approx = jnp.repeat(approx, page_size, axis=-1)  # [B, K, G, C]
    logits = approx / sparq_temperature(qg, channels)[..., None]
    logits = jnp.where(visible[:, :, None, :], logits, NEG_INF)  # [B, K, G, C]
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(visible[:, :, None, :], probs, 0.0)


def select_tokens(token_scores: jax.Array, visible: jax.Array, k_top: int) -> jax.Array:
    """The k_top visible slots with the highest scores, shared by the group.

    token_scores [B, K, C] float32, visible [B, K, C] bool (k_top <= C). Returns
    [B, K, k_top] int32 slot indices in descending score order, -1 where fewer than k_top
    slots are visible. Ties go to the lower slot (lax.top_k).
    """
    key = jnp.where(visible, token_scores, -jnp.inf)  # [B, K, C]
    _, idx = top_k(key, k_top)  # [B, K, k_top]
    chosen = jnp.take_along_axis(visible, idx, axis=-1)  # [B, K, k_top]
    return jnp.where(chosen, idx, -1).astype(jnp.int32)


def hybrid_select(
    q: jax.Array,
    cache: KVCache,
    visible: jax.Array,
    *,
    page_size: int,
    top_r: int,
    k_top: int,
    kernels: str = "auto",
    channel_major: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Stage-2 selection. q [B, H, D]; visible [B, K, C]; `channel_major`: the layout of the
    cache's page metadata (see `approximate_probabilities`).

    Returns (indices [B, K, k_top] int32 with -1 = none, s_hat [B, K, G, C] float32).
    """
    qg = group_queries(q, cache.k.shape[1])  # [B, K, G, D]
    channels = select_channels(qg, top_r)  # [B, K, R]
    s_hat = approximate_probabilities(
        qg, cache, visible, channels, page_size=page_size, kernels=kernels,
        channel_major=channel_major,
    )  # [B, K, G, C]
    return select_tokens(s_hat.mean(axis=2), visible, k_top), s_hat


@dataclasses.dataclass(frozen=True)
class TwoStagePlan(SelectsSlots, AppendsTokens):
    """Resolved plan of `hybrid` and `rocketkv`.

    prompt_budget: prompt tokens stage 1 keeps; >= prompt_len means no stage 1 (hybrid,
      or a prompt that already fits).
    page_size, top_r, k_top: stage-2 sequence reduction, head reduction, exact tokens.
    stage2_dense: stage 2 attends densely over the (stage-1) cache, because
      `fallback` says so: "k_top" (k_top covers every slot the cache can ever hold),
      "cost" (the cost model of `cost.py` says selection costs more than dense), "off"
      (stage2="off"); "" when stage 2 is sparse.
    """

    name: str
    capacity: int
    prompt_len: int
    token_budget: int
    head_dim: int
    prompt_budget: int
    window: int
    kernel_size: int
    page_size: int
    top_r: int
    k_top: int
    stage2_dense: bool
    kernels: str = "auto"
    sliding_window: int | None = None  # the model's (Mistral): stage 1 scores within it
    fallback: str = ""

    @property
    def cache_page_size(self) -> int:
        """Page size of the cache's max/min metadata (0: none, page 1 reads the keys)."""
        return 0 if self.page_size == 1 or self.stage2_dense else self.page_size

    @property
    def query_window(self) -> int:
        """Stage 1 scores with each row's last `window` queries."""
        return self.window

    def compress(self, k, v, q, lengths) -> KVCache:
        """k, v [B, K, T, D]; q [B, H, window, D], each row's last queries; lengths [B]
        -> cache (+ page metadata)."""
        return compress_prompt(
            k, v, q, lengths, budget=self.prompt_budget, window=self.window,
            kernel_size=self.kernel_size, pool="max", capacity=self.capacity,
            page_size=self.cache_page_size, sliding_window=self.sliding_window,
            channel_major=True,
        )

    def append(self, cache: KVCache, k, v, position, layer=None) -> KVCache:
        """As every plan's append, with the page max/min kept channel-major."""
        return append_token(cache, k, v, position, layer, channel_major=True)

    def select(self, q, cache: KVCache, visible) -> jax.Array:
        """q [B, H, D]; visible [B, K, C] -> the k_top slots of `hybrid_select` [B, K, k_top]."""
        idx, _ = hybrid_select(
            q, cache, visible, page_size=self.page_size, top_r=self.top_r,
            k_top=self.k_top, kernels=self.kernels,
        )
        return idx

    def attend(self, q, cache: KVCache, query_pos, sliding_window) -> jax.Array:
        """q [B, H, D] -> [B, H, D]: exact attention on the k_top selected slots, or dense
        over the cache where stage 2 falls back (`stage2_dense`)."""
        if self.stage2_dense:
            return dense_decode_attention(q, cache, visible_slots(cache, query_pos,
                                                                  sliding_window))
        return super().attend(q, cache, query_pos, sliding_window)

    def attend_stacked(self, q, stack: KVCache, layer, query_pos, sliding_window) -> jax.Array:
        """`attend` on layer `layer` of the stacked cache: the dense fallback reads it where
        it lies; stage 2 gathers from this layer's slice."""
        if self.stage2_dense:
            return dense_decode_attention_stacked(q, stack, layer, query_pos, sliding_window)
        cache = jax.tree.map(lambda a: a[layer], stack)
        return self.attend(q, cache, query_pos, sliding_window)

    def read_tokens(self, context: int) -> int:
        """Tokens' worth (2 * D elements each) read per step per KV head: R of D channels
        of one bound per page for scoring, plus K and V of k_top tokens."""
        cached = cached_tokens(context, self.prompt_len, self.prompt_budget)
        if self.stage2_dense:
            return cached
        pages = -(-cached // self.page_size)
        scoring = math.ceil(pages * self.top_r / (2 * self.head_dim))
        return scoring + min(self.k_top, cached)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "dense": False,
                "stage2_path": "dense" if self.stage2_dense else "sparse",
                "kernels": NO_KERNELS if self.stage2_dense else self.kernels}

"""`sparq`: SparQ attention on the uncompressed cache.

r = int(D * M / (2 L)) channels (clamped to [1, D]; S = L at plan time) with the largest
|q| summed over the group score every token approximately, q[r] . k[r], with SparQ's
temperature sqrt(D * sum|q[r]| / sum|q|). The k_top = M // 2 tokens with the highest
group-mean approximate probability are attended exactly, and the output is
alpha * attn(selected) + (1 - alpha) * mean(V), alpha = the approximate probability mass
of the selected tokens per query head, mean(V) over the visible tokens. When M >= L the
method is exact dense attention (`DensePlan`).

The approximate scores go through the stage-2 `approx_scores` with page size 1 and the
keys as both page bounds: sign(q) picks k for both, so the bound is q[r] . k[r] exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from ..cache import KVCache, visible_slots
from ..kernels.backend import resolve_backend
from ..models.layers import masked_mean
from .base import (
    DensePlan,
    KeepsEveryToken,
    check_positive_int,
    check_token_budget,
    check_top_r,
    round_capacity,
)
from .cost import (
    check_stage2,
    constants_for,
    dense_bytes,
    dense_reason,
    mean_slots,
    sparq_bytes,
)
from .sparse_ops import SelectsSlots, attend_selected, check_kernels, group_queries
from .stage2 import hybrid_select


def sparq_attend(
    q: jax.Array,
    cache: KVCache,
    visible: jax.Array,
    *,
    top_r: int,
    k_top: int,
    kernels: str = "auto",
    v_mean: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SparQ decode attention. q [B, H, D]; visible [B, K, C] bool; v_mean: mean(V) over
    the visible slots [B, K, D] float32 where the caller has read it (`attend_stacked`),
    else it is read from `cache.v` (`masked_mean`).

    Returns (out [B, H, D] in q's dtype, indices [B, K, k_top] int32 (-1 = none),
    alpha [B, K, G] float32).
    """
    B, H, D = q.shape
    K = cache.k.shape[1]
    idx, s_hat = hybrid_select(
        q, cache, visible, page_size=1, top_r=top_r, k_top=k_top, kernels=kernels
    )  # [B, K, k_top], [B, K, G, C]
    chosen = (idx >= 0)[:, :, None, :]  # [B, K, 1, k_top]
    mass = jnp.take_along_axis(s_hat, jnp.maximum(idx, 0)[:, :, None, :], axis=-1)
    alpha = jnp.where(chosen, mass, 0.0).sum(-1)  # [B, K, G]
    attn = group_queries(attend_selected(q, cache, idx, kernels=kernels), K)  # [B, K, G, D]
    if v_mean is None:
        v_mean = masked_mean(cache.v, visible)  # [B, K, D]
    a = alpha[..., None]  # [B, K, G, 1]
    out = a * attn.astype(jnp.float32) + (1.0 - a) * v_mean[:, :, None, :]  # [B, K, G, D]
    return out.reshape(B, H, D).astype(q.dtype), idx, alpha


@dataclasses.dataclass(frozen=True)
class SparQPlan(SelectsSlots, KeepsEveryToken):
    """Resolved SparQ plan: top_r channels for the approximate scores, k_top exact tokens.
    Its `attend` mixes the attention on the selection with mean(V) (`sparq_attend`)."""

    name: str
    capacity: int
    prompt_len: int
    token_budget: int
    head_dim: int
    top_r: int
    k_top: int
    kernels: str = "auto"

    def select(self, q, cache: KVCache, visible) -> jax.Array:
        """q [B, H, D]; visible [B, K, C] -> the k_top slots [B, K, k_top] (stage 2's
        selection with page size 1: approximate scores from the keys themselves)."""
        idx, _ = hybrid_select(q, cache, visible, page_size=1, top_r=self.top_r,
                               k_top=self.k_top, kernels=self.kernels)
        return idx

    def attend(self, q, cache: KVCache, query_pos, sliding_window) -> jax.Array:
        """q [B, H, D] -> [B, H, D]: alpha * attention on the selection + (1 - alpha) *
        mean(V) (`sparq_attend`)."""
        visible = visible_slots(cache, query_pos, sliding_window)  # [B, K, C]
        out, _, _ = sparq_attend(
            q, cache, visible, top_r=self.top_r, k_top=self.k_top, kernels=self.kernels
        )
        return out

    def attend_stacked(self, q, stack: KVCache, layer, query_pos, sliding_window) -> jax.Array:
        """`attend` on layer `layer` of the stacked cache. mean(V) reads the layer's values
        where they lie (`masked_mean`); the selection and the gather read the layer's slice,
        which XLA fuses into them."""
        cache = jax.tree.map(lambda a: a[layer], stack)
        visible = visible_slots(cache, query_pos, sliding_window)  # [B, K, C]
        out, _, _ = sparq_attend(
            q, cache, visible, top_r=self.top_r, k_top=self.k_top, kernels=self.kernels,
            v_mean=masked_mean(stack.v, visible, layer=layer))
        return out

    def read_tokens(self, context: int) -> int:
        """r of D key channels of every token, plus K and V of k_top tokens. mean(V) is not
        counted: SparQ keeps it as a running mean (this jnp version recomputes it)."""
        return math.ceil(context * self.top_r / (2 * self.head_dim)) + min(self.k_top, context)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "dense": False}


@dataclasses.dataclass(frozen=True)
class SparQ:
    """SparQ attention. Optional `top_r` overrides the derived channel count. stage2: "auto"
    attends densely where the selection would cost more than that (`cost.py`), "on" /
    "off" force it."""

    token_budget: int
    top_r: int | None = None
    kernels: str = "auto"
    stage2: str = "auto"
    name: ClassVar[str] = "sparq"

    def __post_init__(self) -> None:
        check_token_budget(self.name, self.token_budget)
        if self.top_r is not None:
            check_positive_int(self.name, "top_r", self.top_r)
        check_kernels(self.name, self.kernels)
        check_stage2(self.name, self.stage2)

    def plan(self, config, prompt_len: int, max_new_tokens: int):
        M, L, D = self.token_budget, prompt_len + max_new_tokens, config.head_dim
        if self.top_r is not None:
            check_top_r(self.name, self.top_r, D)
        if M >= L:
            return DensePlan(self.name, round_capacity(L), prompt_len, M)
        r = self.top_r if self.top_r is not None else min(max(int(D * M / (2 * L)), 1), D)
        k_top = max(1, M // 2)
        kernels = resolve_backend(self.kernels)
        reason = dense_reason(self.stage2, 0.0, 0.0)  # "on" / "off" need no estimate
        if self.stage2 == "auto":
            slots = mean_slots(prompt_len, max_new_tokens)
            sparse = sparq_bytes(slots, D, config.num_heads // config.num_kv_heads, r, k_top,
                                 constants_for(kernels))
            reason = dense_reason(self.stage2, sparse, dense_bytes(slots, D))
        if reason:
            return DensePlan(self.name, round_capacity(L), prompt_len, M, reason)
        return SparQPlan(self.name, round_capacity(L), prompt_len, M, D, r, k_top, kernels)

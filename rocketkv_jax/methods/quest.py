"""`quest`: query-aware page selection (Quest) on the uncompressed cache.

Per query head, page p gets the upper bound sum_i max(q_i * kmax_i, q_i * kmin_i) of q.k
over its tokens. Quest's own code is per-head MHA; for GQA the bounds are summed over the
G query heads of each KV head so the whole group shares one page selection (as RocketKV
does for its baselines). The top M // page_size pages are attended exactly. When M >= L
the method is exact dense attention (`DensePlan`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from ..cache import KVCache
from ..kernels.backend import resolve_backend
from ..partitioned import top_k  # lax.top_k that stays local to each KV head's device
from .base import (
    DensePlan,
    KeepsEveryToken,
    MethodConfigError,
    check_page_size,
    check_token_budget,
    round_capacity,
)
from .cost import (
    check_stage2,
    constants_for,
    dense_bytes,
    dense_reason,
    mean_slots,
    quest_bytes,
)
from .skip_layers import check_skip_layers, with_skip_layers
from .sparse_ops import SelectsSlots, check_kernels, group_queries


def page_upper_bounds(qg: jax.Array, cache: KVCache, page_visible: jax.Array) -> jax.Array:
    """Quest's bound summed over the group: qg [B, K, G, D], page_visible [B, K, P] bool
    -> [B, K, P] float32, -inf on pages with no visible slot.

    max(q*kmax, q*kmin) = relu(q)*kmax + min(q, 0)*kmin because kmax >= kmin, so the bound
    is two matmuls instead of a [B, K, G, P, D] intermediate.
    """
    q32 = qg.astype(jnp.float32)  # [B, K, G, D]
    pv = page_visible[..., None]  # [B, K, P, 1]
    # Empty pages hold -inf/+inf: zero them so 0 * inf cannot make a NaN.
    kmax = jnp.where(pv, cache.page_max.astype(jnp.float32), 0.0)  # [B, K, P, D]
    kmin = jnp.where(pv, cache.page_min.astype(jnp.float32), 0.0)  # [B, K, P, D]
    hi = jax.lax.Precision.HIGHEST
    bound = jnp.einsum("bkgd,bkpd->bkgp", jnp.maximum(q32, 0.0), kmax, precision=hi)
    bound += jnp.einsum("bkgd,bkpd->bkgp", jnp.minimum(q32, 0.0), kmin, precision=hi)
    return jnp.where(page_visible, bound.sum(axis=2), -jnp.inf)  # [B, K, P]


def quest_select(
    q: jax.Array, cache: KVCache, visible: jax.Array, *, page_size: int, num_pages: int
) -> tuple[jax.Array, jax.Array]:
    """Quest's selection. q [B, H, D]; visible [B, K, C] bool.

    Returns (indices [B, K, num_pages * page_size] int32 slots of the chosen pages, -1 for
    slots that are not visible; page_scores [B, K, P] float32).
    """
    B, K, C, _ = cache.k.shape
    P = C // page_size
    page_visible = visible.reshape(B, K, P, page_size).any(axis=-1)  # [B, K, P]
    scores = page_upper_bounds(group_queries(q, K), cache, page_visible)  # [B, K, P]
    _, pages = top_k(scores, num_pages)  # [B, K, n]
    slots = pages[..., None] * page_size + jnp.arange(page_size)  # [B, K, n, page]
    slots = slots.reshape(B, K, num_pages * page_size)  # [B, K, n * page]
    ok = jnp.take_along_axis(visible, slots, axis=-1)  # [B, K, n * page]
    return jnp.where(ok, slots, -1).astype(jnp.int32), scores


@dataclasses.dataclass(frozen=True)
class QuestPlan(SelectsSlots, KeepsEveryToken):
    """Resolved Quest plan: `num_pages` pages of `page_size` tokens attended per step."""

    name: str
    capacity: int
    prompt_len: int
    token_budget: int
    page_size: int
    num_pages: int
    kernels: str = "auto"

    @property
    def metadata_page_size(self) -> int:
        """Quest keeps page max/min for its page upper bounds."""
        return self.page_size

    def select(self, q, cache: KVCache, visible) -> jax.Array:
        """q [B, H, D]; visible [B, K, C] -> the chosen pages' visible slots
        [B, K, num_pages * page_size] (`quest_select`)."""
        idx, _ = quest_select(
            q, cache, visible, page_size=self.page_size, num_pages=self.num_pages
        )
        return idx

    def read_tokens(self, context: int) -> int:
        """Page max + min (one token's worth per page) plus the chosen pages' tokens."""
        pages = -(-context // self.page_size)
        return pages + min(self.num_pages * self.page_size, context)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "dense": False}


@with_skip_layers
@dataclasses.dataclass(frozen=True)
class Quest:
    """Quest with page_size tokens per page (default 16, a power of two); token_budget
    must hold at least one page. stage2: "auto" attends densely where page selection would
    cost more than that (`cost.py`), "on" / "off" force it. skip_layers: leading layers
    kept dense (Quest's code: 2)."""

    token_budget: int
    page_size: int = 16
    kernels: str = "auto"
    stage2: str = "auto"
    skip_layers: int = 0
    name: ClassVar[str] = "quest"

    def __post_init__(self) -> None:
        check_token_budget(self.name, self.token_budget)
        check_skip_layers(self.name, self.skip_layers)
        check_page_size(self.name, self.page_size)
        check_kernels(self.name, self.kernels)
        check_stage2(self.name, self.stage2)
        if self.token_budget < self.page_size:
            raise MethodConfigError(
                f"quest: token_budget ({self.token_budget}) must hold at least one page of "
                f"page_size ({self.page_size}) tokens"
            )

    def plan(self, config, prompt_len: int, max_new_tokens: int):
        M, L = self.token_budget, prompt_len + max_new_tokens
        capacity = round_capacity(L, self.page_size)
        num_pages = M // self.page_size
        if M >= L or num_pages >= capacity // self.page_size:
            return DensePlan(self.name, round_capacity(L), prompt_len, M)
        kernels = resolve_backend(self.kernels)
        reason = dense_reason(self.stage2, 0.0, 0.0)  # "on" / "off" need no estimate
        if self.stage2 == "auto":
            slots, D = mean_slots(prompt_len, max_new_tokens), config.head_dim
            sparse = quest_bytes(slots, D, config.num_heads // config.num_kv_heads,
                                 self.page_size, num_pages, constants_for(kernels))
            reason = dense_reason(self.stage2, sparse, dense_bytes(slots, D))
        if reason:
            return DensePlan(self.name, round_capacity(L), prompt_len, M, reason)
        return QuestPlan(self.name, capacity, prompt_len, M, self.page_size, num_pages,
                         kernels)

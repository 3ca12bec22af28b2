"""`topk`: the oracle. Exact attention probabilities of every cached token, summed over the
GQA group, pick the M // 2 tokens each group attends exactly. It reads every key, so it
is an accuracy ceiling for the sparse methods, not a fast method. When M >= L it is
exact dense attention (`DensePlan`).

`per_head=True` is the official RocketKV code's oracle instead: every query head picks
its own M tokens by its own exact probabilities (no sharing across the GQA group, k = M
rather than M // 2), and attends exactly on them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from ..cache import KVCache, visible_slots
from ..kernels.backend import resolve_backend
from ..models.layers import NEG_INF
from .base import (
    DensePlan,
    KeepsEveryToken,
    MethodConfigError,
    check_token_budget,
    round_capacity,
)
from .sparse_ops import SelectsSlots, check_kernels, group_queries, sparse_decode_attention
from .stage2 import select_tokens


def exact_probabilities(q: jax.Array, cache: KVCache, visible: jax.Array) -> jax.Array:
    """Exact attention probabilities. q [B, H, D]; visible [B, K, C] -> [B, K, G, C] f32,
    0 on slots that are not visible."""
    qg = group_queries(q, cache.k.shape[1]).astype(jnp.float32)  # [B, K, G, D]
    logits = jnp.einsum(
        "bkgd,bkcd->bkgc", qg, cache.k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    ) / jnp.sqrt(jnp.float32(q.shape[-1]))  # [B, K, G, C]
    mask = visible[:, :, None, :]  # [B, K, 1, C]
    probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
    return jnp.where(mask, probs, 0.0)


def topk_select(q: jax.Array, cache: KVCache, visible: jax.Array, k_top: int) -> jax.Array:
    """The k_top slots with the largest exact probability summed over the group:
    q [B, H, D], visible [B, K, C] -> [B, K, k_top] int32 (-1 = none)."""
    probs = exact_probabilities(q, cache, visible)  # [B, K, G, C]
    return select_tokens(probs.sum(axis=2), visible, k_top)


def topk_select_per_head(
    q: jax.Array, cache: KVCache, visible: jax.Array, k_top: int
) -> jax.Array:
    """The k_top slots with the largest exact probability of each query head on its own:
    q [B, H, D], visible [B, K, C] -> [B, K, G, k_top] int32 (-1 = none)."""
    probs = exact_probabilities(q, cache, visible)  # [B, K, G, C]
    B, K, G, C = probs.shape
    vis = jnp.broadcast_to(visible[:, :, None], probs.shape)  # [B, K, G, C]
    idx = select_tokens(probs.reshape(B, K * G, C), vis.reshape(B, K * G, C), k_top)
    return idx.reshape(B, K, G, k_top)


def per_head_attention(
    q: jax.Array, cache: KVCache, idx: jax.Array, kernels: str = "auto"
) -> jax.Array:
    """Exact attention of each query head on its own slots: q [B, H, D], idx [B, K, G, M]
    -> [B, H, D]. Each query head becomes a group of one over a copy of its KV head (the
    shared gather-and-attend code takes one index set per KV head)."""
    B, K, G, M = idx.shape
    k = jnp.repeat(cache.k, G, axis=1)  # [B, H, C, D]
    v = jnp.repeat(cache.v, G, axis=1)  # [B, H, C, D]
    qh = q.reshape(B, K * G, 1, q.shape[-1])  # [B, H, 1, D]
    out = sparse_decode_attention(qh, k, v, idx.reshape(B, K * G, M), kernels=kernels)
    return out.reshape(q.shape)


@dataclasses.dataclass(frozen=True)
class TopKPlan(SelectsSlots, KeepsEveryToken):
    """Resolved oracle plan: k_top exact tokens per KV head (per query head if per_head)."""

    name: str
    capacity: int
    prompt_len: int
    token_budget: int
    k_top: int
    kernels: str = "auto"
    per_head: bool = False

    def select(self, q, cache: KVCache, visible) -> jax.Array:
        """q [B, H, D]; visible [B, K, C] -> the group's k_top slots [B, K, k_top]."""
        return topk_select(q, cache, visible, self.k_top)

    def attend(self, q, cache: KVCache, query_pos, sliding_window) -> jax.Array:
        """q [B, H, D] -> [B, H, D]. per_head: each query head attends its own k_top slots
        (one index set per query head, outside the per-KV-head contract of `select`)."""
        if self.per_head:
            visible = visible_slots(cache, query_pos, sliding_window)  # [B, K, C]
            idx = topk_select_per_head(q, cache, visible, self.k_top)  # [B, K, G, k_top]
            return per_head_attention(q, cache, idx, self.kernels)
        return super().attend(q, cache, query_pos, sliding_window)

    def read_tokens(self, context: int) -> int:
        """Every key (half a token's worth each) plus the values of the k_top tokens
        (per_head: of each query head's k_top, counted once per KV head, a lower bound)."""
        return math.ceil((context + min(self.k_top, context)) / 2)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "dense": False}


@dataclasses.dataclass(frozen=True)
class TopK:
    """Oracle top-k attention: k_top = token_budget // 2 shared by each GQA group
    (default), or with per_head=True the official code's oracle, k_top = token_budget
    per query head."""

    token_budget: int
    kernels: str = "auto"
    per_head: bool = False
    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        check_token_budget(self.name, self.token_budget)
        check_kernels(self.name, self.kernels)
        if not isinstance(self.per_head, bool):
            raise MethodConfigError(
                f"topk: per_head must be True (the official per-query-head oracle, k = M) "
                f"or False (group-shared, k = M // 2), got {self.per_head!r}"
            )

    def plan(self, config, prompt_len: int, max_new_tokens: int):
        M, L = self.token_budget, prompt_len + max_new_tokens
        if M >= L:
            return DensePlan(self.name, round_capacity(L), prompt_len, M)
        k_top = M if self.per_head else max(1, M // 2)
        return TopKPlan(self.name, round_capacity(L), prompt_len, M, k_top,
                        resolve_backend(self.kernels),
                        self.per_head)

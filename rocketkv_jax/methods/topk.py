"""`topk`: the oracle. Exact attention probabilities of every cached token, summed over the
GQA group, pick the M // 2 tokens each group attends exactly. It reads every key, so it
is an accuracy ceiling for the sparse methods, not a fast method. When M >= L it is
exact dense attention (`DensePlan`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from ..cache import KVCache, visible_slots
from ..models.layers import NEG_INF
from .base import DensePlan, KeepsEveryToken, check_token_budget, round_capacity
from .sparse_ops import check_kernels, sparse_decode_attention
from .stage2 import group_queries, select_tokens


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


@dataclasses.dataclass(frozen=True)
class TopKPlan(KeepsEveryToken):
    """Resolved oracle plan: k_top exact tokens per KV head."""

    name: str
    capacity: int
    prompt_len: int
    token_budget: int
    k_top: int
    kernels: str = "reference"

    def attend(self, q, cache: KVCache, query_pos, sliding_window) -> jax.Array:
        """q [B, H, D] -> [B, H, D]."""
        visible = visible_slots(cache, query_pos, sliding_window)  # [B, K, C]
        idx = topk_select(q, cache, visible, self.k_top)  # [B, K, k_top]
        qg = group_queries(q, cache.k.shape[1])  # [B, K, G, D]
        out = sparse_decode_attention(qg, cache.k, cache.v, idx, kernels=self.kernels)
        return out.reshape(q.shape)

    def read_tokens(self, context: int) -> int:
        """Every key (half a token's worth each) plus the values of the k_top tokens."""
        return math.ceil((context + min(self.k_top, context)) / 2)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "dense": False}


@dataclasses.dataclass(frozen=True)
class TopK:
    """Oracle top-k attention with k_top = token_budget // 2."""

    token_budget: int
    kernels: str = "reference"
    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        check_token_budget(self.name, self.token_budget)
        check_kernels(self.name, self.kernels)

    def plan(self, config, prompt_len: int, max_new_tokens: int):
        M, L = self.token_budget, prompt_len + max_new_tokens
        if M >= L:
            return DensePlan(self.name, round_capacity(L), prompt_len, M)
        return TopKPlan(self.name, round_capacity(L), prompt_len, M, max(1, M // 2),
                        self.kernels)

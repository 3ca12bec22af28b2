"""`streaming` (StreamingLLM): attention sinks plus a recent window.

Compress keeps each row's first `sinks` prompt tokens and its most recent M - sinks. At
decode the cache keeps growing by the generated tokens, but attention reads only the
first `sinks` slots and the most recent M - sinks slots (slots stay in position order,
so these are the sink tokens and the newest tokens). When M >= L nothing is ever left
out, i.e. exact dense attention (`DensePlan`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from ..cache import KVCache, cache_from_prompt, visible_slots
from .base import (
    NO_KERNELS,
    AppendsTokens,
    DensePlan,
    MethodConfigError,
    check_token_budget,
    round_capacity,
)
from .dense import dense_decode_attention, keep_all


def streaming_keep(
    lengths: jax.Array, K: int, *, budget: int, sinks: int
) -> tuple[jax.Array, jax.Array]:
    """Prompt indices kept: lengths [B] -> (keep [B, K, budget] int32 ascending,
    keep_length [B] = min(lengths, budget)). Rows with lengths <= budget keep everything."""
    recent = budget - sinks
    start = (lengths - recent)[:, None] + jnp.arange(recent)  # [B, recent]
    sink = jnp.broadcast_to(jnp.arange(sinks), (lengths.shape[0], sinks))  # [B, sinks]
    keep = jnp.concatenate([sink, start], axis=-1)  # [B, budget]
    keep = jnp.where((lengths <= budget)[:, None], jnp.arange(budget), keep)
    keep = jnp.broadcast_to(keep[:, None, :], (lengths.shape[0], K, budget))  # [B, K, budget]
    return keep.astype(jnp.int32), jnp.minimum(lengths, budget).astype(jnp.int32)


def streaming_slots(cache: KVCache, *, budget: int, sinks: int) -> jax.Array:
    """Slots streaming attends: the first `sinks` and the last budget - sinks filled ones.
    Returns bool [B, K, C] (before visibility)."""
    slot = jnp.arange(cache.capacity)[None, None, :]  # [1, 1, C]
    recent_from = (cache.length - (budget - sinks))[:, None, None]  # [B, 1, 1]
    return (slot < sinks) | (slot >= recent_from)


@dataclasses.dataclass(frozen=True)
class StreamingPlan(AppendsTokens):
    """Resolved StreamingLLM plan: `sinks` + `token_budget - sinks` recent tokens."""

    name: str
    capacity: int
    prompt_len: int
    token_budget: int
    sinks: int

    def compress(self, k, v, q, lengths) -> KVCache:
        """k, v [B, K, T, D]; lengths [B] -> cache of the sink + recent prompt tokens."""
        B, K, T, _ = k.shape
        if T <= self.token_budget:
            keep, keep_length = keep_all(lengths, K, T), lengths
        else:
            keep, keep_length = streaming_keep(
                lengths, K, budget=self.token_budget, sinks=self.sinks
            )
        return cache_from_prompt(k, v, keep, keep_length, self.capacity)

    def attend(self, q, cache: KVCache, query_pos, sliding_window) -> jax.Array:
        """q [B, H, D] -> [B, H, D]: dense over sinks + recent slots."""
        visible = visible_slots(cache, query_pos, sliding_window)  # [B, K, C]
        visible &= streaming_slots(cache, budget=self.token_budget, sinks=self.sinks)
        return dense_decode_attention(q, cache, visible)

    def read_tokens(self, context: int) -> int:
        return min(context, self.token_budget)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "dense": False, "kernels": NO_KERNELS}


@dataclasses.dataclass(frozen=True)
class Streaming:
    """StreamingLLM with `sinks` attention-sink tokens (default 4, 0 = a plain recent
    window); token_budget > sinks."""

    token_budget: int
    sinks: int = 4
    name: ClassVar[str] = "streaming"

    def __post_init__(self) -> None:
        check_token_budget(self.name, self.token_budget)
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise MethodConfigError(f"streaming: sinks must be an int >= 0, got {self.sinks!r}")
        if self.token_budget <= self.sinks:
            raise MethodConfigError(
                f"streaming: token_budget ({self.token_budget}) must exceed sinks "
                f"({self.sinks}) so at least one recent token is attended"
            )

    def plan(self, config, prompt_len: int, max_new_tokens: int):
        M, L = self.token_budget, prompt_len + max_new_tokens
        if M >= L:
            return DensePlan(self.name, round_capacity(L), prompt_len, M)
        kept = min(prompt_len, M)
        return StreamingPlan(self.name, round_capacity(kept + max_new_tokens), prompt_len, M,
                             self.sinks)

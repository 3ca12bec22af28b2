"""`full`: the uncompressed KV cache with dense attention (the reference every method
is measured against)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..cache import KVCache, append_token, cache_from_prompt, visible_slots
from ..models.layers import dense_attention


def keep_all(lengths: jax.Array, K: int, T: int) -> jax.Array:
    """Indices of every prompt token: [B, K, T] int32."""
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (lengths.shape[0], K, T))


def dense_decode_attention(
    q: jax.Array, cache: KVCache, visible: jax.Array
) -> jax.Array:
    """Dense attention of one decode query over the visible slots. q [B, H, D],
    visible [B, K, C] bool -> [B, H, D]."""
    out = dense_attention(q[:, :, None], cache.k, cache.v, visible[:, :, None, :])
    return out[:, :, 0]


@dataclasses.dataclass(frozen=True)
class FullPlan:
    """Static, resolved parameters of the full-KV method (see `KVPlan`)."""

    capacity: int
    name: str = "full"

    def compress(self, k, v, q, lengths) -> KVCache:
        """Keep every prompt token. k, v [B, K, T, D]; q [B, H, T, D]; lengths [B]."""
        keep = keep_all(lengths, k.shape[1], k.shape[2])
        return cache_from_prompt(k, v, keep, lengths, self.capacity)

    def append(self, cache: KVCache, k, v, position) -> KVCache:
        return append_token(cache, k, v, position)

    def attend(self, q, cache: KVCache, query_pos, sliding_window) -> jax.Array:
        return dense_decode_attention(q, cache, visible_slots(cache, query_pos, sliding_window))

    def read_tokens(self, context: int) -> int:
        """KV tokens read per decode step per KV head at `context` cached tokens."""
        return context


@dataclasses.dataclass(frozen=True)
class Full:
    """Full KV cache, dense attention. No budget."""

    name = "full"

    def plan(self, config, prompt_len: int, max_new_tokens: int) -> FullPlan:
        return FullPlan(capacity=prompt_len + max_new_tokens)

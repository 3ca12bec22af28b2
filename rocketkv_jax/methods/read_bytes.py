"""KV bytes a decode step reads, from a plan's own accounting (`read_tokens`).

A plan's `read_tokens(context)` is in tokens' worth per KV head (one token's worth = K and
V of one cached token, 2 * D elements), selection metadata included; these helpers turn it
into bytes for a whole model. Shared by `rocketkv demo` and the benchmarks.
"""

from __future__ import annotations


def kv_token_bytes(config, elem_bytes: int) -> int:
    """K + V bytes of one cached token over all layers and KV heads (batch 1)."""
    return config.num_layers * config.num_kv_heads * 2 * config.head_dim * elem_bytes


def kv_read_bytes(plan, context: int, config, elem_bytes: int, batch: int = 1) -> int:
    """KV bytes one decode step reads: `plan.read_tokens(context)` x layers x KV heads x
    2 x D x elem_bytes x batch. context = uncompressed tokens cached before the step."""
    return plan.read_tokens(context) * kv_token_bytes(config, elem_bytes) * batch

"""A plan that keeps the raw prefill instead of compressing it, so that several methods
can compress the same prefill later (the evaluation and the benchmarks run many
(method, budget) pairs on one prompt)."""

from __future__ import annotations

import dataclasses

from .base import STORED_QUERY_WINDOW


@dataclasses.dataclass(frozen=True)
class KeepRaw:
    """`compress` returns each layer's raw prompt k, v [B, K, T, D] and its rows' last
    `query_window` queries q [B, H, query_window, D] unchanged: feed them to any plan's
    `compress` (or `skip_layers.compress_layers`) afterwards."""

    capacity: int
    query_window: int = STORED_QUERY_WINDOW

    def compress(self, k, v, q, lengths):
        return k, v, q

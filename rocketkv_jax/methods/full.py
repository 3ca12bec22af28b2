"""`full`: the uncompressed KV cache with dense attention (the reference every method
is measured against)."""

from __future__ import annotations

import dataclasses

from .base import DensePlan


@dataclasses.dataclass(frozen=True)
class Full:
    """Full KV cache, dense attention. No budget."""

    name = "full"

    def plan(self, config, prompt_len: int, max_new_tokens: int) -> DensePlan:
        L = prompt_len + max_new_tokens
        return DensePlan(name="full", capacity=L, prompt_len=prompt_len, token_budget=L,
                         fallback="")

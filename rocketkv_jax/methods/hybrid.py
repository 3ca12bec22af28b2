"""`hybrid`: RocketKV's stage 2 alone on the uncompressed cache.

The whole compression c2 = L / M is left to stage 2: page = ceil(sqrt(c2)) (1 when that
exceeds c2), r = int(D * page / c2) channels, k_top = M // 2 exact tokens. When M >= L
the method is exact dense attention (`DensePlan`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..kernels.backend import resolve_backend
from .base import DensePlan, check_token_budget, check_top_r, round_capacity
from .budget import stage2_reduction
from .cost import check_stage2, stage2_fallback
from .skip_layers import check_skip_layers, with_skip_layers
from .stage2 import TwoStagePlan, check_stage2_overrides, resolve_page_and_channels


@with_skip_layers
@dataclasses.dataclass(frozen=True)
class Hybrid:
    """Stage-2 hybrid sparse attention on the full cache. Optional overrides: page_size
    (power of two), top_r (channels, checked against head_dim at plan time). stage2:
    "auto" (default) attends densely where the selection would cost more than that
    (`cost.py`); "on" / "off" force the sparse / dense path."""

    token_budget: int
    page_size: int | None = None
    top_r: int | None = None
    kernels: str = "auto"
    stage2: str = "auto"
    skip_layers: int = 0  # leading layers kept dense and unevicted
    name: ClassVar[str] = "hybrid"

    def __post_init__(self) -> None:
        check_token_budget(self.name, self.token_budget)
        check_skip_layers(self.name, self.skip_layers)
        check_stage2_overrides(self.name, self.page_size, self.top_r, self.kernels)
        check_stage2(self.name, self.stage2)

    def plan(self, config, prompt_len: int, max_new_tokens: int):
        M, L, D = self.token_budget, prompt_len + max_new_tokens, config.head_dim
        if self.top_r is not None:
            check_top_r(self.name, self.top_r, D)
        if M >= L:
            return DensePlan(self.name, round_capacity(L), prompt_len, M)
        c2 = max(1.0, L / M)
        page, r = resolve_page_and_channels(
            self.name, c2, D, self.page_size, self.top_r, stage2_reduction(c2, D)
        )
        k_top = max(1, M // 2)
        kernels = resolve_backend(self.kernels)
        fallback = stage2_fallback(
            self.stage2, kept_prompt=prompt_len, new_tokens=max_new_tokens, head_dim=D,
            group=config.num_heads // config.num_kv_heads, page_size=page, top_r=r,
            k_top=k_top, kernels=kernels,
        )
        return TwoStagePlan(
            name=self.name,
            capacity=round_capacity(L, page),
            prompt_len=prompt_len,
            token_budget=M,
            head_dim=D,
            prompt_budget=prompt_len,
            window=0,
            kernel_size=0,
            page_size=page,
            top_r=r,
            k_top=k_top,
            stage2_dense=bool(fallback),
            kernels=kernels,
            fallback=fallback,
        )

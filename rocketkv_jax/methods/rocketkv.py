"""`rocketkv`: stage-1 SnapKV++ prompt eviction, then stage-2 hybrid sparse attention, with
the budget split of `budget.rocketkv_split`.

When M >= L = T + N the method is exact dense attention with no eviction (`DensePlan`), so
it generates exactly what `full` does. When the prompt already fits the stage-1 budget,
stage 1 is skipped (statically for T <= prompt_budget, per row for shorter rows).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..kernels.backend import resolve_backend
from .base import (
    DensePlan,
    MethodConfigError,
    check_positive_int,
    check_token_budget,
    check_top_r,
    round_capacity,
)
from .budget import rocketkv_split
from .cost import check_stage2, stage2_fallback
from .skip_layers import check_skip_layers, with_skip_layers
from .stage1 import resolve_pool_kernel
from .stage2 import TwoStagePlan, check_stage2_overrides, resolve_page_and_channels


@with_skip_layers
@dataclasses.dataclass(frozen=True)
class RocketKV:
    """RocketKV. Defaults from the paper's reference code: window 32, max-pool kernel 63
    (clamped to the scored span, odd), page and top_r from the budget split (overridable:
    page_size a power of two, top_r in [1, head_dim]).

    stage1_share: None (default) for the adaptive split a = min(0.2 + 0.06 log2 c, 0.8);
    a number in (0, 1] fixes a, as the official `rocket_r0.3` / `rocket_r0.5` /
    `rocket_r0.7` methods do (capacity = int(L / c**a), the rest of the split as usual).

    stage2: "auto" (default) attends densely over the stage-1 cache where stage 2's
    selection would cost more than that (`cost.py`); "on" / "off" force sparse / dense.
    """

    token_budget: int
    window: int = 32
    kernel_size: int = 63
    page_size: int | None = None
    top_r: int | None = None
    kernels: str = "auto"
    stage1_share: float | None = None
    stage2: str = "auto"
    skip_layers: int = 0  # leading layers kept dense and unevicted (official configs: 2)
    name: ClassVar[str] = "rocketkv"

    def __post_init__(self) -> None:
        check_token_budget(self.name, self.token_budget)
        check_skip_layers(self.name, self.skip_layers)
        share = self.stage1_share
        if share is not None and (
            isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1
        ):
            raise MethodConfigError(
                f"rocketkv: stage1_share must be a number in (0, 1] (the official methods "
                f"use 0.3, 0.5 and 0.7), got {share!r}; pass None for the adaptive split"
            )
        check_positive_int(self.name, "window", self.window)
        check_positive_int(self.name, "kernel_size", self.kernel_size)
        check_stage2_overrides(self.name, self.page_size, self.top_r, self.kernels)
        check_stage2(self.name, self.stage2)

    def plan(self, config, prompt_len: int, max_new_tokens: int):
        M, T, N, D = self.token_budget, prompt_len, max_new_tokens, config.head_dim
        L = T + N
        if self.top_r is not None:
            check_top_r(self.name, self.top_r, D)
        if M >= L:
            return DensePlan(self.name, round_capacity(L), T, M)
        split = rocketkv_split(M, L, N, D, self.stage1_share)
        budget = split.prompt_budget
        if T > budget and budget < self.window:
            raise MethodConfigError(
                f"rocketkv: token_budget {M} with prompt_len {T} and max_new_tokens {N} "
                f"leaves a stage-1 prompt budget of {budget} tokens (capacity "
                f"{split.capacity} - {N} new), below the observation window {self.window} "
                "that stage 1 always keeps; raise token_budget, lower max_new_tokens or "
                "pass a smaller window"
            )
        page, r = resolve_page_and_channels(
            self.name, split.c2, D, self.page_size, self.top_r, (split.page_size, split.top_r)
        )
        kept = min(T, budget) + N  # most tokens the cache ever holds
        k_top = max(1, split.k_top)
        kernels = resolve_backend(self.kernels)
        fallback = stage2_fallback(
            self.stage2, kept_prompt=min(T, budget), new_tokens=N, head_dim=D,
            group=config.num_heads // config.num_kv_heads, page_size=page, top_r=r,
            k_top=k_top, kernels=kernels,
        )
        return TwoStagePlan(
            name=self.name,
            capacity=round_capacity(kept, page),
            prompt_len=T,
            token_budget=M,
            head_dim=D,
            prompt_budget=budget,
            window=self.window,
            kernel_size=resolve_pool_kernel(self.kernel_size, T - self.window),
            page_size=page,
            top_r=r,
            k_top=k_top,
            stage2_dense=bool(fallback),
            kernels=kernels,
            sliding_window=config.sliding_window,
            fallback=fallback,
        )

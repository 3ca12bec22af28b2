"""`snapkv` and `snapkv++`: stage-1 prompt eviction alone, dense decode attention.

- snapkv: window 32, average pooling kernel 7, scores summed over the GQA group.
- snapkv++ (RocketKV's stage 1): window 32, max pooling kernel 63, summed over the group.

Both keep `token_budget` = M prompt tokens (M - window selected + the window) and attend
densely over what is kept plus every generated token. When M >= L = T + N nothing is
evicted (`DensePlan`); a row whose prompt is <= M tokens keeps its whole prompt.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from ..cache import KVCache, visible_slots
from .base import (
    NO_KERNELS,
    AppendsTokens,
    DensePlan,
    MethodConfigError,
    cached_tokens,
    check_positive_int,
    check_token_budget,
    round_capacity,
)
from .dense import dense_decode_attention
from .skip_layers import check_skip_layers, with_skip_layers
from .stage1 import compress_prompt, resolve_pool_kernel


@dataclasses.dataclass(frozen=True)
class PromptEvictionPlan(AppendsTokens):
    """Resolved stage-1-only plan (snapkv, snapkv++).

    prompt_budget: prompt tokens kept per row; >= prompt_len means nothing is evicted.
    kernel_size: pooling size after clamping to the scored span (prompt_len - window).
    """

    name: str
    capacity: int
    prompt_len: int
    token_budget: int
    prompt_budget: int
    window: int
    kernel_size: int
    pool: str
    sliding_window: int | None = None  # the model's (Mistral): stage 1 scores within it

    @property
    def query_window(self) -> int:
        """Stage 1 scores with each row's last `window` queries."""
        return self.window

    def compress(self, k, v, q, lengths) -> KVCache:
        """k, v [B, K, T, D]; q [B, H, window, D], each row's last queries; lengths [B]
        -> cache of the kept tokens."""
        return compress_prompt(
            k, v, q, lengths, budget=self.prompt_budget, window=self.window,
            kernel_size=self.kernel_size, pool=self.pool, capacity=self.capacity,
            sliding_window=self.sliding_window,
        )

    def attend(self, q, cache: KVCache, query_pos, sliding_window) -> jax.Array:
        """q [B, H, D] -> [B, H, D]: dense over the kept prompt + generated tokens."""
        return dense_decode_attention(q, cache, visible_slots(cache, query_pos, sliding_window))

    def read_tokens(self, context: int) -> int:
        """Tokens read per step per KV head when the uncompressed sequence has `context`."""
        return cached_tokens(context, self.prompt_len, self.prompt_budget)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "dense": False, "kernels": NO_KERNELS}


def plan_prompt_eviction(
    name: str, token_budget: int, window: int, kernel_size: int, pool: str,
    prompt_len: int, max_new_tokens: int, sliding_window: int | None = None,
) -> PromptEvictionPlan | DensePlan:
    """Shared `plan` of snapkv / snapkv++: keep token_budget prompt tokens."""
    L = prompt_len + max_new_tokens
    if token_budget >= L:
        return DensePlan(name, round_capacity(L), prompt_len, token_budget)
    kept = min(prompt_len, token_budget)
    return PromptEvictionPlan(
        name=name,
        capacity=round_capacity(kept + max_new_tokens),
        prompt_len=prompt_len,
        token_budget=token_budget,
        prompt_budget=token_budget,
        window=window,
        kernel_size=resolve_pool_kernel(kernel_size, prompt_len - window),
        pool=pool,
        sliding_window=sliding_window,
    )


def _check_stage1(name: str, token_budget: int, window: int, kernel_size: int,
                  skip_layers: int) -> None:
    check_token_budget(name, token_budget)
    check_skip_layers(name, skip_layers)
    check_positive_int(name, "window", window)
    check_positive_int(name, "kernel_size", kernel_size)
    if token_budget < window:
        raise MethodConfigError(
            f"{name}: token_budget ({token_budget}) must be >= the observation window "
            f"({window}), which is always kept; raise the budget or pass a smaller window"
        )


@with_skip_layers
@dataclasses.dataclass(frozen=True)
class SnapKV:
    """SnapKV: window queries score the prompt, average pooling, group-shared top-k."""

    token_budget: int
    window: int = 32
    kernel_size: int = 7
    skip_layers: int = 0  # leading layers kept dense and unevicted
    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        _check_stage1(self.name, self.token_budget, self.window, self.kernel_size,
                      self.skip_layers)

    def plan(self, config, prompt_len: int, max_new_tokens: int):
        return plan_prompt_eviction(
            self.name, self.token_budget, self.window, self.kernel_size, "avg",
            prompt_len, max_new_tokens, config.sliding_window,
        )


@with_skip_layers
@dataclasses.dataclass(frozen=True)
class SnapKVPlusPlus:
    """SnapKV++ (RocketKV stage 1 alone): max pooling with a large kernel."""

    token_budget: int
    window: int = 32
    kernel_size: int = 63
    skip_layers: int = 0  # leading layers kept dense and unevicted
    name: ClassVar[str] = "snapkv++"

    def __post_init__(self) -> None:
        _check_stage1(self.name, self.token_budget, self.window, self.kernel_size,
                      self.skip_layers)

    def plan(self, config, prompt_len: int, max_new_tokens: int):
        return plan_prompt_eviction(
            self.name, self.token_budget, self.window, self.kernel_size, "max",
            prompt_len, max_new_tokens, config.sliding_window,
        )

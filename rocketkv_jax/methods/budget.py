"""How RocketKV splits one token budget M between its two stages (docs/algorithm.md, "How
RocketKV divides the budget"), and the stage-2 page/channel reduction shared with the
`hybrid` baseline."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class RocketKVSplit:
    """The resolved budget split. All token counts are per KV head.

    token_budget:  M after clamping to L
    compression:   c = L / M, total compression ratio
    stage1_share:  a, the share (as an exponent of c) done by stage 1
    capacity:      tokens kept after stage 1, prompt + new
    prompt_budget: prompt tokens kept by stage 1 (capacity - N)
    k_top:         tokens attended exactly by stage 2
    c2:            compression left for stage 2 (capacity / M)
    page_size:     stage-2 sequence reduction (tokens per page)
    top_r:         stage-2 head reduction (channels kept), in [1, D]
    """

    token_budget: int
    compression: float
    stage1_share: float
    capacity: int
    prompt_budget: int
    k_top: int
    c2: float
    page_size: int
    top_r: int


def stage2_reduction(c2: float, head_dim: int) -> tuple[int, int]:
    """(page_size, top_r) that compress the approximate-score read by c2.

    page = ceil(sqrt(c2)) when that is <= c2, else 1; r = int(D * page / c2) clamped to
    [1, D].
    """
    page = math.ceil(math.sqrt(c2))
    if page > c2:
        page = 1
    r = int(head_dim * page / c2)
    return page, min(max(r, 1), head_dim)


def rocketkv_split(
    M: int, L: int, N: int, D: int, stage1_share: float | None = None
) -> RocketKVSplit:
    """RocketKV's budget split for token budget M, sequence L = T + N, N new tokens,
    head dim D, exactly as docs/algorithm.md (and the reference implementation) computes it.

    stage1_share: a fixed share `a` of the compression done by stage 1 (the official
    `rocket_r0.3` / `r0.5` / `r0.7` methods), in [0, 1], instead of the adaptive
    a = min(0.2 + 0.06 log2 c, 0.8); everything after `a` is unchanged.
    """
    if M <= 0 or L <= 0 or N < 0 or D <= 0:
        raise ValueError(f"rocketkv_split needs M, L, D > 0 and N >= 0, got {M=} {L=} {N=} {D=}")
    if stage1_share is not None and not 0.0 <= stage1_share <= 1.0:
        raise ValueError(f"stage1_share must be in [0, 1], got {stage1_share}")
    M = min(M, L)
    c = max(1.0, L / M)
    if stage1_share is None:
        a = min(0.2 + 0.06 * math.log2(c), 0.8)
    else:
        a = float(stage1_share)
    capacity = int(L / c**a)
    capacity = max(capacity, min(2 * N, L))
    prompt_budget = capacity - N
    k_top = M // 2
    c2 = max(1.0, capacity / M)
    page, r = stage2_reduction(c2, D)
    return RocketKVSplit(
        token_budget=M,
        compression=c,
        stage1_share=a,
        capacity=capacity,
        prompt_budget=prompt_budget,
        k_top=k_top,
        c2=c2,
        page_size=page,
        top_r=r,
    )

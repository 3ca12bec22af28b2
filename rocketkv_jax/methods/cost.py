"""Dense fallback by cost: a sparse decode step must not cost more than dense attention.

A method's selection (stage 2 of hybrid / rocketkv, Quest's page bounds, SparQ's channel
scores) pays off only when scoring the cache and gathering the winners costs less than
reading the cache. When it does not, the plan attends densely over its own cache instead
(stage 1 still evicts). The decision is made at plan time from shapes; `stage2="on"` /
`"off"` overrides it.

The model: bytes moved per decode step per KV head, with S the cached slots averaged over
the decode steps (every cost below is linear in S, so the mean S gives the mean cost), D
the head dim, G the query heads per KV head, e = KV_ELEMENT_BYTES, p the page size, R the
kept channels, k the tokens attended exactly:

    dense   = S * 2D * e                                       K and V of every slot
    stage 2 = ceil(S / p) * R * e * METADATA_FACTOR            one bound per page, R channels
            + S * (G * SCORE_BYTES + RANK_BYTES)               approximate scores, top-k
            + k * (2D * e * GATHER_FACTOR + INDEX_BYTES)       the chosen tokens
    quest   = ceil(S / p) * 2D * e                             page max and min, streamed
            + ceil(S / p) * (G * SCORE_BYTES + RANK_BYTES)     page bounds, top-k of pages
            + n * p * (2D * e + INDEX_BYTES)                   the chosen pages: runs of p
                                                               slots, read near-sequentially
    sparq   = S * R * e * METADATA_FACTOR + S * D * e          R key channels, mean(V)
            + S * (G * SCORE_BYTES + RANK_BYTES) + k * (2D * e * GATHER_FACTOR + INDEX_BYTES)

Calibration (the constants below): a micro-benchmark of `TwoStagePlan.attend` against
`DensePlan.attend` (jnp reference kernels, jitted, median of 30 calls; B = 1, K = 3,
D = 64, G in {1, 3, 8}, S in {2048, 8192}, page 16 or 1, R = 4, k_top 16 or 1024, bf16
and f32) on this project's CPU box (2 shared x86-64 cores, XLA:CPU, jax 0.10.2, load ~5),
each sparse time converted into bytes at the dense path's own measured rate (bf16: 1.5-3
GB/s, f32: 2.3-6.6 GB/s) with a token counted as 2D * 2 bytes:
  - scoring and ranking cost 23-43 B (bf16) / 32-40 B (f32) per slot at G = 1..8, S = 8k
    (the f32 scores pass through repeat, temperature, mask, softmax and the group mean
    before `lax.top_k`): G * SCORE_BYTES + RANK_BYTES = 28 / 36 / 56;
  - a gathered token costs 2.6-3.5x a streamed one (bf16; 2.1-3.7x in f32): GATHER_FACTOR;
  - a bound element read through `take_along_axis` costs 3.6-6.2x its bytes (bf16; 2.5-6x
    in f32): both bounds are gathered, then widened to f32: METADATA_FACTOR.
Not modelled: a fixed ~0.15 ms per sparse attend call (B = 1, K = 3), which makes the model
optimistic for the sparse path below ~2k cached slots. Checked against the SmolLM2 decode
grid of docs/benchmarks.md (f32): the fallback is taken where hybrid, sparq and rocketkv
were measured slower than full KV (tests/methods/test_dense_fallback.py pins it). The GPU
kernels (`kernels/`) read close to the ideal bytes (factors near 1), so on a GPU the model
errs towards dense.
"""

from __future__ import annotations

import math

from .base import MethodConfigError

STAGE2_MODES = ("auto", "on", "off")

# The cache dtype is not known at plan time; bf16 is the dtype of every real checkpoint
# here. In f32 the dense side doubles and the f32 score overheads do not, so assuming bf16
# errs towards dense.
KV_ELEMENT_BYTES = 2
SCORE_BYTES = 4  # per slot per query head: the f32 approximate-score pipeline
RANK_BYTES = 24  # per slot: lax.top_k over the group-mean score, and the shared passes
GATHER_FACTOR = 3.0  # a gathered K/V row costs this many streamed ones
METADATA_FACTOR = 5.0  # a gathered metadata / key-channel element costs this many bytes
INDEX_BYTES = 4  # int32 slot index, written by top-k and read by the gather
# "auto" runs the sparse path only where it is estimated at least this much cheaper than
# dense: the model's error. In the batched decode grid (docs/benchmarks/decode-batched.md,
# 2026-12-03, idle) the one sparse cell more than 5% slower than full KV was SparQ on the
# SmolLM2 shape at 16k, M = 2048, batch 4 (0.81x), estimated at 0.945 of dense; the
# cheapest estimate that was slower than dense in the SmolLM2 grid of docs/benchmarks.md
# was hybrid at 4k, M = 1024 (0.97x).
SPARSE_MARGIN = 0.93


def check_stage2(name: str, stage2: object) -> None:
    if stage2 not in STAGE2_MODES:
        raise MethodConfigError(
            f"{name}: stage2 must be one of {', '.join(map(repr, STAGE2_MODES))} (auto: sparse "
            f"only where the cost model says it reads less than dense), got {stage2!r}"
        )


def mean_slots(kept_prompt: int, new_tokens: int) -> float:
    """Cached slots averaged over the decode steps (kept prompt, then one more per step)."""
    return kept_prompt + new_tokens / 2


def dense_bytes(slots: float, head_dim: int) -> float:
    return slots * 2 * head_dim * KV_ELEMENT_BYTES


def _selection(slots: float, group: int) -> float:
    return slots * (group * SCORE_BYTES + RANK_BYTES)


def _gather(tokens: float, head_dim: int, factor: float = GATHER_FACTOR) -> float:
    return tokens * (2 * head_dim * KV_ELEMENT_BYTES * factor + INDEX_BYTES)


def stage2_bytes(slots: float, head_dim: int, group: int, page_size: int, top_r: int,
                 k_top: int) -> float:
    """Hybrid / RocketKV stage 2 (page_size 1 scores the keys themselves)."""
    pages = math.ceil(slots / page_size)
    metadata = pages * top_r * KV_ELEMENT_BYTES * METADATA_FACTOR
    return metadata + _selection(slots, group) + _gather(min(k_top, slots), head_dim)


def quest_bytes(slots: float, head_dim: int, group: int, page_size: int,
                num_pages: int) -> float:
    pages = math.ceil(slots / page_size)
    metadata = pages * 2 * head_dim * KV_ELEMENT_BYTES  # einsum over whole rows: streamed
    chosen = min(num_pages * page_size, slots)
    return metadata + _selection(pages, group) + _gather(chosen, head_dim, factor=1.0)


def sparq_bytes(slots: float, head_dim: int, group: int, top_r: int, k_top: int) -> float:
    """SparQ as implemented here: mean(V) is recomputed over every slot each step."""
    channels = slots * top_r * KV_ELEMENT_BYTES * METADATA_FACTOR
    mean_v = slots * head_dim * KV_ELEMENT_BYTES
    return channels + mean_v + _selection(slots, group) + _gather(min(k_top, slots), head_dim)


def dense_reason(stage2: str, sparse: float, dense: float) -> str:
    """Why the plan attends densely: "" (it runs its sparse path: stage2 "on", or "auto"
    with the sparse step estimated at under SPARSE_MARGIN of the dense one), "off"
    (stage2 "off") or "cost"."""
    if stage2 == "on" or (stage2 == "auto" and sparse < SPARSE_MARGIN * dense):
        return ""
    return "off" if stage2 == "off" else "cost"


def fallback_note(plan) -> str:
    """How a plan's attention runs, for the stats line: "" for a sparse plan, else why it
    attends densely."""
    reason = getattr(plan, "fallback", "")
    over = "its stage-1 cache" if getattr(plan, "window", 0) else "its cache"
    return {
        "cost": f"dense over {over}: the selection would cost more than dense attention",
        "off": f"dense over {over}: stage2 off",
        "k_top": f"dense over {over}: k_top covers every cached slot",
    }.get(reason, "")


def stage2_fallback(stage2: str, *, kept_prompt: int, new_tokens: int, head_dim: int,
                    group: int, page_size: int, top_r: int, k_top: int) -> str:
    """A `TwoStagePlan`'s `fallback`: "" (stage 2 sparse), "k_top", "off" or "cost"."""
    if k_top >= kept_prompt + new_tokens:
        return "k_top"
    slots = mean_slots(kept_prompt, new_tokens)
    sparse = stage2_bytes(slots, head_dim, group, page_size, top_r, k_top)
    return dense_reason(stage2, sparse, dense_bytes(slots, head_dim))

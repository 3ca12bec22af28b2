"""Dense fallback by cost: a sparse decode step must not cost more than dense attention.

A method's selection (stage 2 of hybrid / rocketkv, Quest's page bounds, SparQ's channel
scores) pays off only when scoring the cache and gathering the winners costs less than
reading the cache. When it does not, the plan attends densely over its own cache instead
(stage 1 still evicts). The decision is made at plan time from shapes; `stage2="on"` /
`"off"` overrides it.

The model: bytes moved per decode step per KV head, with S the cached slots averaged over
the decode steps (every cost below is linear in S, so the mean S gives the mean cost), D
the head dim, G the query heads per KV head, e = KV_ELEMENT_BYTES, p the page size, R the
kept channels, k the tokens attended exactly, and the constants c of the kernel backend
that runs (`CostConstants`):

    dense   = S * 2D * e                                       K and V of every slot
    stage 2 = ceil(S / p) * R * e * c.metadata_factor          one bound per page, R channels
              (p = 1: S * row(R))                              R channels of each key row
            + S * (G * c.score_bytes + c.rank_bytes)           approximate scores, top-k
            + k * (2D * e * c.gather_factor + INDEX_BYTES)     the chosen tokens
    quest   = ceil(S / p) * 2D * e                             page max and min, streamed
            + ceil(S / p) * (G * c.score_bytes + c.rank_bytes) page bounds, top-k of pages
            + n * p * (2D * e + INDEX_BYTES)                   the chosen pages: runs of p
                                                               slots, read near-sequentially
    sparq   = S * row(R) + S * D * e                           R key channels, mean(V)
            + S * (G * c.score_bytes + c.rank_bytes) + k * (2D * e * c.gather_factor + 4)
    row(R)  = max(R * e * c.key_channel_factor,                R channels of a key row: at
                  min(R, ceil(D * e / line)) * line)           least the lines they touch

The constants depend on the backend (`constants_for`): the jnp references and the Pallas
kernels move the same data at very different costs. Where `rocketkv bench --calibrate` has
measured this device (a file in the user cache, or $ROCKETKV_JAX_COST_FILE; see
`cost_file.py`), its constants are used; otherwise the built-ins below.

The built-in constants (`REFERENCE_CONSTANTS` for the jnp references, `PALLAS_CONSTANTS`
for the Pallas kernels, which the interpreter plans with too) come from a micro-benchmark of
the sparse against the dense attend on a CPU and from the kernels' byte counts;
docs/benchmarks/cost-model.md has the measurements behind each and what the model leaves
out. tests/methods/test_dense_fallback.py pins the fallback to the decode grid.
"""

from __future__ import annotations

import math

from ..names import STAGE2_MODES
from .base import MethodConfigError
from .cost_file import CostConstants, CostFileError, calibrated_constants

# The cache dtype is not known at plan time; bf16 is the dtype of every real checkpoint
# here. In f32 the dense side doubles and the f32 score overheads do not, so assuming bf16
# errs towards dense.
KV_ELEMENT_BYTES = 2
INDEX_BYTES = 4  # int32 slot index, written by top-k and read by the gather
# Memory is read in whole lines: R channels of a row-major key row touch up to R of its
# lines, however few bytes they hold. 64 bytes is a CPU cache line; a GPU reads 32-byte
# sectors, so there the floor errs towards dense.
LINE_BYTES = 64


REFERENCE_CONSTANTS = CostConstants(score_bytes=4, rank_bytes=24, gather_factor=3.0,
                                    metadata_factor=5.0, key_channel_factor=5.0)
PALLAS_CONSTANTS = CostConstants(score_bytes=8, rank_bytes=12, gather_factor=1.0,
                                 metadata_factor=1.0, key_channel_factor=4.0)
# The backend whose measured constants a plan for each (resolved) backend name uses: the
# interpreter runs the Pallas kernels, so it plans as Triton does; the Mosaic GPU kernels
# also read each selected row or channel once (row-major page bounds whole: more than
# Triton), and plan as Triton until they are measured on a GPU.
COST_BACKEND = {"reference": "reference", "triton": "triton", "interpret": "triton",
                "mosaic": "triton"}
BUILTIN_CONSTANTS = {"reference": REFERENCE_CONSTANTS, "triton": PALLAS_CONSTANTS}


def constants_for(kernels: str) -> CostConstants:
    """The constants of a resolved backend name ("reference", "interpret", "triton"): from
    this device's calibration file where there is one (`cost_file.py`; a damaged file or one
    from another device raises CostFileError), else the built-ins."""
    backend = COST_BACKEND[kernels]
    measured = calibrated_constants()
    if measured is None:
        return BUILTIN_CONSTANTS[backend]
    path, by_backend = measured
    if backend not in by_backend:
        if kernels == "interpret":  # never timed: a CPU file has no Triton constants
            return BUILTIN_CONSTANTS[backend]
        raise CostFileError(
            f"{path} holds cost constants for {', '.join(sorted(by_backend))} but not for "
            f"the {backend} kernels that run here; run `rocketkv bench --calibrate` again")
    return by_backend[backend]


# "auto" runs the sparse path only where it is estimated at least this much cheaper than
# dense: a margin for the model's error (docs/benchmarks/cost-model.md: the estimates of
# the cells that ran slower than full KV).
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


def _selection(slots: float, group: int, c: CostConstants) -> float:
    return slots * (group * c.score_bytes + c.rank_bytes)


def key_channel_bytes(top_r: int, head_dim: int, c: CostConstants) -> float:
    """R channels of one row-major key row: their bytes at the backend's rate, and never
    less than the memory lines they lie on (R scattered channels touch up to R lines)."""
    lines = min(top_r, math.ceil(head_dim * KV_ELEMENT_BYTES / LINE_BYTES))
    return max(top_r * KV_ELEMENT_BYTES * c.key_channel_factor, lines * LINE_BYTES)


def _gather(tokens: float, head_dim: int, factor: float) -> float:
    return tokens * (2 * head_dim * KV_ELEMENT_BYTES * factor + INDEX_BYTES)


def stage2_bytes(slots: float, head_dim: int, group: int, page_size: int, top_r: int,
                 k_top: int, c: CostConstants = REFERENCE_CONSTANTS) -> float:
    """Hybrid / RocketKV stage 2 (page_size 1 scores the keys themselves)."""
    if page_size == 1:
        metadata = slots * key_channel_bytes(top_r, head_dim, c)
    else:
        metadata = math.ceil(slots / page_size) * top_r * KV_ELEMENT_BYTES * c.metadata_factor
    return metadata + _selection(slots, group, c) + _gather(min(k_top, slots), head_dim,
                                                            c.gather_factor)


def quest_bytes(slots: float, head_dim: int, group: int, page_size: int,
                num_pages: int, c: CostConstants = REFERENCE_CONSTANTS) -> float:
    pages = math.ceil(slots / page_size)
    metadata = pages * 2 * head_dim * KV_ELEMENT_BYTES  # einsum over whole rows: streamed
    chosen = min(num_pages * page_size, slots)
    return metadata + _selection(pages, group, c) + _gather(chosen, head_dim, factor=1.0)


def sparq_bytes(slots: float, head_dim: int, group: int, top_r: int, k_top: int,
                c: CostConstants = REFERENCE_CONSTANTS) -> float:
    """SparQ as implemented here: mean(V) is recomputed over every slot each step."""
    channels = slots * key_channel_bytes(top_r, head_dim, c)
    mean_v = slots * head_dim * KV_ELEMENT_BYTES
    return (channels + mean_v + _selection(slots, group, c)
            + _gather(min(k_top, slots), head_dim, c.gather_factor))


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
                    group: int, page_size: int, top_r: int, k_top: int,
                    kernels: str = "reference") -> str:
    """A `TwoStagePlan`'s `fallback`: "" (stage 2 sparse), "k_top", "off" or "cost".
    kernels: the resolved backend the plan runs (its constants, `constants_for`)."""
    if k_top >= kept_prompt + new_tokens:
        return "k_top"
    if stage2 != "auto":  # forced: the constants are not consulted
        return dense_reason(stage2, 0.0, 0.0)
    slots = mean_slots(kept_prompt, new_tokens)
    sparse = stage2_bytes(slots, head_dim, group, page_size, top_r, k_top,
                          constants_for(kernels))
    return dense_reason(stage2, sparse, dense_bytes(slots, head_dim))

"""Fidelity of a compressed KV method to full KV, token by token.

Per prompt, full KV's greedy continuation of N tokens is the reference. For every method
and budget we measure:

- ``token_agreement``: fraction of the N positions where the method's own greedy tokens
  equal the reference (a shorter method output counts its missing positions as misses);
- ``identical_prefix``: number of leading tokens identical to the reference;
- ``mean_kl`` / ``max_kl``: KL(full || method) of the next-token distributions, per
  teacher-forced step (both forced with the reference tokens), averaged / maximized;
- ``forced_top1_agreement``: fraction of forced steps where the method's argmax equals
  the reference token (agreement without the compounding of free-running decode).

Contracts relied on (positional arguments):
- ``greedy_tokens_fn(prompt, method, token_budget, n) -> list[int]``: up to n greedy
  tokens (fewer if generation stopped at end-of-sequence).
- ``forced_logprobs_fn(prompt, forced_tokens, method, token_budget) -> array [N, V]``:
  row i is log p(next token | prompt + forced_tokens[:i]), N = len(forced_tokens).
  Rows are renormalized here (float64); a row whose logsumexp is off by more than
  `LOGSUMEXP_TOLERANCE` raises, since it is probably logits rather than log-probs.
For the full-KV method the budget argument is the sample's context length.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rocketkv_jax.eval.runner import (
    FULL_METHOD,
    EngineContractError,
    index_records,
    method_budget_grid,
)
from rocketkv_jax.eval.store import ResultsFileError, ResultsStore
from rocketkv_jax.eval.tasks import TaskSample

FIDELITY_FILE = "fidelity.jsonl"
LOGSUMEXP_TOLERANCE = 0.05

ForcedLogprobsFn = Callable[[str, list[int], str, int], np.ndarray]
GreedyTokensFn = Callable[[str, str, int, int], list[int]]


def token_agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Fraction of reference positions where candidate has the same token, in [0, 1].

    Compared over len(reference) positions; candidate positions past its end are misses.
    Raises ValueError for an empty reference.
    """
    if len(reference) == 0:
        raise ValueError("token_agreement needs a non-empty reference")
    same = sum(1 for r, c in zip(reference, candidate, strict=False) if r == c)
    return same / len(reference)


def identical_prefix_length(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Number of leading positions where candidate equals reference."""
    length = 0
    for r, c in zip(reference, candidate, strict=False):
        if r != c:
            break
        length += 1
    return length


def normalize_logprobs(logprobs: Any, n_steps: int, what: str) -> np.ndarray:
    """Validate a [N, V] log-prob array and renormalize rows in float64.

    Raises EngineContractError for a wrong shape, NaN / +inf entries, or rows whose
    logsumexp differs from 0 by more than LOGSUMEXP_TOLERANCE.
    """
    array = np.asarray(logprobs, dtype=np.float64)  # [N, V]
    if array.ndim != 2 or array.shape[0] != n_steps or array.shape[1] == 0:
        raise EngineContractError(
            f"{what}: expected log-probs of shape [{n_steps}, V], got {array.shape}"
        )
    if np.isnan(array).any() or np.isposinf(array).any():
        raise EngineContractError(f"{what}: log-probs contain NaN or +inf")
    row_max = array.max(axis=-1, keepdims=True)  # [N, 1]
    if np.isneginf(row_max).any():
        raise EngineContractError(f"{what}: a row has zero probability everywhere")
    lse = row_max + np.log(np.exp(array - row_max).sum(axis=-1, keepdims=True))  # [N, 1]
    worst = float(np.abs(lse).max())
    if worst > LOGSUMEXP_TOLERANCE:
        raise EngineContractError(
            f"{what}: rows are not normalized log-probs (|logsumexp| up to {worst:.3g}); "
            "return log_softmax(logits), not logits"
        )
    return array - lse


def kl_per_step(reference_logprobs: np.ndarray, candidate_logprobs: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) per row of two [N, V] log-prob arrays -> [N] float64.

    Terms where the reference probability is 0 contribute 0; a candidate -inf where the
    reference has mass gives +inf. Rounding noise below 0 is clipped to 0.
    """
    ref = np.asarray(reference_logprobs, dtype=np.float64)  # [N, V]
    cand = np.asarray(candidate_logprobs, dtype=np.float64)  # [N, V]
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape}, candidate {cand.shape}")
    p = np.exp(ref)  # [N, V]
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(p > 0, p * (ref - cand), 0.0)  # [N, V]
    return np.maximum(terms.sum(axis=-1), 0.0)  # [N]


def fidelity_metrics(
    reference_tokens: Sequence[int],
    candidate_tokens: Sequence[int],
    reference_logprobs: np.ndarray,
    candidate_logprobs: np.ndarray,
) -> dict[str, Any]:
    """All fidelity numbers of one (prompt, method, budget); logprobs are [N, V] forced."""
    kl = kl_per_step(reference_logprobs, candidate_logprobs)  # [N]
    forced_top1 = np.asarray(candidate_logprobs).argmax(axis=-1)  # [N]
    return {
        "token_agreement": token_agreement(reference_tokens, candidate_tokens),
        "identical_prefix": identical_prefix_length(reference_tokens, candidate_tokens),
        "mean_kl": _finite_or_none(kl.mean()),
        "max_kl": _finite_or_none(kl.max()),
        "forced_top1_agreement": float(np.mean(forced_top1 == np.asarray(reference_tokens))),
        "kl_per_step": [_finite_or_none(x) for x in kl],
    }


def _finite_or_none(value: float) -> float | None:
    """JSON has no inf: non-finite KL is written as null."""
    value = float(value)
    return value if np.isfinite(value) else None


def _base_record(sample: TaskSample, method: str, budget: int | None, n: int) -> dict:
    return {
        "method": method,
        "budget": budget,
        "task": sample.task,
        "context_length": sample.context_length,
        "sample": sample.index,
        "seed": sample.seed,
        "prompt_sha1": sample.prompt_sha1,
        "requested_tokens": n,
    }


def _checked_tokens(tokens: Any, n: int, what: str) -> list[int]:
    if not isinstance(tokens, list | tuple | np.ndarray):
        raise EngineContractError(f"{what}: expected a list of token ids, got {type(tokens)}")
    tokens = [int(t) for t in tokens]
    if len(tokens) > n:
        raise EngineContractError(f"{what}: asked for {n} tokens, got {len(tokens)}")
    return tokens


def fidelity_identity(
    identity: Mapping[str, Any] | None, n_tokens: int, samples: Sequence[TaskSample] = ()
) -> dict[str, Any]:
    """The identity of a fidelity file: the accuracy run's (`runner.results_identity`; by
    default only the samples' seed) and the number of tokens compared."""
    base = dict(identity) if identity is not None else {
        "seed": sorted({s.seed for s in samples})}
    return {**base, "fidelity_tokens": n_tokens}


def run_fidelity(
    forced_logprobs_fn: ForcedLogprobsFn,
    greedy_tokens_fn: GreedyTokensFn,
    samples: Sequence[TaskSample],
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    n_tokens: int,
    out_dir: str | os.PathLike,
    show_progress: bool = True,
    identity: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Run (or resume) fidelity vs full KV over `samples`; return the fidelity.jsonl path.

    Writes one full-KV reference record per sample (its greedy tokens, and
    `argmax_agreement`: how often argmax of full's forced log-probs reproduces its own
    greedy tokens, an engine self-consistency check), then one record per method and
    budget with `fidelity_metrics`. Resumable like `run_eval`, with the header identity
    `fidelity_identity(identity, n_tokens)`; key (method, budget, task, context_length,
    sample). The full reference is reused from the file.
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    path = Path(out_dir) / FIDELITY_FILE
    store = ResultsStore(path, fidelity_identity(identity, n_tokens, samples), info=info,
                         force=force)
    existing = store.check()
    done = index_records(existing, path)
    grid = [
        (m, b)
        for m, b in method_budget_grid(methods, budgets, include_full=False)
        if m != FULL_METHOD
    ]
    total = len(samples) * (1 + len(grid))
    finished = sum(
        1
        for s in samples
        for m, b in [(FULL_METHOD, None), *grid]
        if (m, b, s.task, s.context_length, s.index) in done
    )
    with (
        store.open() as append,
        tqdm(
            total=total,
            initial=finished,
            desc="fidelity",
            unit="run",
            disable=not show_progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        for sample in samples:
            where = (sample.task, sample.context_length, sample.index)
            todo = [(m, b) for m, b in grid if (m, b, *where) not in done]
            reference = done.get((FULL_METHOD, None, *where))
            if reference is not None and reference.get("prompt_sha1") != sample.prompt_sha1:
                raise ResultsFileError(
                    f"{path}: the prompt of {where} differs from the recorded one; "
                    "use a new output directory"
                )
            if reference is not None and not todo:
                continue
            full_budget = sample.context_length
            if reference is None:
                ref_tokens = _checked_tokens(
                    greedy_tokens_fn(sample.prompt, FULL_METHOD, full_budget, n_tokens),
                    n_tokens,
                    "greedy_tokens_fn(full)",
                )
            else:
                ref_tokens = list(reference["reference_tokens"])
            ref_logprobs = None
            if ref_tokens:
                ref_logprobs = normalize_logprobs(
                    forced_logprobs_fn(sample.prompt, ref_tokens, FULL_METHOD, full_budget),
                    len(ref_tokens),
                    "forced_logprobs_fn(full)",
                )  # [N, V]
            if reference is None:
                record = _base_record(sample, FULL_METHOD, None, n_tokens)
                record["n_tokens"] = len(ref_tokens)
                record["reference_tokens"] = ref_tokens
                record["argmax_agreement"] = (
                    float(np.mean(ref_logprobs.argmax(axis=-1) == np.asarray(ref_tokens)))
                    if ref_tokens
                    else None
                )
                append([record])
                bar.update(1)
            for method, budget in todo:
                bar.set_postfix_str(f"{method} budget={budget}", refresh=False)
                record = _base_record(sample, method, budget, n_tokens)
                record["n_tokens"] = len(ref_tokens)
                tokens = _checked_tokens(
                    greedy_tokens_fn(sample.prompt, method, budget, n_tokens),
                    n_tokens,
                    f"greedy_tokens_fn({method})",
                )
                record["tokens"] = tokens
                if ref_tokens:
                    logprobs = normalize_logprobs(
                        forced_logprobs_fn(sample.prompt, ref_tokens, method, budget),
                        len(ref_tokens),
                        f"forced_logprobs_fn({method})",
                    )  # [N, V]
                    if logprobs.shape != ref_logprobs.shape:
                        raise EngineContractError(
                            f"forced_logprobs_fn({method}) vocabulary {logprobs.shape[1]} "
                            f"differs from full KV's {ref_logprobs.shape[1]}"
                        )
                    record.update(fidelity_metrics(ref_tokens, tokens, ref_logprobs, logprobs))
                append([record])
                bar.update(1)
    return path

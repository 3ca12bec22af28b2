"""Resumable accuracy runs: every (method, budget, task, context, sample) -> one JSON line.

`run_eval` appends one record per finished generation to ``<out_dir>/results.jsonl``, a
results file of `store.py`: a header with the run's identity, then the records. On start
it checks that header against this run's identity (a difference is refused), skips
records already there and appends only the missing ones; finished lines are never
rewritten. A run killed mid-write leaves a truncated last line, which is cut off (only
that partial line) before appending.

Contract relied on for `generate_fn(prompts, method, token_budget, max_new_tokens)`:
positional arguments in that order; it returns one decoded string per prompt, in order,
containing only the newly generated text (not the prompt), greedy decoding. Prompts in
one call may have different lengths. For the full-KV method the budget is meaningless:
it is called with ``token_budget = context_length`` and recorded with budget null.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rocketkv_jax.eval.store import ResultsFileError, ResultsStore
from rocketkv_jax.eval.suites import QUICK_SUITE, SampleKey, TaskSuite
from rocketkv_jax.eval.tasks import TaskSample
from rocketkv_jax.names import METHOD_NAMES, METHOD_VARIANT_NAMES  # JAX-free

EVAL_METHOD_NAMES = METHOD_NAMES + METHOD_VARIANT_NAMES
FULL_METHOD = "full"
RESULTS_FILE = "results.jsonl"
KEY_FIELDS = ("method", "budget", "task", "context_length", "sample")

GenerateFn = Callable[[list[str], str, int, int], list[str]]


class EngineContractError(RuntimeError):
    """The model engine returned something that breaks its documented contract."""


# ---------------------------------------------------------------------------- records


def record_key(record: Mapping[str, Any]) -> tuple:
    """Identity of a record: (method, budget, task, context_length, sample)."""
    try:
        return tuple(record[name] for name in KEY_FIELDS)
    except KeyError as err:
        raise ResultsFileError(f"record lacks key field {err.args[0]!r}: {record}") from None


def index_records(records: Iterable[Mapping[str, Any]], path: Path) -> dict[tuple, dict]:
    """Map record_key -> record; duplicates mean the file was not written by one run."""
    index: dict[tuple, dict] = {}
    for record in records:
        key = record_key(record)
        if key in index:
            raise ResultsFileError(
                f"{path} holds two records for {dict(zip(KEY_FIELDS, key, strict=True))}; "
                "it was not written by the resumable runner alone. Use a new output dir."
            )
        index[key] = dict(record)
    return index


# ---------------------------------------------------------------------------- grid


def method_budget_grid(
    methods: Sequence[str], budgets: Sequence[int], *, include_full: bool = True
) -> list[tuple[str, int | None]]:
    """(method, budget) pairs to run; full KV once with budget None, first."""
    grid: list[tuple[str, int | None]] = []
    if include_full or FULL_METHOD in methods:
        grid.append((FULL_METHOD, None))
    for method in methods:
        if method != FULL_METHOD:
            grid.extend((method, int(b)) for b in budgets)
    return grid


def resolve_max_new_tokens(
    tasks: Sequence[str], overrides: Mapping[str, int] | None, suite: TaskSuite = QUICK_SUITE
) -> dict[str, int]:
    """Answer allowance per task: the suite's defaults updated with `overrides`."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(suite.task_names))
    if unknown:
        raise ValueError(f"max_new_tokens_per_task has unknown task(s): {', '.join(unknown)}")
    defaults = suite.default_max_new_tokens
    resolved = {t: int(overrides.get(t, defaults[t])) for t in tasks}
    bad = {t: n for t, n in resolved.items() if n <= 0}
    if bad:
        raise ValueError(f"max_new_tokens must be positive, got {bad}")
    return resolved


def validate_grid(
    methods: Sequence[str],
    budgets: Sequence[int],
    context_lengths: Sequence[int],
    tasks: Sequence[str],
    samples_per_task: int,
    task_names: Sequence[str] = QUICK_SUITE.task_names,
) -> None:
    """Raise ValueError naming the first bad argument of a run."""
    unknown = [m for m in methods if m not in EVAL_METHOD_NAMES]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; known: {', '.join(EVAL_METHOD_NAMES)}"
        )
    unknown = [t for t in tasks if t not in task_names]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(task_names)}")
    if not methods or not tasks or not context_lengths:
        raise ValueError("methods, tasks and context lengths must each be non-empty")
    if any(m != FULL_METHOD for m in methods) and not budgets:
        raise ValueError("compressed methods need at least one token budget")
    for name, values in (("budget", budgets), ("context length", context_lengths)):
        bad = [v for v in values if not isinstance(v, int) or v <= 0]
        if bad:
            raise ValueError(f"every {name} must be a positive integer, got {bad}")
    if samples_per_task <= 0:
        raise ValueError(f"samples_per_task must be positive, got {samples_per_task}")


def prepare_samples(
    tokenizer,
    keys: Iterable[SampleKey],
    *,
    seed: int,
    max_new_tokens: Mapping[str, int],
    show_progress: bool = True,
    suite: TaskSuite = QUICK_SUITE,
) -> dict[SampleKey, TaskSample]:
    """Generate the samples for (task, context_length, index) keys from `suite`."""
    return suite.make_samples(
        tokenizer, keys, seed=seed, max_new_tokens=max_new_tokens, show_progress=show_progress
    )


def check_prompts_match(
    samples: Mapping[SampleKey, TaskSample], records: Iterable[Mapping[str, Any]], path: Path
) -> None:
    """Raise ResultsFileError if a recorded prompt hash differs from the regenerated prompt."""
    for record in records:
        key = (record.get("task"), record.get("context_length"), record.get("sample"))
        sample = samples.get(key)
        recorded = record.get("prompt_sha1")
        if sample is not None and recorded is not None and recorded != sample.prompt_sha1:
            raise ResultsFileError(
                f"{path}: the prompt of {key[0]} context {key[1]} sample {key[2]} differs from "
                "the recorded one (different tokenizer or task code?); results would not be "
                "comparable. Use a new output directory."
            )


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _result_record(
    sample: TaskSample, method: str, budget: int | None, output: str, suite: TaskSuite
) -> dict[str, Any]:
    return {
        "suite": suite.name,
        "method": method,
        "budget": budget,
        "task": sample.task,
        "context_length": sample.context_length,
        "depth": sample.depth,
        "sample": sample.index,
        "seed": sample.seed,
        "prompt_tokens": sample.prompt_tokens,
        "max_new_tokens": sample.max_new_tokens,
        "expected": list(sample.answers),
        "output": output,
        "score": suite.score(sample.task, output, sample.answers),
        "prompt_sha1": sample.prompt_sha1,
    }


def _checked_outputs(outputs: Any, n_prompts: int, method: str) -> list[str]:
    if not isinstance(outputs, list | tuple) or len(outputs) != n_prompts:
        got = len(outputs) if isinstance(outputs, list | tuple) else type(outputs).__name__
        raise EngineContractError(
            f"generate_fn({method!r}) must return a list of {n_prompts} strings, got {got}"
        )
    if not all(isinstance(o, str) for o in outputs):
        raise EngineContractError(f"generate_fn({method!r}) returned a non-string output")
    return list(outputs)


def results_identity(
    suite: TaskSuite,
    seed: int,
    max_new_tokens_per_task: Mapping[str, int] | None = None,
    engine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the records of an accuracy run mean, apart from their grid cell: `engine` (what
    produced the outputs: model, dtype, kernels, method settings; see eval/model_fns.py), the
    suite (its templates and package versions), the seed and the answer allowance of every
    task of the suite (not only those run, so that adding tasks keeps the identity)."""
    return {
        **dict(engine or {}),
        **suite.identity(),
        "seed": seed,
        "max_new_tokens": resolve_max_new_tokens(
            suite.task_names, max_new_tokens_per_task, suite),
    }


def run_eval(
    generate_fn: GenerateFn,
    tokenizer,
    *,
    methods: Sequence[str],
    budgets: Sequence[int],
    context_lengths: Sequence[int],
    tasks: Sequence[str],
    samples_per_task: int,
    seed: int,
    out_dir: str | os.PathLike,
    max_new_tokens_per_task: Mapping[str, int] | None = None,
    batch_size: int = 8,
    include_full: bool = True,
    show_progress: bool = True,
    suite: TaskSuite = QUICK_SUITE,
    engine_identity: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    force: bool = False,
    replaces: Sequence[str] = (),
) -> Path:
    """Run (or resume) the accuracy grid and return the path of results.jsonl.

    Grid: full KV once per sample (budget None; added even if not in `methods` unless
    include_full=False), then every other method at every budget, for every context
    length, task and sample index 0..samples_per_task-1. Prompts of one (context length,
    answer allowance) form batches of up to `batch_size`; each batch runs every (method,
    budget) in turn, one `generate_fn` call each, and each call's records are appended
    and fsynced before the next, so a kill loses at most one call.

    The file's header records `results_identity(suite, seed, max_new_tokens_per_task,
    engine_identity)` (give `engine_identity` everything that decides generate_fn's
    outputs) and `info` (recorded, not compared). An existing file of another identity is
    refused; its cells may differ (a grid may grow). `force` starts the file over, and
    removes the files named in `replaces` (in out_dir: other files of the old run) then.
    Nothing is created before the arguments, the existing file and every pending prompt
    have been checked.

    Raises ValueError for bad arguments, ResultsFileError for a damaged or incompatible
    existing file, TaskError if prompts cannot be built, EngineContractError if
    generate_fn breaks its contract. `suite` supplies the prompts, answer allowances and
    scoring (default: quick).
    """
    validate_grid(methods, budgets, context_lengths, tasks, samples_per_task, suite.task_names)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    new_tokens = resolve_max_new_tokens(tasks, max_new_tokens_per_task, suite)
    path = Path(out_dir) / RESULTS_FILE
    identity = results_identity(suite, seed, max_new_tokens_per_task, engine_identity)
    store = ResultsStore(path, identity, info=info, force=force,
                         replaces=[Path(out_dir) / name for name in replaces])
    existing = store.check()
    done = index_records(existing, path)

    grid = method_budget_grid(methods, budgets, include_full=include_full)
    # Prompts are grouped by (context, answer allowance) and batched; each batch then runs
    # every (method, budget) back to back, so an engine that caches a batch's dense
    # prefill (engine_functions does) computes it once for the whole grid.
    groups: dict[tuple, list[SampleKey]] = {}
    todo: dict[SampleKey, list[tuple]] = {}
    total = 0
    for context in context_lengths:
        for task in tasks:
            for index in range(samples_per_task):
                key = (task, context, index)
                groups.setdefault((context, new_tokens[task]), []).append(key)
                for method, budget in grid:
                    total += 1
                    if (method, budget, task, context, index) not in done:
                        todo.setdefault(key, []).append((method, budget))
    groups = {g: [k for k in keys if k in todo] for g, keys in groups.items()}
    pending = sum(len(v) for v in todo.values())
    # Build every pending prompt first, so a context the essays cannot fill fails now and
    # not hours into the run; also rebuild one finished sample per (task, context) to
    # catch changed task code (the tokenizer is in the engine's identity).
    spot_checks = {
        (r["task"], r["context_length"]): (r["task"], r["context_length"], r["sample"])
        for r in existing
        if r["task"] in new_tokens
    }
    samples = prepare_samples(
        tokenizer,
        [*(key for keys in groups.values() for key in keys), *spot_checks.values()],
        seed=seed,
        max_new_tokens=new_tokens,
        show_progress=show_progress,
        suite=suite,
    )
    check_prompts_match(samples, existing, path)

    with (
        store.open() as append,
        tqdm(
            total=total,
            initial=total - pending,
            desc="eval",
            unit="gen",
            disable=not show_progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        for (context, max_new), keys in groups.items():
            for chunk in _chunks(keys, batch_size):
                for method, budget in grid:
                    batch = [samples[k] for k in chunk if (method, budget) in todo[k]]
                    if not batch:
                        continue
                    bar.set_postfix_str(f"{method} budget={budget} ctx={context}", refresh=False)
                    token_budget = context if budget is None else budget
                    prompts = [s.prompt for s in batch]
                    outputs = generate_fn(prompts, method, token_budget, max_new)
                    outputs = _checked_outputs(outputs, len(batch), method)
                    append(
                        [
                            _result_record(s, method, budget, o, suite)
                            for s, o in zip(batch, outputs, strict=True)
                        ],
                    )
                    bar.update(len(batch))
    return path

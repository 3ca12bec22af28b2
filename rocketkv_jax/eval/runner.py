"""Resumable accuracy runs: every (method, budget, task, context, sample) -> one JSON line.

`run_eval` appends one record per finished generation to ``<out_dir>/results.jsonl``.
On start it reads that file, skips records already there and appends only the missing
ones; finished lines are never rewritten. A run killed mid-write leaves a truncated last
line, which is detected and cut off (only that partial line) before appending.

Contract relied on for `generate_fn(prompts, method, token_budget, max_new_tokens)`:
positional arguments in that order; it returns one decoded string per prompt, in order,
containing only the newly generated text (not the prompt), greedy decoding. Prompts in
one call may have different lengths. For the full-KV method the budget is meaningless:
it is called with ``token_budget = context_length`` and recorded with budget null.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rocketkv_jax.eval.suites import QUICK_SUITE, SampleKey, TaskSuite
from rocketkv_jax.eval.tasks import TaskSample
from rocketkv_jax.names import METHOD_NAMES, METHOD_VARIANT_NAMES  # JAX-free

logger = logging.getLogger(__name__)

EVAL_METHOD_NAMES = METHOD_NAMES + METHOD_VARIANT_NAMES
FULL_METHOD = "full"
RESULTS_FILE = "results.jsonl"
KEY_FIELDS = ("method", "budget", "task", "context_length", "sample")

GenerateFn = Callable[[list[str], str, int, int], list[str]]


class ResultsFileError(ValueError):
    """A results file is corrupt or was written by an incompatible run."""


class EngineContractError(RuntimeError):
    """The model engine returned something that breaks its documented contract."""


# ---------------------------------------------------------------------------- jsonl


def record_key(record: Mapping[str, Any]) -> tuple:
    """Identity of a record: (method, budget, task, context_length, sample)."""
    try:
        return tuple(record[name] for name in KEY_FIELDS)
    except KeyError as err:
        raise ResultsFileError(f"record lacks key field {err.args[0]!r}: {record}") from None


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read JSON-lines records; tolerate (and with `repair`, cut off) a truncated last line.

    A last line without a trailing newline that does not parse is the remains of a killed
    write: it is dropped with a warning, and with ``repair=True`` the file is truncated
    to the end of the last complete line so that appends start on a clean line. A last
    line that parses but lacks its newline gets the newline added (repair only). A
    corrupt line anywhere else raises ResultsFileError: that is not a kill, and guessing
    would lose data. Returns [] if the file does not exist.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records: list[dict[str, Any]] = []
    good_end = 0  # byte offset just past the last complete line
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ResultsFileError(
                    f"{path}:{number}: corrupt line ({err.msg}); only the last line may be "
                    "partial after a kill. Fix or delete this line, or use a new output dir."
                ) from None
            if not isinstance(record, dict):
                raise ResultsFileError(f"{path}:{number}: expected a JSON object")
            records.append(record)
        good_end += len(line) + 1
    tail = lines[-1]
    if tail.strip():
        try:
            record = json.loads(tail)
            complete = isinstance(record, dict)
        except json.JSONDecodeError:
            complete = False
        if complete:
            records.append(record)
            if repair:
                with path.open("ab") as handle:
                    handle.write(b"\n")
        else:
            logger.warning(
                "%s: dropping a truncated last line (%d bytes) left by an interrupted run",
                path,
                len(tail),
            )
            if repair:
                with path.open("r+b") as handle:
                    handle.truncate(good_end)
    return records


def append_jsonl(handle, records: Iterable[Mapping[str, Any]]) -> None:
    """Append records to an open binary file as one write, then flush and fsync."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    handle.write(payload.encode("utf-8"))
    handle.flush()
    os.fsync(handle.fileno())


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


def check_compatible(
    records: Iterable[Mapping[str, Any]], seed: int, path: Path, suite: str = "quick"
) -> None:
    """Raise ResultsFileError if existing records come from a run with another seed or
    another task suite (records without a suite field are from the quick suite)."""
    records = list(records)
    suites = {r.get("suite", "quick") for r in records}
    if suites - {suite}:
        raise ResultsFileError(
            f"{path} holds results of the {', '.join(sorted(suites - {suite}))} suite, but "
            f"this run uses the {suite} suite; use a new output directory."
        )
    seeds = {r.get("seed") for r in records}
    if seeds - {seed}:
        raise ResultsFileError(
            f"{path} holds results for seed(s) {sorted(map(str, seeds - {seed}))}, but this "
            f"run uses seed {seed}; use a new output directory or the same seed."
        )


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
) -> Path:
    """Run (or resume) the accuracy grid and return the path of results.jsonl.

    Grid: full KV once per sample (budget None; added even if not in `methods` unless
    include_full=False), then every other method at every budget, for every context
    length, task and sample index 0..samples_per_task-1. Prompts of one (context length,
    answer allowance) form batches of up to `batch_size`; each batch runs every (method,
    budget) in turn, one `generate_fn` call each, and each call's records are appended
    and fsynced before the next, so a kill loses at most one call. Raises ValueError for
    bad arguments, ResultsFileError for an incompatible existing file, TaskError if
    prompts cannot be built, EngineContractError if generate_fn breaks its contract.
    `suite` supplies the prompts, answer allowances and scoring (default: quick).
    """
    validate_grid(methods, budgets, context_lengths, tasks, samples_per_task, suite.task_names)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    new_tokens = resolve_max_new_tokens(tasks, max_new_tokens_per_task, suite)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    existing = read_jsonl(path, repair=True)
    check_compatible(existing, seed, path, suite.name)
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
    # catch a resume with another tokenizer or changed task code.
    spot_checks = {
        (r["task"], r["context_length"]): (r["task"], r["context_length"], r["sample"])
        for r in existing
        if r["task"] in new_tokens and r.get("seed") == seed
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
        path.open("ab") as handle,
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
                    append_jsonl(
                        handle,
                        [
                            _result_record(s, method, budget, o, suite)
                            for s, o in zip(batch, outputs, strict=True)
                        ],
                    )
                    bar.update(len(batch))
    return path

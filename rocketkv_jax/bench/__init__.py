"""`rocketkv bench`: decode speed, KV bytes and peak memory of every KV method vs full KV, and
vs peers (Hugging Face transformers, kvpress), measured in one run on this machine.

For each model, context T and token budget M, every method's jitted decode step
(`make_decode_step`, cache donated) runs on the cache its prefill builds, all methods
interleaved step by step; the table shows full time / method time (medians). Beside it:
KV bytes read per step from the plans' own accounting (`read_tokens`), XLA's cost-model
bytes of the compiled step, XLA's memory analysis of the decode step and of the whole
`generate` program, and the analytic H100 roofline for Llama-3.1-8B.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .. import checks  # JAX-free, like names: --help stays fast
from ..checks import flag
from ..names import DEFAULT_KERNELS, KERNEL_BACKENDS, KERNELS_HELP
from ..names import METHOD_NAMES as ALL_METHODS

DEFAULTS = dict(
    models="smollm2,llama8b-shape", contexts="4k,8k,16k,32k", budgets="256,512,1024,2048,4096",
    methods=",".join(ALL_METHODS), new_tokens=256, warmup=3, iters=20, batch=1,
    llama_layers=2, llama_vocab=8192, prefill="auto", prefill_memory_gb=10.0,
    peers=True, peer_context="4k", peer_new_tokens=64, peer_budget=256, peer_rounds=3,
    peer_threads="1,2", roofline_context="32k",
)
QUICK = dict(models="tiny", contexts="1k", budgets="128", methods="full,rocketkv", new_tokens=32,
             warmup=1, iters=5, peers=False)

DESCRIPTION = __doc__.split("\n\n", 1)[1].strip() + """

Models: `smollm2` = SmolLM2-135M, real weights (8k context, so 4k and 8k only; its 8k prompt
is 8192 - N tokens); `llama8b-shape` = Llama-3.1-8B layer shapes with random weights and
--llama-layers layers (vocab shrunk to --llama-vocab); `tiny` = a toy model (--quick).
Caches come from the model's real prefill, once per context (then each method's compress);
where XLA's memory analysis of that prefill exceeds --prefill-memory-gb (the dense T x T
attention: ~27 GB at 8k and ~415 GB at 32k for the 8B shape), k/v/q are random normal
stand-ins of the same shapes (--prefill auto)."""

EPILOG = """examples:
  rocketkv bench --quick                      # CI smoke, well under a minute
  rocketkv bench --calibrate                  # the cost model's constants for this device
  rocketkv bench                              # the full grid + peers (an hour or more on CPU)
  rocketkv bench --models smollm2 --contexts 4k --budgets 256,1024 --no-peers
  rocketkv bench --kvpress-python /tmp/kvpress-venv/bin/python --json bench.json
"""


MODEL_KEYS = ("smollm2", "llama8b-shape", "tiny")  # see benchmarks/bench_decode.py


class BenchError(ValueError):
    """Bad benchmark arguments."""


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def benchmark_module(name: str):
    """Import `benchmarks/<name>.py` of the source checkout this package runs from: the
    drivers live there, outside the library (the wheel does not ship them). The folder joins
    sys.path as it does for `python benchmarks/<script>.py`, for the drivers' own imports."""
    if not (BENCHMARKS / f"{name}.py").is_file():
        raise BenchError(f"`rocketkv bench` runs the drivers in benchmarks/ of a source "
                         f"checkout, and there is no {BENCHMARKS / name}.py here: clone the "
                         "repository and `pip install -e .` it")
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    return importlib.import_module(name)


# ----------------------------------------------------------------------------- parsing
def parse_size(s: str) -> int:
    """'4k' -> 4096, '32K' -> 32768, '1000' -> 1000."""
    s = s.strip().lower()
    try:
        n = int(s[:-1]) * 1024 if s.endswith("k") else int(s)
    except ValueError:
        raise BenchError(f"not a token count: {s!r} (use e.g. 4096 or 4k)") from None
    return checks.count(n, f"a token count ({s!r})", BenchError)


def parse_list(s: str, what: str) -> list[int]:
    out = [parse_size(x) for x in s.split(",") if x.strip()]
    if not out or any(x <= 0 for x in out):
        raise BenchError(f"--{what} needs positive token counts, got {s!r}")
    return out


COUNT = flag(checks.count)  # an integer >= 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: tiny random model, 1 context (1k), 2 methods (full, "
                   "rocketkv), budget 128, no peers; well under a minute")
    g = p.add_argument_group("grid")
    g.add_argument("--models", default=None, metavar="LIST",
                   help=f"comma list of smollm2, llama8b-shape, tiny, or none (no decode grid: "
                   f"peers and roofline only) (default: {d['models']})")
    g.add_argument("--contexts", default=None, metavar="LIST",
                   help=f"prompt lengths T, e.g. 4k,8k (default: {d['contexts']}); contexts "
                   "past a model's limit are skipped")
    g.add_argument("--budgets", default=None, metavar="LIST",
                   help=f"token budgets M (default: {d['budgets']})")
    g.add_argument("--methods", default=None, metavar="LIST",
                   help=f"KV methods; full always runs as the reference (default: all: "
                   f"{d['methods']})")
    g.add_argument("--new-tokens", type=COUNT, default=None, metavar="N",
                   help=f"max_new_tokens the plans are sized for; enters RocketKV's split as "
                   f"L = T + N (default: {d['new_tokens']})")
    g.add_argument("--warmup", type=flag(checks.count, low=0), default=None,
                   help=f"untimed decode steps per method (default: {d['warmup']})")
    g.add_argument("--iters", type=COUNT, default=None,
                   help=f"timed decode steps per method and (T, M); the median is reported "
                   f"(default: {d['iters']}); warmup + iters <= N")
    g.add_argument("--batch", type=COUNT, default=None, help=f"batch size (default: {d['batch']})")
    g.add_argument("--model", type=Path, default=None, metavar="PATH",
                   help="converted checkpoint used as `smollm2` (default: the embedded SmolLM2)")
    g.add_argument("--llama-layers", type=COUNT, default=None,
                   help=f"layers of the llama8b-shape model (default: {d['llama_layers']})")
    g.add_argument("--llama-vocab", type=COUNT, default=None,
                   help=f"vocabulary of the llama8b-shape model (default: {d['llama_vocab']})")
    g.add_argument("--prefill", choices=("auto", "model", "synthetic"), default=None,
                   help="how decode caches are built: the model's prefill, random k/v/q, or "
                   "auto = the model's prefill when it fits --prefill-memory-gb (default)")
    g.add_argument("--prefill-memory-gb", type=flag(checks.positive_number, float),
                   default=None,
                   help=f"XLA peak memory above which auto uses random k/v/q (default: "
                   f"{d['prefill_memory_gb']})")
    g.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip XLA's memory analysis of the whole generate program")
    g.add_argument("--roofline-context", default=None,
                   help=f"context of the H100 roofline tables (default: {d['roofline_context']})")
    g.add_argument("--seed", type=flag(checks.seed), default=0,
                   help="seed of the random weights, prompts and stand-in caches: any "
                   "integer in [0, 2**64)")
    g.add_argument("--stage2", default="auto", choices=("auto", "on", "off"),
                   help="sparse selection of hybrid, rocketkv, quest and sparq: auto = where "
                   "the cost model says it pays (see `rocketkv generate --help`)")
    g.add_argument("--kernels", default=DEFAULT_KERNELS, choices=KERNEL_BACKENDS,
                   help=KERNELS_HELP)
    pe = p.add_argument_group("peers (SmolLM2 only)")
    pe.add_argument("--peers", dest="peers", action="store_true", default=None,
                    help="run the peer comparison (default: on, off with --quick)")
    pe.add_argument("--no-peers", dest="peers", action="store_false")
    pe.add_argument("--peer-context", default=None,
                    help=f"prompt tokens (default: {d['peer_context']})")
    pe.add_argument("--peer-new-tokens", type=COUNT, default=None,
                    help=f"greedy new tokens (default: {d['peer_new_tokens']})")
    pe.add_argument("--peer-budget", type=COUNT, default=None,
                    help=f"token budget of rocketkv / snapkv / kvpress SnapKV (default: "
                    f"{d['peer_budget']})")
    pe.add_argument("--peer-rounds", type=COUNT, default=None,
                    help=f"interleaved rounds; medians are reported (default: "
                    f"{d['peer_rounds']})")
    pe.add_argument("--peer-threads", default=None, metavar="LIST",
                    help=f"torch thread counts to run the transformers / kvpress peers with "
                    f"(default: {d['peer_threads']}; on a shared machine 2 OpenMP threads can "
                    f"be much slower than 1)")
    pe.add_argument("--kvpress-python", default=None, metavar="PYTHON",
                    help="interpreter of a venv with kvpress (it pins transformers<5.3); "
                    "default: $ROCKETKV_BENCH_KVPRESS_PYTHON, else this one if it has kvpress")
    c = p.add_argument_group("cost-model calibration")
    c.add_argument("--calibrate", action="store_true",
                   help="measure nothing else: time the dense and sparse decode paths of every "
                   "kernel backend that runs here and write the dense fallback's cost "
                   "constants for this device (seconds to a minute), by default into the "
                   "user cache, where plans on this device find them")
    c.add_argument("--calibrate-file", type=Path, default=None, metavar="PATH",
                   help="write the constants here instead; plans use such a file through "
                   "$ROCKETKV_JAX_COST_FILE")
    c.add_argument("--calibrate-shape", default="auto", choices=("auto", "gpu", "cpu", "tiny"),
                   help="the timed shapes: auto = gpu on a GPU (Llama-3.1-8B heads, 64k slots, "
                   "batch 4), else cpu (16k slots, batch 1); tiny = seconds, for tests")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="also write every measurement as JSON (updated after every group)")
    o.add_argument("--report", type=Path, default=None, metavar="PATH",
                   help="measure nothing: re-print the tables of a --json file (also a partial "
                   "one from an interrupted run)")
    o.add_argument("--markdown", action="store_true",
                   help="with --report: print the tables as GitHub markdown")
    o.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars on stderr")


def parse_methods(text: str) -> list[str]:
    """--methods "a,b" -> ["full", a, b] (full first: the reference of every ratio);
    BenchError for a name that is not a KV method."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise BenchError(f"unknown method(s) {bad}; --methods takes {', '.join(ALL_METHODS)}")
    return ["full"] + [m for m in methods if m != "full"]


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults (quick ones under --quick), parse lists, validate."""
    if getattr(args, "markdown", False):
        raise BenchError("--markdown only formats the tables of --report PATH")
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip() not in ("", "none")]
    bad = [m for m in args.models if m not in MODEL_KEYS]
    if bad:
        raise BenchError(f"unknown model(s) {bad}; --models takes {', '.join(MODEL_KEYS)} "
                         "or none")
    args.contexts = parse_list(args.contexts, "contexts")
    args.budgets = parse_list(args.budgets, "budgets")
    args.methods = parse_methods(args.methods)
    args.peer_context = parse_size(str(args.peer_context))
    args.peer_threads = tuple(parse_list(str(args.peer_threads), "peer-threads"))
    args.roofline_context = parse_size(str(args.roofline_context))
    if args.json is not None:  # before the grid runs, not when it writes the results
        if args.json.is_dir():
            raise BenchError(f"--json {args.json} is a directory; give the path of a file")
        from ..paths import PathError, check_can_create

        try:
            check_can_create(args.json, f"write --json {args.json}")
        except PathError as e:
            raise BenchError(str(e)) from None
    if args.warmup + args.iters > args.new_tokens:
        raise BenchError(
            f"--warmup + --iters ({args.warmup + args.iters}) must be <= --new-tokens "
            f"({args.new_tokens}): the plans size the cache for N new tokens"
        )
    check_kernels(args.kernels)
    return args


def check_kernels(kernels: str) -> None:
    """BenchError for a --kernels backend this machine cannot run, naming the ones it can."""
    from ..kernels.backend import KernelsUnavailableError, check_available

    try:
        check_available(kernels)
    except KernelsUnavailableError as e:
        raise BenchError(f"--kernels {kernels}: {e}") from None


def model_contexts(config, contexts: list[int], N: int) -> list[tuple[int, str]]:
    """(T, label) per requested context that fits: T + N <= the model's context; a request
    of the full context (e.g. 8k for an 8k model) becomes T = max_position - N."""
    limit = config.max_position_embeddings
    out = []
    for c in contexts:
        if c + N <= limit:
            out.append((c, f"{c // 1024}k" if c % 1024 == 0 else str(c)))
        elif c <= limit and limit - N > 0:
            out.append((limit - N, f"{c // 1024}k*"))
    return out



def calibrate_command(args: argparse.Namespace) -> int:
    """`--calibrate`: the cost model's constants for this device (bench/calibrate.py)."""
    from . import calibrate

    calibrate.run(args.calibrate_shape, args.calibrate_file)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`func` of the `bench` subcommand."""
    args.command_line = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if args.calibrate:
        return calibrate_command(args)
    grid = benchmark_module("bench_grid")
    if args.report is not None:
        grid.report(args.report, args.markdown)
        return 0
    resolve_args(args)
    grid.run(args)
    return 0


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object (sets func=cmd_bench)."""
    p = subparsers.add_parser(
        "bench", help="decode speed, KV bytes and peak memory: methods vs full KV and peers",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


def build_parser(prog: str = "rocketkv bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str = "rocketkv bench") -> int:
    """Standalone entry point (benchmarks/decode.py): parse, run, exit code 2 on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    args.command_line = " ".join([prog, *argv])
    try:
        if args.calibrate:
            return calibrate_command(args)
        grid = benchmark_module("bench_grid")
        if args.report is not None:
            grid.report(args.report, args.markdown)
            return 0
        resolve_args(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    grid.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())


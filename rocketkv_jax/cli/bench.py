"""`rocketkv bench`: decode speed, KV bytes and peak memory of every KV method vs full KV, and
vs peers (Hugging Face transformers, kvpress), measured in one run on this machine; or
`--calibrate`, the cost model's constants for this device. The harness is
`rocketkv_jax/bench/` (`config.py` resolves these flags, `grid.py` runs them).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import checks
from ..bench.config import DEFAULTS
from ..names import STAGE2_MODES
from .common import UserError, add_command, add_kernels_arg, flag

DESCRIPTION = """For each model, context T and token budget M, every method's jitted decode step
(`make_decode_step`, cache donated) runs on the cache its prefill builds, all methods
interleaved step by step; the table shows full time / method time (medians). Beside it:
KV bytes read per step from the plans' own accounting (`read_tokens`), XLA's cost-model
bytes of the compiled step, XLA's memory analysis of the decode step and of the whole
`generate` program, and the analytic H100 roofline for Llama-3.1-8B.

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


COUNT = flag(checks.count)  # an integer >= 1


def add_arguments(p) -> None:
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
    g.add_argument("--stage2", default="auto", choices=STAGE2_MODES,
                   help="sparse selection of hybrid, rocketkv, quest and sparq: auto = where "
                   "the cost model says it pays (see `rocketkv generate --help`)")
    add_kernels_arg(g)
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


def add_parser(sub):
    """The `bench` subcommand (func=cmd_bench)."""
    p = add_command(sub, "bench", help="decode speed, KV bytes and peak memory: methods vs "
                    "full KV and peers", description=DESCRIPTION, epilog=EPILOG)
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


# the flags that are not BenchConfig fields
NOT_CONFIG = ("command", "func", "quick", "calibrate", "calibrate_file", "calibrate_shape",
              "report", "markdown")


def cmd_bench(args) -> int:
    from ..bench import calibrate, grid
    from ..bench.config import resolve_config

    if args.calibrate:
        calibrate.run(args.calibrate_shape, args.calibrate_file)
        return 0
    if args.report is not None:
        grid.report(args.report, args.markdown)
        return 0
    if args.markdown:
        raise UserError("--markdown only formats the tables of --report PATH")
    flags = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    config = resolve_config(quick=args.quick, **flags,
                            command_line=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    grid.run(config)
    return 0

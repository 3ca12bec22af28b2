"""What one sample of an eval grid costs at each batch size, measured on eval's own path.

    python benchmarks/eval_cost.py [--model qwen2.5-coder-0.5b] [--context 4k]
                                   [--batches 4,8] [--methods full,rocketkv,...]
                                   [--budgets 256,1024] [--steps 16] [--answer-tokens 128]
                                   [--json FILE]

`rocketkv eval` prefills each batch of prompts once (`SharedPrefill`) and decodes every
(method, budget) from it, so a sample costs one prompt's prefill plus, per cell, its share
of a batched decode. On a CPU a decode step of a small model reads mostly weights, which a
bigger batch shares, while a prefill costs the same per prompt at any batch. For each
batch size this times, on one repeated deterministic prompt of the model's own tokens:
the prefill (seconds per prompt), and the warm decode step of every cell (the first
generate compiles, the second is timed; no stop tokens, so every step runs). It prints
them, XLA's memory analysis of the prefill program (`--memory-only`: that alone), the
estimated seconds per sample of a grid whose every answer runs --answer-tokens steps,
and the ratio of each batch to the first. The weights are in `--weight-layout auto`'s
layout, as eval loads them. Batches are padded to powers of two, as eval pads them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("ROCKETKV_JAX_COMPILE_CACHE", "off")

from rocketkv_jax.bench.grid import machine_line  # noqa: E402
from rocketkv_jax.bench.script import model_load_errors_exit  # noqa: E402
from rocketkv_jax.checks import token_count  # noqa: E402
from rocketkv_jax.cli.common import load_model_on  # noqa: E402
from rocketkv_jax.engine.compile import params_struct  # noqa: E402
from rocketkv_jax.engine.requests import batch_bucket, prompt_bucket  # noqa: E402
from rocketkv_jax.engine.shared_prefill import SharedPrefill, raw_prefill_program  # noqa: E402
from rocketkv_jax.eval.model_fns import eval_method  # noqa: E402
from rocketkv_jax.eval.runner import method_budget_grid  # noqa: E402
from rocketkv_jax.kernels.backend import prefill_backend  # noqa: E402
from rocketkv_jax.models.params import layout_of  # noqa: E402
from rocketkv_jax.names import DEFAULT_KERNELS, DEFAULT_PREFILL_CHUNK  # noqa: E402

GRID_METHODS = "full,rocketkv,snapkv++,hybrid,quest,snapkv,streaming,sparq,topk"


def prefill_memory(model, batch: int, T: int) -> dict:
    """XLA's memory analysis of eval's prefill program for `batch` prompts padded to T
    (and the batch to its power of two): its temporaries and its outputs (every layer's
    k, v and the stored queries), in MiB. A grid holds the outputs while it decodes, plus
    one method's cache at a time. The arguments are SharedPrefill's, so that its prefill
    finds this program compiled."""
    program, _ = raw_prefill_program(model.config, batch_bucket(batch), T,
                                     params_struct(model.params), DEFAULT_PREFILL_CHUNK,
                                     prefill_backend(DEFAULT_KERNELS))
    stats = program.memory_analysis()
    return {"temp_mib": stats.temp_size_in_bytes / 2**20,
            "output_mib": stats.output_size_in_bytes / 2**20}


def measure_batch(model, ids: list[int], batch: int, grid, steps: int) -> dict:
    shared = SharedPrefill(model.params, model.config, [ids] * batch, max_new_tokens=steps)
    rows = {}
    for method, budget in grid:
        kv = eval_method(method, budget)
        shared.generate(kv, stop_ids=[])  # compiles
        stats = shared.generate(kv, stop_ids=[]).stats
        step_s = rows[f"{method}@{budget}" if budget else method] = stats.decode_s / (steps - 1)
        print(f"  batch {batch}: {method} {budget or ''} step {step_s * 1e3:.1f} ms",
              file=sys.stderr, flush=True)
    return {"prefill_s_per_prompt": shared.prefill_s / batch, "step_s": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b",
                   help="a named model or checkpoint directory (default: qwen2.5-coder-0.5b)")
    p.add_argument("--context", default="4k", help="prompt tokens, e.g. 4k or 4000 (default: 4k)")
    p.add_argument("--batches", default="4,8", help="batch sizes (default: 4,8)")
    p.add_argument("--methods", default=GRID_METHODS, help=f"default: {GRID_METHODS}")
    p.add_argument("--budgets", default="256,1024", help="token budgets (default: 256,1024)")
    p.add_argument("--steps", type=int, default=16,
                   help="decode steps timed per cell (default: 16)")
    p.add_argument("--answer-tokens", type=int, default=128,
                   help="decode steps per answer in the estimate (RULER's NIAH: 128)")
    p.add_argument("--memory-only", action="store_true",
                   help="compile the prefill program per batch and print XLA's memory "
                   "analysis only (no prefill, no decode)")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"--batches and --budgets take whole numbers, got {args.batches!r} and "
                f"{args.budgets!r}")
    if args.steps < 2 or min(batches) < 1:
        p.error("--steps must be at least 2 and every batch at least 1")
    context = token_count(args.context, "--context")
    T = context - args.answer_tokens  # the prompt, as eval sizes one for `context`
    if T < 1:
        p.error(f"--context {context} leaves no prompt before {args.answer_tokens} answer tokens")
    with model_load_errors_exit():
        model = load_model_on(args.model, None)
    if context > model.config.max_position_embeddings:
        p.error(f"--context {context} is beyond the model's window "
                f"({model.config.max_position_embeddings} tokens)")
    grid = method_budget_grid(args.methods.split(","), budgets, include_full=False)
    # deterministic; the cost does not depend on the text
    ids = [(1000 + i) % model.config.vocab_size for i in range(T)]
    machine = machine_line()
    print(machine)
    print(f"{args.model} ({layout_of(model.params)} weights), prompt {T} tokens, "
          f"{len(grid)} cells, {args.steps} timed steps each; estimate: {args.answer_tokens} "
          f"steps per answer")
    out = {"model": args.model, "machine": machine, "prompt_tokens": T,
           "steps": args.steps, "answer_tokens": args.answer_tokens, "batches": {}}
    bucket = prompt_bucket(T, model.config.max_position_embeddings - args.steps,
                           DEFAULT_PREFILL_CHUNK)
    for batch in batches:
        memory = prefill_memory(model, batch, bucket)
        print(f"batch {batch}: prefill program (prompts padded to {bucket}) temporaries "
              f"{memory['temp_mib']:.2f} MiB, outputs {memory['output_mib']:.2f} MiB")
        if not args.memory_only:
            out["batches"][batch] = {"prefill_memory": memory,
                                     **measure_batch(model, ids, batch, grid, args.steps)}
    if args.memory_only:
        return 0
    print(f"{'batch':>5} {'prefill s/prompt':>16} {'decode s/sample':>15} {'s/sample':>9} "
          f"{'vs first':>8}")
    first = None
    for batch, r in out["batches"].items():
        decode = sum(r["step_s"].values()) * args.answer_tokens / batch
        total = r["prefill_s_per_prompt"] + decode
        first = first or total
        r["decode_s_per_sample"], r["s_per_sample"] = decode, total
        print(f"{batch:>5} {r['prefill_s_per_prompt']:>16.1f} {decode:>15.1f} {total:>9.1f} "
              f"{first / total:>7.2f}x")
    print("step ms per cell: " + "; ".join(
        f"{cell} " + "/".join(f"{r['step_s'][cell] * 1e3:.0f}" for r in out["batches"].values())
        for cell in next(iter(out["batches"].values()))["step_s"]) + f" (batch {args.batches})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

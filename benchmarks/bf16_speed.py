"""bf16 against f32: prefill and decode of the same model with its params in each dtype,
side by side in one run, with the ratios f32 time / bf16 time (> 1: bf16 is faster).

    python benchmarks/bf16_speed.py                                  # SmolLM2, 4k, batch 1 and 8
    python benchmarks/bf16_speed.py --model qwen2.5-coder-0.5b --contexts 4k,8k,16k
    python benchmarks/bf16_speed.py --json docs/benchmarks/bf16-speed-smollm2.json

The params are the checkpoint's, cast to each dtype (`--dtypes`; the KV cache follows the
params). Prefill: the jitted prompt prefill (`make_prefill`, full KV, chunk `--chunk`) on a
random prompt of T tokens, batch 1. Decode: the jitted decode step (`make_decode_step`,
full KV, cache donated) after a prefill of T tokens (one row, repeated to each batch
size). The dtypes run interleaved (one rep or step of each in turn, after a warm-up that
compiles), and the median of each is reported, as wall time and as this process's CPU
time over the same interval (all its threads): on a shared machine the wall time grows
with the other jobs' load while the CPU time stays close to the work done, so a ratio
that holds in both is the program's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rocketkv_jax.bench.config import token_counts
from rocketkv_jax.bench.measure import broadcast_rows
from rocketkv_jax.bench.script import model_load_errors_exit
from rocketkv_jax.engine.generate import make_decode_step, make_prefill
from rocketkv_jax.methods import make_method
from rocketkv_jax.model_store import load_model
from rocketkv_jax.models.params import cast_params, unstack_layers


def timed(fn):
    """(wall seconds, process CPU seconds) of fn(), its outputs waited for."""
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - w0, time.process_time() - c0


def interleave(fns: dict, reps: int) -> dict:
    """{name: (median wall s, median CPU s)} of each fn, run `reps` times in turn."""
    runs = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name].append(timed(fn))
    return {name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
            for name, r in runs.items()}


def prefill_row(model, params, T: int, chunk: int, reps: int, rng) -> dict:
    config = model.config
    ids = jnp.asarray(rng.integers(10, config.vocab_size, (1, T)), jnp.int32)
    lengths = jnp.asarray([T], jnp.int32)
    plan = make_method("full").plan(config, T, 1)
    prefill = make_prefill(config, plan, chunk)
    fns = {dt: (lambda p=p: prefill(p, ids, lengths)) for dt, p in params.items()}
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile
    return interleave(fns, reps)


def decode_rows(model, params, T: int, batches, steps: int, rng) -> dict:
    """{B: interleave result} of the decode step at each batch size B, on the cache of one
    T-token prompt prefilled once per dtype and repeated to B rows."""
    config = model.config
    ids = jnp.asarray(rng.integers(10, config.vocab_size, (1, T)), jnp.int32)
    plan = make_method("full").plan(config, T, steps + 2)
    prefill = make_prefill(config, plan, 4096)
    step = make_decode_step(config, plan)
    first = {dt: prefill(p, ids, jnp.asarray([T], jnp.int32)) for dt, p in params.items()}
    out = {}
    for B in batches:
        lengths = jnp.full((B,), T, jnp.int32)
        state = {}
        for dt, p in params.items():
            logits, cache = first[dt]
            struct = jax.eval_shape(prefill, p, jnp.zeros((B, T), jnp.int32), lengths)[1]
            tok = jnp.broadcast_to(jnp.argmax(logits, -1).astype(jnp.int32), (B,))
            cache = jax.tree.map(jnp.copy, cache)  # the step donates it; `first` is kept
            state[dt] = [tok, lengths, broadcast_rows(cache, struct)]

        def one(dt, state=state):
            tok, pos, cache = state[dt]
            logits, cache = step(params[dt], tok, pos, cache)
            state[dt] = [jnp.argmax(logits, -1).astype(jnp.int32), pos + 1, cache]
            return logits

        fns = {dt: (lambda dt=dt: one(dt)) for dt in params}
        for fn in fns.values():
            jax.block_until_ready(fn())  # compile
        out[B] = interleave(fns, steps)
        del state
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="a named model or checkpoint (default: the embedded SmolLM2)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--contexts", default="4k",
                    help="prompt lengths of the prefill rows ('' for none)")
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk")
    ap.add_argument("--reps", type=int, default=3, help="prefill reps per dtype")
    ap.add_argument("--decode-context", default="4k", help="prompt length before decode")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes ('' for none)")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per dtype")
    ap.add_argument("--layout", choices=("stacked", "per-layer"), default="stacked")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    with model_load_errors_exit():
        model = load_model(args.model, progress=False)
    base = model.params if args.layout == "stacked" else unstack_layers(model.params)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    params = {dt: cast_params(base, jnp.dtype(dt)) for dt in dtypes}
    ref, other = dtypes[0], dtypes[-1]
    rng = np.random.default_rng(0)
    name = args.model or "smollm2-135m"
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
               f"jax {jax.__version__}, load avg {os.getloadavg()[0]:.1f} at start")
    print(f"# {name}, {args.layout} weights; {machine}")
    print(f"| what | {ref} s | {other} s | {ref}/{other} wall | {ref} CPU s | {other} CPU s "
          f"| {ref}/{other} CPU |")
    print("|---|---|---|---|---|---|---|")
    rows = []

    def report(what, res):
        (wa, ca), (wb, cb) = res[ref], res[other]
        rows.append({"what": what, ref: {"wall_s": wa, "cpu_s": ca},
                     other: {"wall_s": wb, "cpu_s": cb}})
        print(f"| {what} | {wa:.4g} | {wb:.4g} | {wa / wb:.2f} | {ca:.4g} | {cb:.4g} "
              f"| {ca / cb:.2f} |", flush=True)

    for T in token_counts(args.contexts, "context") if args.contexts else ():
        report(f"prefill T={T}", prefill_row(model, params, T, args.chunk, args.reps, rng))
    T = token_counts(args.decode_context, "decode context")[0]
    batches = token_counts(args.batches, "batch") if args.batches else ()
    for B, res in decode_rows(model, params, T, batches, args.steps, rng).items():
        report(f"decode step B={B} T={T}", res)
    if args.json:
        args.json.write_text(json.dumps({"model": name, "layout": args.layout,
                                         "machine": machine, "args": vars(args) | {
                                             "json": str(args.json)},
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

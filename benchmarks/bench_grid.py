"""The decode grid of `rocketkv bench` (rocketkv_jax/bench/ holds its flags): every KV
method's decode step timed against full KV per model, context and budget, its bytes and
memory (tables: bench_tables.py), and `--report`'s re-print of a --json file. `run(args)`
takes the arguments `rocketkv_jax.bench.resolve_args` resolved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import bench_decode as bd
from bench_bytes import (
    cpu_name,
    fmt_bytes,
    kv_read_bytes,
    llama_weight_bytes,
    model_dims,
    print_method_roofline,
    print_roofline,
    read_split,
)
from bench_peers import PeerError, print_peers, run_peers
from bench_tables import print_model_tables

from rocketkv_jax.bench import BenchError, model_contexts
from rocketkv_jax.cache import tree_bytes
from rocketkv_jax.methods import (
    METHOD_NAMES,
    METHOD_VARIANTS,
    Full,
    MethodConfigError,
    make_method,
    method_hparams,
)
from rocketkv_jax.user_text import read_text_file


# ------------------------------------------------------------------------------ grid
def plan_methods(config, methods, budget, T, N, stage2: str = "auto",
                 kernels: str = "auto") -> dict:
    """{method: plan or the MethodConfigError message}; `stage2` for the methods that
    take it (hybrid, rocketkv, quest, sparq), `kernels` the sparse attention's backend."""
    out = {}
    for m in methods:
        base = METHOD_VARIANTS.get(m, (m, {}))[0]
        takes = base in METHOD_NAMES and "stage2" in method_hparams(base)
        kw = {"stage2": stage2, "kernels": kernels} if takes else {"kernels": kernels}
        try:
            out[m] = make_method(m, budget, **kw).plan(config, T, N)
        except MethodConfigError as e:
            out[m] = str(e)
    return out


def run_model(bm, args, bar, rec: dict, save=None) -> dict:
    """The decode grid of one model, filling `rec` (see --json); `save()` after each group."""
    import jax

    cfg, B, N = bm.config, args.batch, args.new_tokens
    elem = 4  # float32 params and caches
    weights = llama_weight_bytes(model_dims(cfg), elem)
    base_plan = Full().plan(cfg, 16, 0)
    base = bd.compile_step(cfg, base_plan, bm.params,
                           bd.abstract_cache(cfg, base_plan, bm.params, 16, B), B)
    rec.update({"model": bm.key, "label": bm.label, "note": bm.note, "weights_bytes": weights,
                "layers": cfg.num_layers, "xla_base_bytes": base.loop_bytes, "prefill": [],
                "steps": [], "memory": [], "contexts": []})
    for T, label in model_contexts(cfg, args.contexts, N):
        rec["contexts"].append([T, label])
        bar.set_postfix_str(f"{bm.key} T={T}: prefill")
        cap, pre = _prefill(bm, T, B, args)
        rec["prefill"].append(pre)
        compiled: dict = {}
        for M in args.budgets:
            bar.set_postfix_str(f"{bm.key} T={T} M={M}")
            plans = plan_methods(cfg, args.methods, M, T, N, args.stage2, args.kernels)
            ok = {m: p for m, p in plans.items() if not isinstance(p, str)}
            caches, compress_s = {}, {}
            for m, p in ok.items():
                caches[m], compress_s[m] = bd.compress_cache(p, cap)
                if p not in compiled:
                    compiled[p] = bd.compile_step(cfg, p, bm.params, caches[m], B)
            kv_cache = {m: tree_bytes(c) for m, c in caches.items()}
            times = bd.time_interleaved({m: compiled[p].fn for m, p in ok.items()}, caches,
                                        bm.params, B=B, T=T, warmup=args.warmup,
                                        iters=args.iters)
            del caches
            full_t = bd.median(times["full"])
            for m, p in plans.items():
                if isinstance(p, str):
                    rec["steps"].append({"T": T, "M": M, "method": m, "error": p})
                    continue
                cs, S = compiled[p], T + 1
                attended, selection = read_split(p, S)
                kv = kv_read_bytes(p, S, cfg, elem, B)
                med = bd.median(times[m])
                rec["steps"].append({
                    "T": T, "M": M, "method": m, "plan": _jsonable(p.describe()
                                                                   if hasattr(p, "describe")
                                                                   else {"capacity": p.capacity}),
                    "median_s": med, "ratio": full_t / med, "times_s": times[m],
                    "compile_s": cs.compile_s, "compress_s": compress_s[m],
                    "read_tokens": p.read_tokens(S), "attended": attended,
                    "selection": selection, "kv_read_bytes": kv, "xla_bytes": cs.bytes_accessed,
                    "xla_loop_bytes": cs.loop_bytes,
                    "kv_cache_bytes": kv_cache[m], "step_memory": cs.memory,
                })
            if args.memory:
                for m in ("full", "rocketkv"):
                    p = plans.get(m)
                    if p is None or isinstance(p, str) or (m == "full" and M != args.budgets[0]):
                        continue
                    mem, cs = bd.generate_program_memory(bm, p, T, N, B)
                    rec["memory"].append({"T": T, "M": None if m == "full" else M, "method": m,
                                          "generate_memory": mem, "generate_compile_s": cs})
            bar.update(1)
            bd.release_memory()
            if save is not None:
                save()
        del cap, compiled
        bd.clear_compress_cache()
        jax.clear_caches()
        bd.release_memory()
    return rec


def _prefill(bm, T, B, args):
    """Decode-cache source for context T (see --prefill) and its record."""
    bd.release_memory()
    compiled, compile_s = bd.compile_capture_prefill(bm, T, B, args.kernels)
    mem = bd.memory_stats(compiled)
    peak = mem["peak"] if mem else 0
    avail = bd.available_memory()
    why = "--prefill " + args.prefill
    use_model = args.prefill == "model"
    if args.prefill == "auto":
        fits = peak <= args.prefill_memory_gb * 1e9
        free = avail is None or peak + 1e9 <= avail  # 1 GB for the process around it
        use_model = fits and free
        why = (f"XLA peak {fmt_bytes(peak)}" + ("" if fits else f" > --prefill-memory-gb "
               f"{args.prefill_memory_gb:g}") + ("" if free else
               f"; {fmt_bytes(avail)} available on the machine"))
    if use_model:
        cap, prefill_s = bd.capture_prefill(bm, T, B, compiled)
    else:
        cap, prefill_s = bd.synthetic_capture(bm.config, T, B, args.seed), None
    del compiled
    bd.release_memory()
    return cap, {"T": T, "mode": "model" if use_model else "synthetic", "prefill_s": prefill_s,
                 "compile_s": compile_s, "memory": mem, "why": why,
                 "available_bytes": avail}


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, int | float | str | bool | type(None)) else str(v))
            for k, v in d.items()}


def machine_line() -> str:
    import jax
    import numpy as np

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return (f"machine: {cpu_name()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM; "
            f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}); "
            f"jax {jax.__version__}, numpy {np.__version__}, python {platform.python_version()}; "
            f"nice {os.nice(0)}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


# ------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    """Run the benchmark for resolved args; prints the tables, returns every record."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    print(machine_line(), flush=True)
    print(f"command: {args.command_line}", flush=True)
    results: dict = {"machine": machine_line(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(args).items()
                                                         if k not in ("func", "report")},
                     "models": []}
    models = [bd.load_bench_model(key, model_path=args.model, layers=args.llama_layers,
                                vocab=args.llama_vocab, seed=args.seed) for key in args.models]
    total = sum(len(model_contexts(bm.config, args.contexts, args.new_tokens)) for bm in models)
    with tqdm(total=total * len(args.budgets), desc="decode grid", unit="group",
              file=sys.stderr, disable=not args.progress or not total) as bar:
        while models:
            bm = models.pop(0)
            rec: dict = {}
            results["models"].append(rec)
            run_model(bm, args, bar, rec, save=lambda: _save(results, args))
            print_model_tables(rec, args)
            sys.stdout.flush()
            if bm.key == "smollm2" and args.peers:
                results["peers"] = _run_peers(bm, args)
            del bm
    if args.peers and "smollm2" not in args.models:
        results["peers"] = _run_peers(
            bd.load_bench_model("smollm2", model_path=args.model, seed=args.seed), args)
    print_roofline(args.roofline_context, args.new_tokens, [1, 8], args.budgets)
    results["h100_bound"] = print_method_roofline(args.methods, args.roofline_context,
                                                  args.new_tokens, [1, 8], args.budgets)
    results["wall_s"] = time.perf_counter() - t_start
    print(f"\nwall time {results['wall_s']:.0f} s; {machine_line().split('; ')[-1]}")
    if args.json:
        _save(results, args)
        print(f"wrote {args.json}")
    return results


def _save(results: dict, args) -> None:
    """Write the results so far to --json (after every group, so a killed run keeps them)."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))


def _run_peers(bm, args) -> dict:
    try:
        return run_peers(bm, T=args.peer_context, N=args.peer_new_tokens,
                         budget=args.peer_budget, rounds=args.peer_rounds,
                         kvpress_python=args.kvpress_python, threads=args.peer_threads,
                         progress=args.progress)
    except PeerError as e:
        print(f"\npeers: not run: {e}")
        return {"error": str(e)}


def report(path: Path, markdown: bool = False) -> None:
    """Print the tables of a results JSON written by --json (as markdown tables if asked)."""
    try:
        res = json.loads(read_text_file(path, "results file", BenchError))
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}:{e.lineno}: not JSON ({e.msg}); --report reads the file "
                         f"`rocketkv bench --json PATH` writes") from None
    if not (isinstance(res, dict) and isinstance(res.get("args"), dict)
            and isinstance(res.get("models"), list) and "machine" in res):
        raise BenchError(f"{path} is not a results file of `rocketkv bench --json PATH` (it "
                         f"has no args, machine and models)")
    args = argparse.Namespace(**{**res["args"], "markdown": markdown})
    print(res["machine"])
    print(f"command: {args.command_line}")
    for rec in res["models"]:
        if rec.get("steps"):
            print_model_tables(rec, args)
    if res.get("peers", {}).get("summary"):
        print_peers(res["peers"], markdown)
    if "h100_bound" in res:
        print_roofline(args.roofline_context, args.new_tokens, [1, 8], args.budgets, markdown)
        print_method_roofline(args.methods, args.roofline_context, args.new_tokens,
                              [1, 8], args.budgets, markdown)
    if "wall_s" in res:
        print(f"\nwall time {res['wall_s']:.0f} s")



"""The decode grid of `rocketkv bench` (rocketkv_jax/bench/ holds its flags): every KV
method's decode step timed against full KV per model, context and budget, its bytes and
memory, the tables, and `--report`'s re-print of a --json file. `run(args)` takes the
arguments `rocketkv_jax.bench.resolve_args` resolved.
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
    print_table,
    read_split,
)
from bench_peers import PeerError, print_peers, run_peers

from rocketkv_jax.bench import BenchError, model_contexts
from rocketkv_jax.methods import (
    METHOD_NAMES,
    METHOD_VARIANTS,
    Full,
    MethodConfigError,
    make_method,
    method_hparams,
)


# ------------------------------------------------------------------------------ grid
def plan_methods(config, methods, budget, T, N, stage2: str = "auto") -> dict:
    """{method: plan or the MethodConfigError message}; `stage2` for the methods that
    take it (hybrid, rocketkv, quest, sparq)."""
    out = {}
    for m in methods:
        base = METHOD_VARIANTS.get(m, (m, {}))[0]
        takes = base in METHOD_NAMES and "stage2" in method_hparams(base)
        kw = {"stage2": stage2} if takes else {}
        try:
            out[m] = make_method(m, budget, **kw).plan(config, T, N)
        except MethodConfigError as e:
            out[m] = str(e)
    return out


def cache_bytes(cache) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


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
            plans = plan_methods(cfg, args.methods, M, T, N, getattr(args, "stage2", "auto"))
            ok = {m: p for m, p in plans.items() if not isinstance(p, str)}
            caches, compress_s = {}, {}
            for m, p in ok.items():
                caches[m], compress_s[m] = bd.compress_cache(p, cap)
                if p not in compiled:
                    compiled[p] = bd.compile_step(cfg, p, bm.params, caches[m], B)
            kv_cache = {m: cache_bytes(c) for m, c in caches.items()}
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
    compiled, compile_s = bd.compile_capture_prefill(bm, T, B)
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
        cap = bd.capture_prefill(bm, T, B, compiled, compile_s)
    else:
        cap = bd.synthetic_capture(bm.config, T, B, args.seed)
    del compiled
    bd.release_memory()
    return cap, {"T": T, "mode": cap.mode, "prefill_s": cap.prefill_s if use_model else None,
                 "compile_s": compile_s, "memory": mem, "why": why,
                 "available_bytes": avail}


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, int | float | str | bool | type(None)) else str(v))
            for k, v in d.items()}


# ----------------------------------------------------------------------------- tables
def _grid_table(rec, args, title, cell, methods=None, extra=None) -> None:
    """One row per (T, M), one column per method; cell(step record) -> str."""
    methods = methods or args.methods
    by = {(s["T"], s["M"], s["method"]): s for s in rec["steps"]}
    labels = dict(rec["contexts"])
    rows = []
    for T, _ in rec["contexts"]:
        for M in args.budgets:
            row = [labels[T] + (f" ({T})" if labels[T].endswith("*") else ""), str(M)]
            if extra:
                row += extra(by, T, M)
            for m in methods:
                s = by.get((T, M, m))
                row.append("-" if s is None else "n/a" if "error" in s else cell(s))
            rows.append(row)
    head = ["T", "M"] + (["full ms"] if extra else []) + list(methods)
    print_table(title, head, rows, args.markdown)


def print_model_tables(rec, args) -> None:
    print(f"\n=== {rec['label']}: {rec['note']}")
    for p in rec["prefill"]:
        mem = p["memory"]
        how = (f"model prefill {p['prefill_s']:.1f} s" if p["mode"] == "model"
               else f"synthetic k/v/q, prefill not run ({p['why']})")
        print(f"  T={p['T']}: {how}; prefill compile {p['compile_s']:.1f} s; XLA peak memory "
              f"of the prefill forward {fmt_bytes(mem['peak']) if mem else 'n/a'}")
    if rec["xla_base_bytes"]:
        print(f"  weights read per step (analytic) {fmt_bytes(rec['weights_bytes'])}; XLA bytes of "
              f"a 16-token full-cache decode step (loop-aware) {fmt_bytes(rec['xla_base_bytes'])}"
              f" = {rec['xla_base_bytes'] / rec['weights_bytes']:.2f} x the weights")
    others = [m for m in args.methods if m != "full"]

    def full_ms(by, T, M):
        s = by.get((T, M, "full"))
        return [f"{s['median_s'] * 1e3:.1f}" if s and "error" not in s else "n/a"]

    _grid_table(rec, args,
                f"Decode step speedup vs full KV = full time / method time (>1: faster), "
                f"{rec['label']}, batch {args.batch}, float32; median of {args.iters} steps "
                f"after {args.warmup} warm-up, methods interleaved step by step",
                lambda s: f"{s['ratio']:.2f}", others, extra=full_ms)
    if any(lbl.endswith("*") for _, lbl in rec["contexts"]):
        print("  * the model's whole context: T = max_position_embeddings - N")
    by = {(s["T"], s["M"], s["method"]): s for s in rec["steps"] if "error" not in s}
    W = rec["weights_bytes"]

    def analytic_bound(s):
        full = by.get((s["T"], s["M"], "full"))
        return f"{(W + full['kv_read_bytes']) / (W + s['kv_read_bytes']):.2f}" if full else "n/a"

    def xla_ratio(s):
        full = by.get((s["T"], s["M"], "full"))
        ok = full and full["xla_loop_bytes"] and s["xla_loop_bytes"]
        return f"{full['xla_loop_bytes'] / s['xla_loop_bytes']:.2f}" if ok else "n/a"

    _grid_table(rec, args,
                f"Analytic bound = (weights + full KV bytes) / (weights + method KV bytes), what "
                f"an ideal memory-bound step would gain, {rec['label']}", analytic_bound, others)
    _grid_table(rec, args,
                f"XLA bytes ratio = full / method XLA bytes accessed (loop-aware): the speedup "
                f"if time followed XLA's byte count, {rec['label']}", xla_ratio, others)
    _grid_table(rec, args,
                f"Effective bandwidth = XLA bytes accessed (loop-aware) / measured step time "
                f"(GB/s); similar values across methods mean time follows XLA's bytes, "
                f"{rec['label']}",
                lambda s: f"{s['xla_loop_bytes'] / s['median_s'] / 1e9:.1f}"
                if s["xla_loop_bytes"] else "n/a")
    _grid_table(rec, args, f"Decode step compile time (s), {rec['label']}",
                lambda s: f"{s['compile_s']:.1f}")
    _grid_table(rec, args,
                f"Analytic KV bytes read per decode step (MB; read_tokens(S) x layers x KV heads"
                f" x 2 x D x 4 B x batch, S = T + 1), {rec['label']}; weights read per step "
                f"{fmt_bytes(rec['weights_bytes'])}",
                lambda s: f"{s['kv_read_bytes'] / 1e6:.1f}")
    _grid_table(rec, args,
                f"XLA bytes accessed per decode step (layer loop counted {rec['layers']} times) "
                f"/ analytic bytes (weights + KV), {rec['label']}",
                lambda s: f"{s['xla_loop_bytes'] / (rec['weights_bytes'] + s['kv_read_bytes']):.2f}"
                if s["xla_loop_bytes"] else "n/a")
    base = rec["xla_base_bytes"]
    _grid_table(rec, args,
                f"XLA KV multiplier = (XLA bytes - XLA bytes of a 16-token full-cache step, "
                f"{fmt_bytes(base)}) / analytic KV bytes (both loop-aware), {rec['label']}",
                lambda s: f"{(s['xla_loop_bytes'] - base) / s['kv_read_bytes']:.1f}"
                if s["xla_loop_bytes"] and base else "n/a")
    _print_split(rec, args)
    _print_memory(rec, args)


def _print_split(rec, args) -> None:
    """Largest context: tokens read per step and head, split into attended and selection."""
    T = rec["contexts"][-1][0] if rec["contexts"] else None
    rows = []
    for s in rec["steps"]:
        if s["T"] != T or "error" in s:
            continue
        rows.append([str(s["M"]), s["method"], str(s["plan"].get("capacity", "")),
                     str(s["read_tokens"]), str(s["attended"]), str(s["selection"]),
                     fmt_bytes(s["kv_read_bytes"]), fmt_bytes(s["xla_bytes"]),
                     fmt_bytes(s["xla_loop_bytes"]), fmt_bytes(s["kv_cache_bytes"])])
    if rows:
        print_table(
            f"Per-step reads at T={T}, {rec['label']}: read_tokens = attended + selection "
            "(tokens' worth of K+V per KV head; selection = page max/min, R-channel bounds or "
            "key channels read to choose the attended tokens)",
            ["M", "method", "capacity", "read_tokens", "attended", "selection", "KV bytes",
             "XLA bytes (as reported)", "XLA bytes (loop-aware)", "cache bytes"], rows,
            args.markdown)
        print("  XLA's cost analysis counts the body of a while loop once; the decode step "
              "loops over the layers,\n  so 'as reported' holds one layer's weights and per-layer "
              "cache traffic. 'loop-aware' re-runs\n  XLA's cost analysis on the loop body and "
              "counts it once per layer.")


def _print_memory(rec, args) -> None:
    steps = {(s["T"], s["M"], s["method"]): s for s in rec["steps"] if "error" not in s}
    rows = []
    for m in rec["memory"]:
        M = m["M"] if m["M"] is not None else args.budgets[0]
        s = steps.get((m["T"], M, m["method"]))
        full = next((x for x in rec["memory"] if x["T"] == m["T"] and x["method"] == "full"),
                    None)
        gen, step = m["generate_memory"], s["step_memory"] if s else None
        ratio = ""
        if full and gen and full["generate_memory"]:
            ratio = f"{gen['peak'] / full['generate_memory']['peak'] - 1:+.0%}"
        rows.append([
            str(m["T"]), m["method"], "-" if m["M"] is None else str(m["M"]),
            fmt_bytes(s["kv_cache_bytes"]) if s else "n/a",
            fmt_bytes(step["peak"]) if step else "n/a",
            fmt_bytes(step["temp"]) if step else "n/a",
            fmt_bytes(gen["peak"]) if gen else "n/a", fmt_bytes(gen["temp"]) if gen else "n/a",
            ratio,
        ])
    if rows:
        print_table(
            f"Peak memory from XLA's memory analysis (argument + output + temp - donated), "
            f"{rec['label']}, batch {args.batch}, N={args.new_tokens}",
            ["T", "method", "M", "KV cache", "decode step peak", "decode step temp",
             "generate program peak", "generate temp", "generate peak vs full"], rows,
            args.markdown)
        print("  generate program = prefill + compress + while-loop decode (what generate_ids "
              "runs); its temp\n  is dominated by the dense prefill attention scores "
              "[B, H, T, T] f32, not by the cache.")


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
    if not path.is_file():
        raise BenchError(f"no results file {path}")
    res = json.loads(path.read_text())
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



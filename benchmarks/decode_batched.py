"""Batched decode at long context: every KV method's decode step vs full KV at batch 1, 4, 8
and 8k-32k context, next to the analytic H100 bound and this CPU's own byte roofline.

One run measures everything: this machine's memory bandwidth (a copy and a read benchmark,
best of several, before and after the grid), then for each model, batch B, context T and
budget M every method's jitted decode step (`make_decode_step`, cache donated) on the cache
its `compress` builds from random k/v (no prefill is run: `measure.synthetic_capture` at
batch 1, broadcast to B), interleaved step by step with full KV (`time_interleaved`).

Per step it reports:
  - speedup = full median time / method median time (>1: faster), from one interleaved run;
  - the byte bound on this model = (weights + full KV bytes) / (weights + method bytes), the
    speedup of a perfectly memory-bound step (bytes from the plans' `read_tokens`, page
    metadata and selection reads included: `methods.read_bytes.kv_read_bytes`);
  - the H100 bound for Llama-3.1-8B (32 layers, bf16) at the same B, T, M
    (`bench.roofline.print_method_roofline`);
  - roofline = (weights + KV + metadata bytes) / measured bandwidth, and measured / roofline.

The `full-aa` column (on by default; --no-aa drops it) is full KV timed against itself: the
same compiled step on its own copy of the cache, interleaved in the first group. Its speedup
column is the noise floor of the run: a method cell within the A/A spread of 1.0 is not
measurably different from full KV.

With --attention-baseline, one more column, `full-reference`: full KV whose decode attention
is the materialised [B, H, 1, S] softmax (`attention="reference"`, what every dense step ran
before the blockwise `decode_attention`), interleaved with full KV in the first group, so its
speedup column is (blockwise full time / reference full time) from the same run.

Methods whose caches do not fit in memory together are measured in several interleaved
groups, each with full KV (its ratio is against the full KV of its own group); a cell whose
full KV cache cannot be built is skipped and the table says so.

    python benchmarks/decode_batched.py --quick          # tiny model, well under a minute
    python benchmarks/decode_batched.py --json docs/benchmarks/decode-batched.json
    python benchmarks/decode_batched.py --report docs/benchmarks/decode-batched.json --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from rocketkv_jax.bench import measure as bd
from rocketkv_jax.bench.config import BenchError, parse_methods, token_counts
from rocketkv_jax.bench.grid import machine_line, plan_methods
from rocketkv_jax.bench.measure import best_bandwidth, broadcast_rows, measure_bandwidth
from rocketkv_jax.bench.roofline import (
    H100_HBM_BYTES_PER_S,
    llama_weight_bytes,
    model_dims,
    print_method_roofline,
)
from rocketkv_jax.bench.tables import fmt_bytes, print_table
from rocketkv_jax.cache import tree_bytes
from rocketkv_jax.engine.compile import drop_compiled_programs
from rocketkv_jax.engine.shared_prefill import STORED_QUERY_WINDOW, RawPrefill
from rocketkv_jax.methods.read_bytes import kv_read_bytes
from rocketkv_jax.models.params import with_layout
from rocketkv_jax.models.plan import compress_layers
from rocketkv_jax.names import METHOD_NAMES as ALL_METHODS
from rocketkv_jax.names import STAGE2_MODES, WEIGHT_LAYOUTS

ELEM = 4  # float32 params and caches
REFERENCE = "full-reference"  # full KV with the materialised softmax (--attention-baseline)
AA = "full-aa"  # full KV again, on its own copy of the cache: the A/A column (noise floor)
BESIDE_FULL = (REFERENCE, AA)  # extra columns timed in full KV's group, never a method
SLOWER = 1.05  # target: no method's step more than 5% slower than full KV's
# The exact top-k oracle scores every key by design (the accuracy ceiling of the sparse
# methods, not a fast method) and so has no dense fallback: a dense step would not be the
# oracle's output. Its cells are reported beside the target, not in it.
ORACLES = ("topk", "topk_head")
DEFAULTS = dict(models="llama8b-shape,smollm2-shape", batches="8,4,1", contexts="32k,16k,8k",
                budgets="256,2048", methods=",".join(ALL_METHODS), new_tokens=256,
                warmup=1, iters=5, llama_layers=2, llama_vocab=8192, bandwidth_mb=1024,
                bandwidth_repeats=5, memory_fraction=0.7)
QUICK = dict(models="tiny", batches="1,2", contexts="256", budgets="64",
             methods="full,streaming,rocketkv", new_tokens=16, warmup=1, iters=3,
             bandwidth_mb=64, bandwidth_repeats=3)
MODEL_KEYS = ("llama8b-shape", "smollm2-shape", "tiny")


def load_model(key: str, args, layout: str = "stacked") -> tuple[bd.BenchModel, str]:
    """The benchmark model and the layout it runs: its weights stacked over layers or one
    array per layer (`unstack_layers`: each matmul reads its layer's own array), "auto"
    deciding as generate does (`auto_layout`)."""
    bm = _load_model(key, args)
    params, layout = with_layout(bm.params, layout, jax.default_backend())
    if layout == "per-layer":
        bm = dataclasses.replace(bm, label=f"{bm.label}, per-layer weights", params=params)
    return bm, layout


def _load_model(key: str, args) -> bd.BenchModel:
    """`smollm2-shape` is SmolLM2-135M (its weights) with the context limit raised to fit
    the largest context: decode cost does not depend on RoPE's range."""
    if key == "smollm2-shape":
        bm = bd.load_bench_model("smollm2", seed=args.seed)
        limit = max(args.contexts) + args.new_tokens
        cfg = dataclasses.replace(bm.config, max_position_embeddings=max(
            limit, bm.config.max_position_embeddings))
        return dataclasses.replace(
            bm, key=key, label="SmolLM2-135M shape", config=cfg,
            note=f"SmolLM2-135M weights, float32, {cfg.num_layers} layers, {cfg.num_heads}/"
            f"{cfg.num_kv_heads} heads, head_dim {cfg.head_dim}, context limit raised to "
            f"{cfg.max_position_embeddings}")
    return bd.load_bench_model(key, layers=args.llama_layers, vocab=args.llama_vocab,
                               seed=args.seed)


def batch_capture(base: RawPrefill, T: int, B: int) -> RawPrefill:
    """The first T tokens of a batch-1 capture, broadcast to B rows (materialized)."""
    Ly, _, K, _, D = base.k.shape
    k = jnp.broadcast_to(base.k[:, :, :, :T], (Ly, B, K, T, D))  # [Ly, B, K, T, D]
    v = jnp.broadcast_to(base.v[:, :, :, :T], (Ly, B, K, T, D))  # [Ly, B, K, T, D]
    q = jnp.broadcast_to(base.q, (base.q.shape[0], B, *base.q.shape[2:]))  # [Ly, B, H, W, D]
    return RawPrefill(*jax.block_until_ready((k, v, q)), jnp.full((B,), T, jnp.int32))


def capture_struct(cfg, T: int, B: int):
    """Shapes of `batch_capture(., T, B)`: a RawPrefill of shape structs."""
    Ly, H, K, D, W = (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      STORED_QUERY_WINDOW)
    f = jnp.float32
    return RawPrefill(jax.ShapeDtypeStruct((Ly, B, K, T, D), f),
                      jax.ShapeDtypeStruct((Ly, B, K, T, D), f),
                      jax.ShapeDtypeStruct((Ly, B, H, W, D), f),
                      jax.ShapeDtypeStruct((B,), jnp.int32))


def group_methods(sizes: dict[str, int], room: int) -> tuple[list[list[str]], list[str]]:
    """Split the methods into interleaved groups, each with full KV, whose caches fit in
    `room` bytes together, smallest caches first (first fit): (groups, methods that do not
    fit even beside full alone)."""
    groups: list[list[str]] = [["full"]]
    used = [sizes["full"]]
    skipped = []
    for m in sorted((m for m in sizes if m != "full"), key=lambda m: sizes[m]):
        if sizes["full"] + sizes[m] > room:
            skipped.append(m)
            continue
        i = next((i for i, u in enumerate(used) if u + sizes[m] <= room), None)
        if i is None:
            groups.append(["full"])
            used.append(sizes["full"])
            i = len(groups) - 1
        groups[i].append(m)
        used[i] += sizes[m]
    return groups, skipped


# ------------------------------------------------------------------------------ grid
@dataclasses.dataclass
class ModelRun:
    """One model's state through the grid: its record, the batch-1 capture every cache is
    built from, and its compiled decode steps by (plan, B)."""

    bm: bd.BenchModel
    rec: dict
    weights: int
    base: RawPrefill
    compiled: dict


def start_model(key: str, args, rec: dict, layout: str = "stacked") -> ModelRun:
    bm, layout = load_model(key, args, layout)
    cfg = bm.config
    weights = llama_weight_bytes(model_dims(cfg), ELEM)
    rec.update({"model": bm.key, "layout": layout, "label": bm.label, "note": bm.note,
                "layers": cfg.num_layers, "weights_bytes": weights, "steps": [], "skipped": []})
    t0 = time.perf_counter()
    longest = max(T for T in args.contexts if T + args.new_tokens <= cfg.max_position_embeddings)
    base = bd.synthetic_capture(cfg, longest, 1, args.seed)
    rec["capture_s"] = time.perf_counter() - t0
    return ModelRun(bm, rec, weights, base, {})


def run_grid(args, results: dict) -> None:
    """Budget, then batch, then context, then model, each in the order given (the defaults
    put the largest batch and context first, so a run cut short keeps the target cells)."""
    runs = []
    for key in args.models:
        for layout in args.layout:
            rec: dict = {}
            results["models"].append(rec)
            runs.append(start_model(key, args, rec, layout))
    for M in args.budgets:
        for B in args.batches:
            for T in args.contexts:
                for r in runs:
                    if T + args.new_tokens <= r.bm.config.max_position_embeddings:
                        _run_cell(r, args, B, T, M)
                        _save(results, args)
    del runs
    drop_compiled_programs()
    bd.release_memory()


def _run_cell(r: ModelRun, args, B: int, T: int, M: int) -> None:
    bm, rec, base, compiled, weights = r.bm, r.rec, r.base, r.compiled, r.weights
    cfg, N = bm.config, args.new_tokens
    plans = plan_methods(cfg, args.methods, M, T, N, args.stage2)
    for m, p in plans.items():
        if isinstance(p, str):
            rec["skipped"].append({"B": B, "T": T, "M": M, "method": m, "why": p})
    ok = {m: p for m, p in plans.items() if not isinstance(p, str)}
    if args.attention_baseline:
        ok[REFERENCE] = dataclasses.replace(ok["full"], attention="reference")
    if args.aa:
        ok[AA] = ok["full"]  # the same plan, so the same compiled step
    cap_struct = capture_struct(cfg, T, B)
    structs = {m: jax.eval_shape(lambda r, p=p: compress_layers(p, r.k, r.v, r.q, r.lengths),
                                 cap_struct) for m, p in ok.items()}
    sizes = {m: tree_bytes(s) for m, s in structs.items()}
    bd.release_memory()
    avail = bd.available_memory() or 2**62
    # the caches are compressed from one row and broadcast (`broadcast_rows`)
    cap_bytes = tree_bytes(capture_struct(cfg, T, 1))
    room = int(avail * args.memory_fraction) - cap_bytes
    groups, too_big = group_methods({m: n for m, n in sizes.items() if m not in BESIDE_FULL},
                                    room)
    for extra in (m for m in BESIDE_FULL if m in ok):  # beside full KV in the first group
        fits = groups and sum(sizes[m] for m in groups[0]) + sizes[extra] <= room
        (groups[0] if fits else too_big).append(extra)
    why = (f"does not fit beside full KV: capture {fmt_bytes(cap_bytes)} + caches > "
           f"{args.memory_fraction:g} x {fmt_bytes(avail)} available")
    if sizes["full"] > room or groups == [["full"]] and len(ok) > 1:  # nothing to compare
        groups, too_big = [], list(ok)
    for m in too_big:
        rec["skipped"].append({"B": B, "T": T, "M": M, "method": m, "why": why})
    S = T + 1  # the first timed step sees the prompt plus one token
    full_kv = kv_read_bytes(ok["full"], S, cfg, ELEM, B)
    for gi, group in enumerate(groups):
        print(f"  {bm.key} B={B} T={T} M={M} group {gi}: {','.join(group)}", file=sys.stderr,
              flush=True)
        for m in group:
            if (ok[m], B) not in compiled:
                compiled[ok[m], B] = bd.compile_step(cfg, ok[m], bm.params, structs[m], B)
        cap = batch_capture(base, T, 1)
        caches, compress_s = {}, {}
        for m in group:
            one, compress_s[m] = bd.compress_cache(ok[m], cap)
            caches[m] = broadcast_rows(one, structs[m])
            del one
        del cap
        bd.release_memory()
        times = bd.time_interleaved({m: compiled[ok[m], B].fn for m in group}, caches, bm.params,
                                    B=B, T=T, warmup=args.warmup, iters=args.iters)
        del caches
        bd.release_memory()
        full_t = bd.median(times["full"])
        for m in group:
            if m == "full" and gi > 0:
                continue  # full KV's own row comes from the first group
            p, med = ok[m], bd.median(times[m])
            kv = kv_read_bytes(p, S, cfg, ELEM, B)
            rec["steps"].append({
                "B": B, "T": T, "M": M, "method": m, "group": gi, "group_methods": group,
                "median_s": med, "full_median_s": full_t, "speedup": full_t / med,
                "times_s": times[m], "kv_read_bytes": kv, "step_bytes": weights + kv,
                "byte_bound": (weights + full_kv) / (weights + kv),
                "plan": type(p).__name__, "fallback": _describe(p).get("fallback", ""),
                "capacity": _describe(p).get("capacity"), "kv_cache_bytes": sizes[m],
                "compile_s": compiled[p, B].compile_s, "compress_one_row_s": compress_s[m],
            })


def _describe(plan) -> dict:
    return plan.describe() if hasattr(plan, "describe") else {}


# ----------------------------------------------------------------------------- tables
def finalize(results: dict) -> None:
    """Rooflines from the best bandwidth, and the H100 bound of each (method, B, T, M)."""
    bw = best_bandwidth(results)
    results["roofline_bandwidth_GBps"] = bw / 1e9
    h100 = results.setdefault("h100_bound", {})
    for rec in results["models"]:
        for s in rec["steps"]:
            s["roofline_s"] = s["step_bytes"] / bw
            s["over_roofline"] = s["median_s"] / s["roofline_s"]
            method = "full" if s["method"] in BESIDE_FULL else s["method"]  # full KV's bytes
            bound = h100.get(str(s["T"]), {}).get(method, {}).get(str(s["B"]), {})
            s["h100_bound"] = bound.get(str(s["M"]))


def h100_bounds(args) -> dict:
    """{T: {method: {B: {M: bound}}}} for Llama-3.1-8B on an H100 (string keys, as in JSON);
    from `print_method_roofline`, its table not printed."""
    out = {}
    for T in args.contexts:
        with contextlib.redirect_stdout(io.StringIO()):  # the grids show them per cell
            b = print_method_roofline(args.methods, T, args.new_tokens, args.batches,
                                      args.budgets)
        out[str(T)] = {m: {str(B): {str(M): v for M, v in d.items()} for B, d in by.items()}
                       for m, by in b.items()}
    return out


def _label(T: int) -> str:
    return f"{T // 1024}k" if T % 1024 == 0 else str(T)


def _grid(rec, args, title, cell, with_full=False, note=None, markdown=False) -> None:
    """One row per (B, T, M), one column per method; cell(step) -> str."""
    by = {(s["B"], s["T"], s["M"], s["method"]): s for s in rec["steps"]}
    skip = {(s["B"], s["T"], s["M"], s["method"]): s for s in rec["skipped"]}
    methods = [m for m in _columns(args) if with_full or m != "full"]
    rows = []
    for B in sorted(args.batches):
        for T in sorted(args.contexts):
            for M in sorted(args.budgets):
                full = by.get((B, T, M, "full"))
                if not any((B, T, M, m) in by or (B, T, M, m) in skip for m in methods):
                    continue  # not reached (a partial run) or not asked
                row = [str(B), _label(T), str(M),
                       f"{full['median_s'] * 1e3:.1f}" if full else "-"]
                for m in methods:
                    s = by.get((B, T, M, m))
                    sk = skip.get((B, T, M, m))
                    row.append(cell(s) if s else ("mem" if sk and "fit" in sk["why"] else
                                                  "n/a" if sk else "-"))
                rows.append(row)
    print_table(title, ["B", "T", "M", "full ms", *methods], rows, markdown=markdown)
    if note:
        print(note)


def _columns(args) -> list[str]:
    """The methods of the tables: those asked, and full-reference with --attention-baseline."""
    extra = [REFERENCE] if getattr(args, "attention_baseline", False) else []
    return [*args.methods, *([AA] if getattr(args, "aa", False) else []), *extra]


def print_model(rec, args, bw: float, markdown: bool = False) -> None:
    def grid(*a, **k):
        _grid(rec, args, *a, markdown=markdown, **k)

    print(f"\n=== {rec['label']}: {rec['note']}; weights read per step "
          f"{fmt_bytes(rec['weights_bytes'])}")
    grid(
        f"Decode step speedup vs full KV = full time / method time (>1: faster), "
        f"{rec['label']}, float32, median of {args.iters} steps after {args.warmup} warm-up, "
        "each method interleaved step by step with full KV", lambda s: f"{s['speedup']:.2f}",
        note="  mem: its cache and full KV's do not fit in memory together; n/a: the plan "
        "is not defined at this budget" + (
            f"\n  {REFERENCE}: full KV with the materialised softmax; 1 / its speedup = how "
            "much faster the blockwise decode attention makes full KV's step"
            if getattr(args, "attention_baseline", False) else "") + (
            f"\n  {AA}: full KV against itself (its own cache copy, same step): how far "
            "from 1.00 noise alone moves a cell" if getattr(args, "aa", False) else ""))
    grid(
        f"Byte bound on this model = (weights + full KV bytes) / (weights + method bytes), "
        f"{rec['label']}, float32", lambda s: f"{s['byte_bound']:.2f}")
    grid(
        "H100 bound: Llama-3.1-8B (32 layers), bf16, "
        f"{H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s, same B, T, M",
        lambda s: "n/a" if s["h100_bound"] is None else f"{s['h100_bound']:.2f}")
    grid(
        f"Measured / roofline: step time / ((weights + KV + metadata bytes) / "
        f"{bw / 1e9:.1f} GB/s), {rec['label']} (1.0 = at this CPU's bandwidth)",
        lambda s: f"{s['over_roofline']:.2f}", with_full=True)
    grid(f"Roofline ms = (weights + KV + metadata bytes) / {bw / 1e9:.1f} GB/s, "
         f"{rec['label']}", lambda s: f"{s['roofline_s'] * 1e3:.1f}", with_full=True)


def targets(results: dict) -> dict:
    """The issue's targets, checked from the measurements."""
    every = [{**s, "model": r["model"], "layout": r.get("layout", "stacked")}
             for r in results["models"] for s in r["steps"]
             if s["method"] not in ("full", *BESIDE_FULL)]
    steps = [s for s in every if s["method"] not in ORACLES]
    oracle = [s for s in every if s["method"] in ORACLES]
    keys = ("model", "layout", "B", "T", "M", "method", "speedup", "plan", "fallback")

    def slow(cells):
        return [{k: s[k] for k in keys}
                for s in sorted(cells, key=lambda s: s["speedup"]) if s["speedup"] < 1 / SLOWER]

    worst = min(steps, key=lambda s: s["speedup"]) if steps else None
    aa = [s["speedup"] for r in results["models"] for s in r["steps"] if s["method"] == AA]
    out = {"cells": len(steps), "slower_than_full_by_5pct": slow(steps),
           "worst": worst and {k: worst[k] for k in ("B", "T", "M", "method", "speedup")},
           "oracle_cells": len(oracle), "oracle_slower_than_full_by_5pct": slow(oracle)}
    if aa:  # the noise floor: full KV against itself, per cell
        out["aa"] = {"cells": len(aa), "min": min(aa), "max": max(aa),
                     "outside_5pct": sum(not 1 / SLOWER <= x <= SLOWER for x in aa)}
        # keyed by layout too: `--layout stacked,per-layer` runs one model twice
        cell_aa = {(r["model"], r.get("layout", "stacked"), s["B"], s["T"], s["M"]): s["speedup"]
                   for r in results["models"] for s in r["steps"] if s["method"] == AA}
        for s in out["slower_than_full_by_5pct"]:
            key = (s["model"], s["layout"], s["B"], s["T"], s["M"])
            if key in cell_aa:
                s["aa"] = cell_aa[key]
    for r in results["models"]:
        if r["model"] != "llama8b-shape":
            continue
        layout = r.get("layout", "stacked")
        hit = [s for s in r["steps"] if s["method"] == "rocketkv" and s["M"] == 256
               and s["B"] == max(x["B"] for x in r["steps"])
               and s["T"] == max(x["T"] for x in r["steps"])]
        if hit:
            s = hit[0]
            out.setdefault("rocketkv_by_layout", {})[layout] = {
                "B": s["B"], "T": s["T"], "M": s["M"], "speedup": s["speedup"],
                "byte_bound": s["byte_bound"], "fraction_of_bound": s["speedup"] / s[
                    "byte_bound"], "over_roofline": s["over_roofline"],
                "met_80pct": s["speedup"] / s["byte_bound"] >= 0.8,
                "met_2x_roofline": s["over_roofline"] <= 2.0}
    return out


def print_targets(t: dict) -> None:
    print(f"\nTargets: {len(t['slower_than_full_by_5pct'])} of {t['cells']} method cells are "
          f"slower than full KV by more than {SLOWER - 1:.0%} (speedup < {1 / SLOWER:.3f})")
    for s in t["slower_than_full_by_5pct"]:
        why = f", dense by {s['fallback']}" if s["fallback"] else ""
        aa = f"; A/A in this cell {s['aa']:.2f}" if "aa" in s else ""
        print(f"  {s.get('model', '')} B={s['B']} T={s['T']} M={s['M']} {s['method']}: "
              f"{s['speedup']:.2f} ({s['plan']}{why}{aa})")
    if "aa" in t:
        a = t["aa"]
        print(f"A/A (full KV against itself): {a['min']:.2f}-{a['max']:.2f} over {a['cells']} "
              f"cells, {a['outside_5pct']} outside 1.00 +- {SLOWER - 1:.0%}")
    if t.get("oracle_cells"):
        oracle = t["oracle_slower_than_full_by_5pct"]
        print(f"The exact top-k oracle (scores every key; no fallback by design, not in the "
              f"target): {len(oracle)} of {t['oracle_cells']} cells slower by more than "
              f"{SLOWER - 1:.0%}" + "".join(
                  f"\n  B={s['B']} T={s['T']} M={s['M']} {s['method']}: {s['speedup']:.2f}"
                  for s in oracle))
    by_layout = t.get("rocketkv_by_layout") or ({"stacked": t["rocketkv"]} if "rocketkv" in t
                                                 else {})
    for layout, r in by_layout.items():
        print(f"rocketkv M={r['M']} T={r['T']} B={r['B']} (Llama-3.1-8B shape, {layout} "
              "weights): speedup "
              f"{r['speedup']:.2f}x of a {r['byte_bound']:.2f}x byte bound = "
              f"{r['fraction_of_bound']:.0%} (target >= 80%: "
              f"{'met' if r['met_80pct'] else 'not met'}); step time {r['over_roofline']:.2f}x "
              f"its roofline (target <= 2x: {'met' if r['met_2x_roofline'] else 'not met'})")


def print_results(results: dict, args, markdown: bool = False) -> None:
    print(results["machine"])
    print(f"command: {results['command']}; started {results['date']}")
    for b in results["bandwidth"]:
        print(f"memory bandwidth ({b['when']}, {fmt_bytes(b['buffer_bytes'])} buffer, best of "
              f"{b['repeats']}): numpy copy {b['copy_GBps']:.1f} GB/s (read + write), jitted "
              f"read {b['read_GBps']:.1f} GB/s")
    bw = best_bandwidth(results)
    print(f"roofline bandwidth = the best of these: {bw / 1e9:.1f} GB/s")
    for rec in results["models"]:
        if rec.get("steps"):
            print_model(rec, args, bw, markdown)
    if "targets" in results:
        print_targets(results["targets"])
    if "wall_s" in results:
        print(f"\nwall time {results['wall_s']:.0f} s; at the end: "
              f"{results['machine_after'].split('; ')[-1]}")


# ------------------------------------------------------------------------------- main
def _save(results: dict, args) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))


def run(args) -> dict:
    t_start = time.perf_counter()
    results: dict = {"machine": machine_line(), "command": args.command_line,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "args": {k: str(v) if isinstance(v, Path) else v
                              for k, v in vars(args).items()}, "bandwidth": [], "models": []}
    print(results["machine"], flush=True)
    bw = measure_bandwidth(args.bandwidth_mb * 2**20, args.bandwidth_repeats)
    results["bandwidth"].append({"when": "before the grid", **bw})
    run_grid(args, results)
    bw = measure_bandwidth(args.bandwidth_mb * 2**20, args.bandwidth_repeats)
    results["bandwidth"].append({"when": "after the grid", **bw})
    results["h100_bound"] = h100_bounds(args)
    finalize(results)
    results["targets"] = targets(results)
    results["machine_after"] = machine_line()
    results["wall_s"] = time.perf_counter() - t_start
    _save(results, args)
    print_results(results, args)
    return results


def build_parser(prog: str) -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, batches 1,2, context 256, 3 methods (under a minute)")
    p.add_argument("--models", help=f"comma list of {', '.join(MODEL_KEYS)} "
                   f"(default: {d['models']})")
    p.add_argument("--batches", help=f"batch sizes (default: {d['batches']})")
    p.add_argument("--contexts", help=f"contexts T (default: {d['contexts']})")
    p.add_argument("--budgets", help=f"token budgets M (default: {d['budgets']})")
    p.add_argument("--methods", help=f"KV methods; full always runs (default: {d['methods']})")
    p.add_argument("--new-tokens", type=int,
                   help=f"N the plans are sized for (default: {d['new_tokens']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps (default: {d['warmup']})")
    p.add_argument("--iters", type=int, help=f"timed steps (default: {d['iters']})")
    p.add_argument("--llama-layers", type=int, help=f"default: {d['llama_layers']}")
    p.add_argument("--llama-vocab", type=int, help=f"default: {d['llama_vocab']}")
    p.add_argument("--bandwidth-mb", type=int,
                   help=f"bandwidth benchmark buffer in MiB (default: {d['bandwidth_mb']})")
    p.add_argument("--bandwidth-repeats", type=int, help=f"default: {d['bandwidth_repeats']}")
    p.add_argument("--memory-fraction", type=float,
                   help="share of the available memory the capture and one group's caches "
                   f"may take (default: {d['memory_fraction']})")
    p.add_argument("--stage2", default="auto", choices=STAGE2_MODES)
    p.add_argument("--layout", default="auto",
                   help="comma list of weight layouts, each a model of its own in the run: "
                   "stacked (one array per weight over all layers, sliced in the layer loop), "
                   "per-layer (one array per layer, each matmul in a switch over the "
                   "layers; see benchmarks/weight_slicing.py) or auto (what generate and "
                   "serve choose: per-layer on CPU for layers of 24 MiB or more) "
                   "(default: auto)")
    p.add_argument("--aa", action=argparse.BooleanOptionalAction, default=True,
                   help=f"time {AA}: full KV against itself in the same run, the noise floor "
                   "of the speedups (default: on)")
    p.add_argument("--attention-baseline", action="store_true",
                   help=f"also time {REFERENCE}: full KV with the materialised softmax decode "
                   "attention, interleaved with full KV (old vs new in one run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every measurement as JSON")
    p.add_argument("--report", type=Path, help="measure nothing: print the tables of a --json")
    p.add_argument("--markdown", action="store_true",
                   help="with --report: print the tables as GitHub markdown")
    return p


def resolve_args(args) -> argparse.Namespace:
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODEL_KEYS]
    if bad:
        raise BenchError(f"unknown model(s) {bad}; --models takes {', '.join(MODEL_KEYS)}")
    args.batches = list(token_counts(args.batches, "batches"))
    args.contexts = list(token_counts(args.contexts, "contexts"))
    args.budgets = list(token_counts(args.budgets, "budgets"))
    args.methods = parse_methods(args.methods)
    args.layout = [x.strip() for x in args.layout.split(",") if x.strip()]
    bad = [x for x in args.layout if x not in ("auto", *WEIGHT_LAYOUTS)] or (
        [] if args.layout else ["(none)"])
    if bad or len(set(args.layout)) < len(args.layout):
        raise BenchError(f"--layout takes a comma list of distinct auto, "
                         f"{', '.join(WEIGHT_LAYOUTS)}; "
                         f"got {','.join(args.layout) or 'nothing'}")
    if args.warmup + args.iters > args.new_tokens:
        raise BenchError("--warmup + --iters must be <= --new-tokens (the cache's room)")
    return args


def main(argv=None, prog: str = "benchmarks/decode_batched.py") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    args.command_line = " ".join([prog, *argv])
    if args.report is not None:
        res = json.loads(args.report.read_text())
        saved = argparse.Namespace(**res["args"])
        if "targets" not in res:  # a run stopped before its end: finish the accounting
            res["h100_bound"] = h100_bounds(saved)
            finalize(res)
            res["targets"] = targets(res)
            print("(a partial run: the grid stopped early)")
        print_results(res, saved, args.markdown)
        return 0
    try:
        resolve_args(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

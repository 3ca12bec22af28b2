"""The decode grid of `rocketkv bench`: every KV method's decode step timed against full KV
per model, context and budget, its bytes and memory (tables: `tables.py`), the peers, and
`--report`'s re-print of a --json file. `run(config)` takes a resolved `BenchConfig`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from ..cache import tree_bytes
from ..methods import Full, MethodConfigError, make_method, sweep_settings
from ..methods.read_bytes import kv_read_bytes
from ..user_text import read_text_file
from . import measure
from .config import BenchConfig, BenchError, model_contexts
from .peers import PeerError, print_peers, run_peers
from .roofline import (
    cpu_name,
    llama_weight_bytes,
    model_dims,
    print_method_roofline,
    print_roofline,
    read_split,
)
from .tables import fmt_bytes, print_model_tables


# ------------------------------------------------------------------------------ grid
def plan_methods(model_config, methods, budget, T, N, stage2: str = "auto",
                 kernels: str = "auto") -> dict:
    """{method: plan or the MethodConfigError message}; `stage2` for the methods that
    take it (hybrid, rocketkv, quest, sparq), `kernels` the sparse attention's backend."""
    out = {}
    for m in methods:
        try:
            method = make_method(m, budget, **sweep_settings(m, stage2=stage2, kernels=kernels))
            out[m] = method.plan(model_config, T, N)
        except MethodConfigError as e:
            out[m] = str(e)
    return out


def run_model(bm, config, bar, rec: dict, save=None) -> dict:
    """The decode grid of one model, filling `rec` (see --json); `save()` after each group."""
    from ..engine.compile import drop_compiled_programs

    cfg, B, N = bm.config, config.batch, config.new_tokens
    elem = 4  # float32 params and caches
    weights = llama_weight_bytes(model_dims(cfg), elem)
    base_plan = Full().plan(cfg, 16, 0)
    base = measure.compile_step(cfg, base_plan, bm.params,
                                measure.abstract_cache(cfg, base_plan, bm.params, 16, B), B)
    rec.update({"model": bm.key, "label": bm.label, "note": bm.note, "weights_bytes": weights,
                "layers": cfg.num_layers, "xla_base_bytes": base.loop_bytes, "prefill": [],
                "steps": [], "memory": [], "contexts": []})
    for T, label in model_contexts(cfg, config.contexts, N):
        rec["contexts"].append([T, label])
        bar.set_postfix_str(f"{bm.key} T={T}: prefill")
        cap, pre = _prefill(bm, T, B, config)
        rec["prefill"].append(pre)
        compiled: dict = {}
        for M in config.budgets:
            bar.set_postfix_str(f"{bm.key} T={T} M={M}")
            plans = plan_methods(cfg, config.methods, M, T, N, config.stage2, config.kernels)
            ok = {m: p for m, p in plans.items() if not isinstance(p, str)}
            caches, compress_s = {}, {}
            for m, p in ok.items():
                caches[m], compress_s[m] = measure.compress_cache(p, cap)
                if p not in compiled:
                    compiled[p] = measure.compile_step(cfg, p, bm.params, caches[m], B)
            kv_cache = {m: tree_bytes(c) for m, c in caches.items()}
            times = measure.time_interleaved({m: compiled[p].fn for m, p in ok.items()}, caches,
                                        bm.params, B=B, T=T, warmup=config.warmup,
                                        iters=config.iters)
            del caches
            full_t = measure.median(times["full"])
            for m, p in plans.items():
                if isinstance(p, str):
                    rec["steps"].append({"T": T, "M": M, "method": m, "error": p})
                    continue
                cs, S = compiled[p], T + 1
                attended, selection = read_split(p, S)
                kv = kv_read_bytes(p, S, cfg, elem, B)
                med = measure.median(times[m])
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
            if config.memory:
                for m in ("full", "rocketkv"):
                    p = plans.get(m)
                    if p is None or isinstance(p, str) or (m == "full" and M != config.budgets[0]):
                        continue
                    mem, cs = measure.generate_program_memory(bm, p, T, N, B)
                    rec["memory"].append({"T": T, "M": None if m == "full" else M, "method": m,
                                          "generate_memory": mem, "generate_compile_s": cs})
            bar.update(1)
            measure.release_memory()
            if save is not None:
                save()
        del cap, compiled
        drop_compiled_programs()
        measure.release_memory()
    return rec


def _prefill(bm, T, B, config):
    """Decode-cache source for context T (see --prefill) and its record."""
    measure.release_memory()
    compiled, compile_s = measure.compile_capture_prefill(bm, T, B, config.kernels)
    mem = measure.memory_stats(compiled)
    peak = mem["peak"] if mem else 0
    avail = measure.available_memory()
    why = "--prefill " + config.prefill
    use_model = config.prefill == "model"
    if config.prefill == "auto":
        fits = peak <= config.prefill_memory_gb * 1e9
        free = avail is None or peak + 1e9 <= avail  # 1 GB for the process around it
        use_model = fits and free
        why = (f"XLA peak {fmt_bytes(peak)}" + ("" if fits else f" > --prefill-memory-gb "
               f"{config.prefill_memory_gb:g}") + ("" if free else
               f"; {fmt_bytes(avail)} available on the machine"))
    if use_model:
        cap, prefill_s = measure.capture_prefill(bm, T, B, compiled)
    else:
        cap, prefill_s = measure.synthetic_capture(bm.config, T, B, config.seed), None
    del compiled
    measure.release_memory()
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
def run(config: BenchConfig) -> dict:
    """Run the benchmark; prints the tables, returns every record."""
    from tqdm import tqdm

    t_start = time.perf_counter()
    print(machine_line(), flush=True)
    print(f"command: {config.command_line}", flush=True)
    results: dict = {"machine": machine_line(), "args": config.as_json(), "models": []}
    models = [measure.load_bench_model(key, model_path=config.model,
                                       layers=config.llama_layers, vocab=config.llama_vocab,
                                       seed=config.seed) for key in config.models]
    total = sum(len(model_contexts(bm.config, config.contexts, config.new_tokens))
                for bm in models)
    with tqdm(total=total * len(config.budgets), desc="decode grid", unit="group",
              file=sys.stderr, disable=not config.progress or not total) as bar:
        while models:
            bm = models.pop(0)
            rec: dict = {}
            results["models"].append(rec)
            run_model(bm, config, bar, rec, save=lambda: _save(results, config))
            print_model_tables(rec, config)
            sys.stdout.flush()
            if bm.key == "smollm2" and config.peers:
                results["peers"] = _run_peers(bm, config)
            del bm
    if config.peers and "smollm2" not in config.models:
        results["peers"] = _run_peers(
            measure.load_bench_model("smollm2", model_path=config.model, seed=config.seed),
            config)
    print_roofline(config.roofline_context, config.new_tokens, [1, 8], config.budgets)
    results["h100_bound"] = print_method_roofline(config.methods, config.roofline_context,
                                                  config.new_tokens, [1, 8], config.budgets)
    results["wall_s"] = time.perf_counter() - t_start
    print(f"\nwall time {results['wall_s']:.0f} s; {machine_line().split('; ')[-1]}")
    if config.json:
        _save(results, config)
        print(f"wrote {config.json}")
    return results


def _save(results: dict, config) -> None:
    """Write the results so far to --json (after every group, so a killed run keeps them)."""
    if config.json:
        config.json.parent.mkdir(parents=True, exist_ok=True)
        config.json.write_text(json.dumps(results, indent=1, default=str))


def _run_peers(bm, config) -> dict:
    try:
        return run_peers(bm, T=config.peer_context, N=config.peer_new_tokens,
                         budget=config.peer_budget, rounds=config.peer_rounds,
                         kvpress_python=config.kvpress_python, threads=config.peer_threads,
                         progress=config.progress)
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
    config = BenchConfig.from_json(res["args"], markdown=markdown)
    print(res["machine"])
    print(f"command: {config.command_line}")
    for rec in res["models"]:
        if rec.get("steps"):
            print_model_tables(rec, config)
    if res.get("peers", {}).get("summary"):
        print_peers(res["peers"], markdown)
    if "h100_bound" in res:
        print_roofline(config.roofline_context, config.new_tokens, [1, 8], config.budgets,
                       markdown)
        print_method_roofline(config.methods, config.roofline_context, config.new_tokens,
                              [1, 8], config.budgets, markdown)
    if "wall_s" in res:
        print(f"\nwall time {res['wall_s']:.0f} s")



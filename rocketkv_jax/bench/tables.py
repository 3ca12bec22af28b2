"""Tables of the benchmarks: byte counts and aligned or GitHub-markdown tables, and the
tables of `rocketkv bench`'s decode grid (`grid.py`), printed from a model's record: after
each model during a run, and again by `--report` from the --json file (`config.markdown`:
as GitHub markdown tables).
"""

from __future__ import annotations


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).strip() for c in r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, header: list[str], rows: list[list[str]],
                markdown: bool = False) -> None:
    """Print a titled table, right-aligned text columns, or with `markdown` a GitHub table
    (for pasting into README/docs as is; `rocketkv bench --report PATH --markdown`)."""
    if markdown:
        print(f"\n{title}\n")
        print(markdown_table(header, rows))
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))




def _grid_table(rec, config, title, cell, methods=None, extra=None) -> None:
    """One row per (T, M), one column per method; cell(step record) -> str."""
    methods = methods or config.methods
    by = {(s["T"], s["M"], s["method"]): s for s in rec["steps"]}
    labels = dict(rec["contexts"])
    rows = []
    for T, _ in rec["contexts"]:
        for M in config.budgets:
            row = [labels[T] + (f" ({T})" if labels[T].endswith("*") else ""), str(M)]
            if extra:
                row += extra(by, T, M)
            for m in methods:
                s = by.get((T, M, m))
                row.append("-" if s is None else "n/a" if "error" in s else cell(s))
            rows.append(row)
    head = ["T", "M"] + (["full ms"] if extra else []) + list(methods)
    print_table(title, head, rows, config.markdown)


def print_model_tables(rec, config) -> None:
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
    others = [m for m in config.methods if m != "full"]

    def full_ms(by, T, M):
        s = by.get((T, M, "full"))
        return [f"{s['median_s'] * 1e3:.1f}" if s and "error" not in s else "n/a"]

    _grid_table(rec, config,
                f"Decode step speedup vs full KV = full time / method time (>1: faster), "
                f"{rec['label']}, batch {config.batch}, float32; median of {config.iters} steps "
                f"after {config.warmup} warm-up, methods interleaved step by step",
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

    _grid_table(rec, config,
                f"Analytic bound = (weights + full KV bytes) / (weights + method KV bytes), what "
                f"an ideal memory-bound step would gain, {rec['label']}", analytic_bound, others)
    _grid_table(rec, config,
                f"XLA bytes ratio = full / method XLA bytes accessed (loop-aware): the speedup "
                f"if time followed XLA's byte count, {rec['label']}", xla_ratio, others)
    _grid_table(rec, config,
                f"Effective bandwidth = XLA bytes accessed (loop-aware) / measured step time "
                f"(GB/s); similar values across methods mean time follows XLA's bytes, "
                f"{rec['label']}",
                lambda s: f"{s['xla_loop_bytes'] / s['median_s'] / 1e9:.1f}"
                if s["xla_loop_bytes"] else "n/a")
    _grid_table(rec, config, f"Decode step compile time (s), {rec['label']}",
                lambda s: f"{s['compile_s']:.1f}")
    _grid_table(rec, config,
                f"Analytic KV bytes read per decode step (MB; read_tokens(S) x layers x KV heads"
                f" x 2 x D x 4 B x batch, S = T + 1), {rec['label']}; weights read per step "
                f"{fmt_bytes(rec['weights_bytes'])}",
                lambda s: f"{s['kv_read_bytes'] / 1e6:.1f}")
    _grid_table(rec, config,
                f"XLA bytes accessed per decode step (layer loop counted {rec['layers']} times) "
                f"/ analytic bytes (weights + KV), {rec['label']}",
                lambda s: f"{s['xla_loop_bytes'] / (rec['weights_bytes'] + s['kv_read_bytes']):.2f}"
                if s["xla_loop_bytes"] else "n/a")
    base = rec["xla_base_bytes"]
    _grid_table(rec, config,
                f"XLA KV multiplier = (XLA bytes - XLA bytes of a 16-token full-cache step, "
                f"{fmt_bytes(base)}) / analytic KV bytes (both loop-aware), {rec['label']}",
                lambda s: f"{(s['xla_loop_bytes'] - base) / s['kv_read_bytes']:.1f}"
                if s["xla_loop_bytes"] and base else "n/a")
    _print_split(rec, config)
    _print_memory(rec, config)


def _print_split(rec, config) -> None:
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
            config.markdown)
        print("  XLA's cost analysis counts the body of a while loop once; the decode step "
              "loops over the layers,\n  so 'as reported' holds one layer's weights and per-layer "
              "cache traffic. 'loop-aware' re-runs\n  XLA's cost analysis on the loop body and "
              "counts it once per layer.")


def _print_memory(rec, config) -> None:
    steps = {(s["T"], s["M"], s["method"]): s for s in rec["steps"] if "error" not in s}
    rows = []
    for m in rec["memory"]:
        M = m["M"] if m["M"] is not None else config.budgets[0]
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
            f"{rec['label']}, batch {config.batch}, N={config.new_tokens}",
            ["T", "method", "M", "KV cache", "decode step peak", "decode step temp",
             "generate program peak", "generate temp", "generate peak vs full"], rows,
            config.markdown)
        print("  generate program = prefill + compress + while-loop decode (what generate_ids "
              "runs); its temp\n  is dominated by the dense prefill attention scores "
              "[B, H, T, T] f32, not by the cache.")

"""Markdown tables and the accuracy-vs-budget plot from results.jsonl / fidelity.jsonl.

Cell values are plain means over the records in the cell (every task, context length
and sample weighs the same; with a complete grid this equals RULER's mean of per-task
scores). Full KV has no budget; its row repeats its one value in every budget column
and the plot draws it as a dashed horizontal line, as in the RocketKV paper's figures.
A cell with fewer records than the fullest cell of its table is marked with `*`.

RULER runs (`--suite ruler` records) also show each cell's standard error of the mean
and its record count, `mean ± se (n)`, give a table per context length with each
method's difference from full KV paired by prompt, rocketkv's from each of its stages
run alone (same budget), and per-task tables under it, and a plot of accuracy vs context
length at budgets 256 and 1024.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rocketkv_jax.eval.fidelity import FIDELITY_FILE
from rocketkv_jax.eval.runner import EVAL_METHOD_NAMES as METHOD_NAMES
from rocketkv_jax.eval.runner import FULL_METHOD, RESULTS_FILE
from rocketkv_jax.eval.store import read_records

TABLE_FILE = "table.md"
PLOT_FILE = "accuracy_vs_budget.png"
CONTEXT_PLOT_FILE = "accuracy_vs_context.png"
CONTEXT_PLOT_BUDGETS = (256, 1024)
REPORT_FILES = (TABLE_FILE, PLOT_FILE, CONTEXT_PLOT_FILE)  # all derived from the records

Record = Mapping[str, Any]
Cells = dict[tuple[str, int | None], tuple[float, int]]  # (method, budget) -> (mean, count)


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a results file, without its header ([] if missing); a truncated last
    line is skipped."""
    return read_records(path)


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods in the canonical order of METHOD_NAMES, unknown ones after, sorted."""
    present = set(methods)
    known = [m for m in METHOD_NAMES if m in present]
    return known + sorted(present - set(METHOD_NAMES))


def mean_cells(records: Iterable[Record], value: Callable[[Record], float | None]) -> Cells:
    """(method, budget) -> (mean of value(record), count), skipping None values."""
    sums: dict[tuple[str, int | None], list[float]] = {}
    for record in records:
        v = value(record)
        if v is not None:
            sums.setdefault((record["method"], record["budget"]), []).append(float(v))
    return {key: (sum(vs) / len(vs), len(vs)) for key, vs in sums.items()}


def standard_errors(
    records: Iterable[Record], value: Callable[[Record], float | None]
) -> dict[tuple[str, int | None], float | None]:
    """(method, budget) -> standard error of the cell's mean (`standard_error`)."""
    groups: dict[tuple[str, int | None], list[float]] = {}
    for record in records:
        v = value(record)
        if v is not None:
            groups.setdefault((record["method"], record["budget"]), []).append(float(v))
    return {key: standard_error(vs) for key, vs in groups.items()}


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean, sample std (n - 1) / sqrt(n); None below 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return (sum((x - mean) ** 2 for x in values) / (n - 1)) ** 0.5 / n**0.5


def markdown_table(
    cells: Cells,
    *,
    fmt: str = "{:.1f}",
    full_label: str = "full KV",
    errors: Mapping[tuple[str, int | None], float | None] | None = None,
) -> str:
    """Rows = methods, columns = budgets; full KV (budget None) repeated in every column.
    With `errors`, a cell reads `mean ± se (n)`."""
    if not cells:
        return "_no records_\n"
    budgets = sorted({b for _, b in cells if b is not None})
    methods = method_order(m for m, _ in cells)
    most = max(count for _, count in cells.values())
    incomplete = False

    def cell(method: str, budget: int | None) -> str:
        nonlocal incomplete
        if (method, budget) not in cells:
            return "–"
        mean, count = cells[(method, budget)]
        mark = "*" if count < most else ""
        incomplete |= bool(mark)
        if errors is None:
            return fmt.format(mean) + mark
        se = errors.get((method, budget))
        spread = "" if se is None else " ± " + fmt.format(se)
        return f"{fmt.format(mean)}{spread} ({count}){mark}"

    columns = [str(b) for b in budgets] or ["(no budget)"]
    lines = [
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for method in methods:
        if method == FULL_METHOD and (FULL_METHOD, None) in cells:
            values = [cell(FULL_METHOD, None)] * len(columns)
            label = full_label
        else:
            values = [cell(method, b) for b in budgets] or ["–"]
            label = method
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    text = "\n".join(lines) + "\n"
    if incomplete:
        text += f"\n\\* fewer records than the {most} of the fullest cell (run incomplete).\n"
    return text


def score_percent(record: Record) -> float | None:
    """A result record's score in percent (None if it has no score)."""
    score = record.get("score")
    return None if score is None else 100.0 * float(score)


def is_ruler(records: Iterable[Record]) -> bool:
    return any(r.get("suite") == "ruler" for r in records)


def prompt_key(record: Record) -> tuple:
    """What identifies a record's prompt: context length, task, sample, seed and depth."""
    return (record["context_length"], record["task"], record["sample"], record.get("seed"),
            record.get("depth"))


def complete_samples(records: Sequence[Record]) -> tuple[list[Record], int, int]:
    """The records of samples that every (method, budget) cell of their context has, so
    that every cell of a table averages the same prompts: (records kept, samples kept,
    samples in all). A run that is still going has samples that only some methods have
    reached; comparing means over different prompts would mislead."""
    cells: dict[int, set] = {}
    have: dict[tuple, set] = {}
    for r in records:
        cell = (r["method"], r["budget"])
        cells.setdefault(r["context_length"], set()).add(cell)
        have.setdefault(prompt_key(r), set()).add(cell)
    complete = {key for key, got in have.items() if got >= cells[key[0]]}
    kept = [r for r in records if prompt_key(r) in complete]
    return kept, len(complete), len(have)


# RocketKV's two stages, each run alone as a method of its own
ROCKETKV_STAGES = ("snapkv++", "hybrid")


def paired_with(records: Iterable[Record], reference: str = FULL_METHOD
                ) -> dict[tuple[str, int | None], list[float]]:
    """(method, budget) -> score minus `reference`'s score (points of %), one per prompt
    that both have (`prompt_key`), at the same budget where the reference has one (full
    KV has none). Differences on the same prompts cancel the prompts' own difficulty, so
    their standard error is the one that says whether a method loses against the
    reference."""
    records = list(records)
    ref_scores = {(prompt_key(r), r["budget"]): score_percent(r) for r in records
                  if r["method"] == reference}
    out: dict[tuple[str, int | None], list[float]] = {}
    for r in records:
        budget = None if reference == FULL_METHOD else r["budget"]
        score, ref = score_percent(r), ref_scores.get((prompt_key(r), budget))
        if r["method"] != reference and score is not None and ref is not None:
            out.setdefault((r["method"], r["budget"]), []).append(score - ref)
    return out


def rocketkv_against_its_stages(records: Iterable[Record]
                                ) -> dict[tuple[str, int | None], list[float]]:
    """(stage, budget) -> rocketkv's score minus that stage's alone (`ROCKETKV_STAGES`),
    paired by prompt at the same budget: whether the two stages together beat each."""
    records = list(records)
    out = {}
    for stage in ROCKETKV_STAGES:
        for (method, budget), ds in paired_with(records, reference=stage).items():
            if method == "rocketkv":
                out[(stage, budget)] = ds
    return out


def paired_table(differences: Mapping[tuple[str, int | None], Sequence[float]],
                 row_label: str = "method") -> str:
    """Rows = methods (headed `row_label`), columns = budgets; a cell reads
    `mean ± se (worse / better)`: the mean paired difference, its standard error (sample
    std (n - 1) / sqrt(n)), and how many prompts scored lower / higher than the
    reference."""
    budgets = sorted({b for _, b in differences if b is not None})
    lines = [f"| {row_label} | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]

    def cell(ds: Sequence[float] | None) -> str:
        if not ds:
            return "–"
        se = standard_error(ds)
        spread = "" if se is None else f" ± {se:.1f}"
        worse, better = sum(d < 0 for d in ds), sum(d > 0 for d in ds)
        return f"{sum(ds) / len(ds):+.1f}{spread} ({worse} / {better})"

    for method in method_order(m for m, _ in differences):
        lines.append(f"| {method} | " + " | ".join(cell(differences.get((method, b)))
                                                  for b in budgets) + " |")
    return "\n".join(lines) + "\n"


def ruler_accuracy_section(records: Sequence[Record]) -> str:
    """Per context length: methods x budgets (mean over its tasks, counted in the heading,
    since a stage still running has only some of them), then one table per task;
    every cell `mean ± se (n)` in %. Only samples that every method and budget of their
    context has are counted (`complete_samples`); the section says how many."""

    def table(subset):
        return markdown_table(mean_cells(subset, score_percent),
                              errors=standard_errors(subset, score_percent))

    records, kept, total = complete_samples(records)
    parts = [
        "## Accuracy (mean score % ± standard error (records), RULER)\n",
        f"Samples that every method and budget has: {kept} of {total}"
        + ("." if kept == total else
           f"; the other {total - kept} (a run still going) are left out of every table.")
        + "\n",
        "All context lengths and tasks:\n",
        table(records),
    ]
    for context in sorted({r["context_length"] for r in records}):
        subset = [r for r in records if r["context_length"] == context]
        tasks = sorted({r["task"] for r in subset})
        counted = f"{len(tasks)} task" + ("s" if len(tasks) > 1 else "")
        parts += [f"\n### Context length {context} tokens (mean over {counted})\n",
                  table(subset)]
        differences = paired_with(subset)
        if differences:
            parts += [f"\nAgainst full KV at {context} tokens, paired by prompt: mean of "
                      "(method - full KV) in points ± its standard error (prompts worse / "
                      "better):\n", paired_table(differences)]
        stages = rocketkv_against_its_stages(subset)
        if stages:
            parts += [f"\nrocketkv against each of its stages alone at {context} tokens, "
                      "paired by prompt at the same budget: mean of (rocketkv - stage) in "
                      "points ± its standard error (prompts where rocketkv is worse / "
                      "better):\n", paired_table(stages, row_label="stage alone")]
        for task in tasks:
            per_task = [r for r in subset if r["task"] == task]
            parts += [f"\n#### {task} at {context} tokens\n", table(per_task)]
    return "\n".join(parts)


def accuracy_section(records: Sequence[Record]) -> str:
    """Overall, per-context-length and per-task accuracy tables (mean score, %)."""
    if is_ruler(records):
        return ruler_accuracy_section(records)
    parts = [
        "## Accuracy (mean score %, all tasks and context lengths)\n",
        markdown_table(mean_cells(records, score_percent)),
    ]
    contexts = sorted({r["context_length"] for r in records})
    for context in contexts:
        subset = [r for r in records if r["context_length"] == context]
        table = markdown_table(mean_cells(subset, score_percent))
        parts += [f"\n### Context length {context} tokens\n", table]
    for task in sorted({r["task"] for r in records}):
        subset = [r for r in records if r["task"] == task]
        parts += [f"\n### Task {task}\n", markdown_table(mean_cells(subset, score_percent))]
    return "\n".join(parts)


def fidelity_section(records: Sequence[Record]) -> str:
    """Token agreement, identical prefix and mean KL tables of compressed methods."""
    methods = [r for r in records if r["method"] != FULL_METHOD]
    agreement = lambda r: None if r.get("token_agreement") is None else 100 * r["token_agreement"]
    parts = [
        "## Fidelity to full KV\n",
        "### Greedy token agreement with full KV (% of positions)\n",
        markdown_table(mean_cells(methods, agreement)),
        "\n### Identical prefix with full KV (tokens)\n",
        markdown_table(mean_cells(methods, lambda r: r.get("identical_prefix"))),
        "\n### Mean KL(full || method) per teacher-forced step (nats)\n",
        markdown_table(mean_cells(methods, lambda r: r.get("mean_kl")), fmt="{:.4f}"),
    ]
    consistency = [r["argmax_agreement"] for r in records if r.get("argmax_agreement") is not None]
    if consistency:
        parts.append(
            "\nEngine self-check: argmax of full KV's forced log-probs reproduces its greedy "
            f"tokens at {100 * sum(consistency) / len(consistency):.1f}% of positions.\n"
        )
    return "\n".join(parts)


def render_markdown(results: Sequence[Record], fidelity: Sequence[Record] = ()) -> str:
    """The whole table.md text: accuracy tables, then fidelity tables if any."""
    text = "# RocketKV-JAX accuracy evaluation\n\n" + accuracy_section(results)
    if fidelity:
        text += "\n" + fidelity_section(fidelity)
    return text


def plot_accuracy(records: Sequence[Record], path: str | os.PathLike) -> Path:
    """Accuracy (%) vs token budget on a log2 axis, one panel overall + one per context.

    One line per compressed method; full KV is a dashed horizontal reference line.
    Uses the Agg canvas directly (no pyplot, no global backend switch).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    contexts = sorted({r["context_length"] for r in records})
    panels: list[tuple[str, Sequence[Record]]] = [("all context lengths", records)]
    if len(contexts) > 1:
        panels += [
            (f"context {c}", [r for r in records if r["context_length"] == c]) for c in contexts
        ]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    budgets = sorted({r["budget"] for r in records if r["budget"] is not None})
    methods = [m for m in method_order(r["method"] for r in records) if m != FULL_METHOD]
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    markers = {m: "os^vDPX*"[i % 8] for i, m in enumerate(methods)}  # overlaps stay visible
    for ax, (title, subset) in zip(axes, panels, strict=True):
        cells = mean_cells(subset, score_percent)
        for method in methods:
            xs = [b for b in budgets if (method, b) in cells]
            if xs:
                ys = [cells[(method, b)][0] for b in xs]
                ax.plot(xs, ys, marker=markers[method], color=colors[method], label=method)
        if (FULL_METHOD, None) in cells:
            ax.axhline(
                cells[(FULL_METHOD, None)][0], color="black", linestyle="--", label="full KV"
            )
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.minorticks_off()
        ax.set_ylim(-2, 102)
        ax.set_xlabel("token budget")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_report(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write table.md and accuracy_vs_budget.png from the run files in `out_dir`.

    Returns {"table": path, "plot": path}. Raises FileNotFoundError if results.jsonl
    is missing or holds no records.
    """
    out = Path(out_dir)
    results = load_records(out / RESULTS_FILE)
    if not results:
        raise FileNotFoundError(f"no accuracy records in {out / RESULTS_FILE}; run eval first")
    fidelity = load_records(out / FIDELITY_FILE)
    table = out / TABLE_FILE
    table.write_text(render_markdown(results, fidelity), encoding="utf-8")
    plotted = complete_samples(results)[0] if is_ruler(results) else results
    paths = {"table": table, "plot": plot_accuracy(plotted, out / PLOT_FILE)}
    if is_ruler(results) and len({r["context_length"] for r in plotted}) > 1:
        paths["context_plot"] = plot_accuracy_vs_context(plotted, out / CONTEXT_PLOT_FILE)
    return paths


def plot_accuracy_vs_context(
    records: Sequence[Record],
    path: str | os.PathLike,
    budgets: Sequence[int] = CONTEXT_PLOT_BUDGETS,
) -> Path:
    """Accuracy (%) vs context length (log2 axis), one panel per budget in `budgets`,
    one line per method with standard-error bars; full KV dashed in every panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    contexts = sorted({r["context_length"] for r in records})
    methods = method_order(r["method"] for r in records)
    fig = Figure(figsize=(4.6 * len(budgets), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    colors = {m: f"C{i % 10}" for i, m in enumerate(m for m in methods if m != FULL_METHOD)}
    for ax, budget in zip(axes, budgets, strict=True):
        for method in methods:
            key = (method, None if method == FULL_METHOD else budget)
            xs, ys, es = [], [], []
            for context in contexts:
                subset = [r for r in records if r["context_length"] == context]
                cells = mean_cells(subset, score_percent)
                if key in cells:
                    xs.append(context)
                    ys.append(cells[key][0])
                    es.append(standard_errors(subset, score_percent).get(key) or 0.0)
            if not xs:
                continue
            if method == FULL_METHOD:
                ax.errorbar(xs, ys, yerr=es, color="black", linestyle="--", label="full KV",
                            capsize=2)
            else:
                ax.errorbar(xs, ys, yerr=es, color=colors[method], marker="o", label=method,
                            capsize=2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in contexts])
        ax.minorticks_off()
        ax.set_ylim(-2, 102)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"token budget {budget}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path

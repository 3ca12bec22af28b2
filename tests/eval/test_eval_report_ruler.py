"""RULER reports: `mean ± standard error (n)` cells worked by hand, tables per context
with per-task tables, differences from full KV paired by prompt, and the
accuracy-vs-context plot; quick-suite tables unchanged."""

import json

from rocketkv_jax.eval.report import (
    render_markdown,
    score_percent,
    standard_errors,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rec(method, budget, score, context, task, sample, suite="ruler"):
    return {"suite": suite, "method": method, "budget": budget, "task": task,
            "context_length": context, "sample": sample, "seed": 0, "score": score}


RECORDS = [
    # full at 4k: niah 1, 0 ; vt 1, 1 -> mean 75, sample sd 0.5, se 0.5 / 2 = 25 (%)
    _rec("full", None, 1.0, 4096, "niah_single_1", 0),
    _rec("full", None, 0.0, 4096, "niah_single_1", 1),
    _rec("full", None, 1.0, 4096, "vt", 0),
    _rec("full", None, 1.0, 4096, "vt", 1),
    # rocketkv@256 at 4k: 0.2, 0.2, 0.2, 0.6 -> mean 30, sd = sqrt(0.12 / 3) = 0.2, se 10
    _rec("rocketkv", 256, 0.2, 4096, "niah_single_1", 0),
    _rec("rocketkv", 256, 0.2, 4096, "niah_single_1", 1),
    _rec("rocketkv", 256, 0.2, 4096, "vt", 0),
    _rec("rocketkv", 256, 0.6, 4096, "vt", 1),
    # 8k: one record each
    _rec("full", None, 1.0, 8192, "niah_single_1", 0),
    _rec("rocketkv", 256, 0.0, 8192, "niah_single_1", 0),
]


def test_standard_errors_by_hand():
    four_k = [r for r in RECORDS if r["context_length"] == 4096]
    se = standard_errors(four_k, score_percent)
    assert abs(se[("full", None)] - 25.0) < 1e-9
    assert abs(se[("rocketkv", 256)] - 10.0) < 1e-9
    one = standard_errors([RECORDS[-1]], score_percent)
    assert one[("rocketkv", 256)] is None


def test_ruler_tables_per_context_and_task():
    text = render_markdown(RECORDS)
    ctx4k = text.split("### Context length 4096 tokens")[1].split("### Context length")[0]
    table = ctx4k.split("####")[0]
    assert "| full KV | 75.0 ± 25.0 (4) |" in table
    assert "| rocketkv | 30.0 ± 10.0 (4) |" in table
    vt = ctx4k.split("#### vt at 4096 tokens")[1]
    assert "| full KV | 100.0 ± 0.0 (2) |" in vt
    assert "| rocketkv | 40.0 ± 20.0 (2) |" in vt  # 0.2, 0.6: sd 0.2828, se 0.2
    ctx8k = text.split("### Context length 8192 tokens")[1]
    assert "| full KV | 100.0 (1) |" in ctx8k and "| rocketkv | 0.0 (1) |" in ctx8k
    # a heading counts its context's tasks: 8k has only niah_single_1 so far
    assert "### Context length 4096 tokens (mean over 2 tasks)" in text
    assert "### Context length 8192 tokens (mean over 1 task)" in text
    quick = render_markdown([dict(r, suite="quick") for r in RECORDS])
    assert "±" not in quick and "| full KV | 80.0 |" in quick  # quick suite: plain means


def test_differences_from_full_kv_paired_by_prompt_by_hand():
    """rocketkv@256 - full at 4k, prompt by prompt: 20-100, 20-0, 20-100, 60-100 =
    -80, +20, -80, -40: mean -45, deviations -35, 65, -35, 5, sample variance
    6700 / 3, se sqrt(2233.3) / 2 = 23.6; three prompts worse, one better."""
    text = render_markdown(RECORDS)
    ctx4k = text.split("### Context length 4096 tokens")[1].split("####")[0]
    paired = ctx4k.split("Against full KV at 4096 tokens, paired by prompt")[1]
    assert "| rocketkv | -45.0 ± 23.6 (3 / 1) |" in paired
    assert "full KV |" not in paired  # full KV against itself is not a row
    ctx8k = text.split("### Context length 8192 tokens")[1]
    assert "| rocketkv | -100.0 (1 / 0) |" in ctx8k  # one prompt: no standard error
    shuffled = render_markdown(RECORDS[::-1])  # pairs by prompt, not by record order
    assert "| rocketkv | -45.0 ± 23.6 (3 / 1) |" in shuffled
    without_full = [r for r in RECORDS if r["method"] != "full"]
    assert "paired by prompt" not in render_markdown(without_full)


def test_rocketkv_against_its_stages_paired_at_the_same_budget_by_hand():
    """rocketkv@256 - snapkv++@256 at 4k, prompt by prompt: 20-0, 20-20, 20-60, 60-60 =
    +20, 0, -40, 0: mean -5, deviations 25, 5, -35, 5, sample variance 1900 / 3, se
    sqrt(633.3) / 2 = 12.6; one prompt worse, one better. hybrid ran only at 1024, where
    rocketkv did not: no pair, so no row (a budget is never paired with another)."""
    prompts = [("niah_single_1", 0), ("niah_single_1", 1), ("vt", 0), ("vt", 1)]
    stages = [_rec("snapkv++", 256, s, 4096, t, i)
              for s, (t, i) in zip((0.0, 0.2, 0.6, 0.6), prompts, strict=True)]
    stages += [_rec("hybrid", 1024, 1.0, 4096, t, i) for t, i in prompts]
    ctx4k = render_markdown(RECORDS + stages).split("### Context length 4096 tokens")[1]
    section = ctx4k.split("rocketkv against each of its stages alone at 4096 tokens")[1]
    section = section.split("####")[0]
    assert "| snapkv++ | -5.0 ± 12.6 (1 / 1) |" in section
    assert "| stage alone | 256 |" in section
    assert "| hybrid |" not in section and "| rocketkv |" not in section
    # against full KV, snapkv++ is a row of its own: 0-100, 20-0, 60-100, 60-100 =
    # -100, +20, -40, -40: mean -40, deviations -60, 60, 0, 0, se sqrt(7200 / 3) / 2
    paired = ctx4k.split("Against full KV at 4096 tokens")[1].split("rocketkv against")[0]
    assert "| snapkv++ | -40.0 ± 24.5 (3 / 1) |" in paired
    assert "rocketkv against each" not in render_markdown(RECORDS)  # no stage ran alone


def test_write_report_adds_context_plot(tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    paths = write_report(tmp_path)
    assert paths["context_plot"].read_bytes()[:8] == PNG_MAGIC
    assert paths["context_plot"].stat().st_size > 5000
    assert "±" in paths["table"].read_text()


def test_a_run_still_going_compares_only_samples_every_cell_has():
    """rocketkv has reached sample 0 of vt but not sample 1: vt sample 1 is left out of
    every cell (full's too), so both rows average the same three prompts."""
    partial = [r for r in RECORDS if not (r["method"] == "rocketkv" and r["task"] == "vt"
                                          and r["sample"] == 1)]
    text = render_markdown(partial)
    assert "Samples that every method and budget has: 4 of 5; the other 1" in text
    ctx4k = text.split("### Context length 4096 tokens")[1].split("####")[0]
    # full: 1, 0, 1 -> 66.7; rocketkv: 0.2, 0.2, 0.2 -> 20
    assert "| full KV | 66.7 ± 33.3 (3) |" in ctx4k
    assert "| rocketkv | 20.0 ± 0.0 (3) |" in ctx4k
    assert "Samples that every method and budget has: 5 of 5.\n" in render_markdown(RECORDS)


def _results_file(path, records):
    from rocketkv_jax.eval.store import run_id

    identity = {"suite": "ruler", "seed": 0}
    run = run_id(identity)
    lines = [{"record": "header", "run": run, "identity": identity, "info": {}}]
    lines += [dict(r, run=run) for r in records]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_command_writes_the_reports_and_runs_nothing(tmp_path, capsys):
    from rocketkv_jax.cli import main

    _results_file(tmp_path / "results.jsonl", RECORDS)
    assert main(["eval", "--report", "--out", str(tmp_path)]) == 0
    assert "±" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "accuracy_vs_context.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["eval", "--report", "--out", str(tmp_path), "--methods", "full"]) == 2
    assert "takes only --out; drop --methods" in capsys.readouterr().err
    assert main(["eval", "--report", "--out", str(tmp_path / "none")]) == 2
    assert "no accuracy records" in capsys.readouterr().err
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write("{damaged\n" + json.dumps(dict(RECORDS[0], run="x")) + "\n")
    assert main(["eval", "--report", "--out", str(tmp_path)]) == 2
    assert "results.jsonl:12" in capsys.readouterr().err


def test_report_command_redoes_a_multi_turn_report(tmp_path):
    """The committed multi-turn run's table, written again from its records alone."""
    import shutil
    from pathlib import Path

    from rocketkv_jax.cli import main

    run = Path(__file__).parents[2] / "docs" / "eval" / "multiturn-smollm2-4k"
    shutil.copy(run / "multiturn.jsonl", tmp_path)
    assert main(["eval", "--report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "multiturn.md").read_text() == (run / "multiturn.md").read_text()
    assert (tmp_path / "multiturn.png").read_bytes()[:8] == PNG_MAGIC

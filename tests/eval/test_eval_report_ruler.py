"""RULER reports: `mean ± standard error (n)` cells worked by hand, tables per context
with per-task tables, and the accuracy-vs-context plot; quick-suite tables unchanged."""

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
    quick = render_markdown([dict(r, suite="quick") for r in RECORDS])
    assert "±" not in quick and "| full KV | 80.0 |" in quick  # quick suite: plain means


def test_write_report_adds_context_plot(tmp_path):
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    paths = write_report(tmp_path)
    assert paths["context_plot"].read_bytes()[:8] == PNG_MAGIC
    assert paths["context_plot"].stat().st_size > 5000
    assert "±" in paths["table"].read_text()

"""Report: hand-computed table cells, incomplete marks, PNG output, fidelity tables."""

import json

import pytest

from rocketkv_jax.eval.report import (
    markdown_table,
    mean_cells,
    method_order,
    render_markdown,
    score_percent,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rec(method, budget, score, context=2048, task="niah_single", sample=0):
    return {
        "method": method,
        "budget": budget,
        "task": task,
        "context_length": context,
        "sample": sample,
        "seed": 0,
        "score": score,
    }


RECORDS = [
    # full: 2k -> 1, 0 ; 4k -> 1, 1  => overall 75.0, 2k 50.0, 4k 100.0
    _rec("full", None, 1.0, 2048, sample=0),
    _rec("full", None, 0.0, 2048, sample=1),
    _rec("full", None, 1.0, 4096, sample=0),
    _rec("full", None, 1.0, 4096, sample=1),
    # snapkv @256: 2k -> 0, 0 ; 4k -> 1, 0.5 => overall 37.5, 2k 0.0, 4k 75.0
    _rec("snapkv", 256, 0.0, 2048, sample=0),
    _rec("snapkv", 256, 0.0, 2048, sample=1),
    _rec("snapkv", 256, 1.0, 4096, sample=0),
    _rec("snapkv", 256, 0.5, 4096, sample=1),
    # snapkv @512: all 1 except one 0.25 => (1 + 1 + 1 + 0.25) / 4 = 81.25 -> "81.2"
    _rec("snapkv", 512, 1.0, 2048, sample=0),
    _rec("snapkv", 512, 1.0, 2048, sample=1),
    _rec("snapkv", 512, 1.0, 4096, sample=0),
    _rec("snapkv", 512, 0.25, 4096, sample=1),
    # rocketkv @256 and @512, qa task on 2k: 1, 1 / 1, 0
    _rec("rocketkv", 256, 1.0, 2048, task="qa", sample=0),
    _rec("rocketkv", 256, 1.0, 2048, task="qa", sample=1),
    _rec("rocketkv", 512, 1.0, 2048, task="qa", sample=0),
    _rec("rocketkv", 512, 0.0, 2048, task="qa", sample=1),
    _rec("rocketkv", 256, 1.0, 4096, task="qa", sample=0),
    _rec("rocketkv", 256, 1.0, 4096, task="qa", sample=1),
    _rec("rocketkv", 512, 1.0, 4096, task="qa", sample=0),
    _rec("rocketkv", 512, 1.0, 4096, task="qa", sample=1),
]


def test_mean_cells_by_hand():
    cells = mean_cells(RECORDS, score_percent)
    assert cells[("full", None)] == (75.0, 4)
    assert cells[("snapkv", 256)] == (37.5, 4)
    assert cells[("snapkv", 512)] == (81.25, 4)
    assert cells[("rocketkv", 256)] == (100.0, 4)
    assert cells[("rocketkv", 512)] == (75.0, 4)


def test_overall_and_per_context_tables():
    text = render_markdown(RECORDS)
    overall = text.split("### Context length 2048")[0]
    assert "| method | 256 | 512 |" in overall
    assert "| full KV | 75.0 | 75.0 |" in overall
    assert "| snapkv | 37.5 | 81.2 |" in overall
    assert "| rocketkv | 100.0 | 75.0 |" in overall
    ctx2k = text.split("### Context length 2048 tokens")[1].split("###")[0]
    assert "| full KV | 50.0 | 50.0 |" in ctx2k
    assert "| snapkv | 0.0 | 100.0 |" in ctx2k
    assert "| rocketkv | 100.0 | 50.0 |" in ctx2k
    ctx4k = text.split("### Context length 4096 tokens")[1].split("###")[0]
    assert "| snapkv | 75.0 | 62.5 |" in ctx4k
    assert "### Task qa" in text and "### Task niah_single" in text
    # Row order follows the canonical method list, full first.
    rows = [line.split("|")[1].strip() for line in overall.splitlines() if line.startswith("| ")]
    assert rows == ["method", "full KV", "snapkv", "rocketkv"]


def test_incomplete_cells_are_marked():
    text = markdown_table(mean_cells(RECORDS[:-1], score_percent))
    assert "| rocketkv | 100.0 | 66.7* |" in text
    assert "fewer records" in text


def test_method_order_puts_unknown_last():
    order = method_order(["zzz", "rocketkv", "full", "quest"])
    assert order == ["full", "quest", "rocketkv", "zzz"]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_write_report_table_and_png(tmp_path):
    _write_jsonl(tmp_path / "results.jsonl", RECORDS)
    paths = write_report(tmp_path)
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    assert paths["plot"].stat().st_size > 5000
    table = paths["table"].read_text()
    assert "| snapkv | 37.5 | 81.2 |" in table
    assert "Fidelity" not in table


def test_write_report_with_fidelity_and_truncated_tail(tmp_path):
    _write_jsonl(tmp_path / "results.jsonl", RECORDS)
    fidelity = [
        {**_rec("full", None, None), "argmax_agreement": 1.0, "reference_tokens": [1, 2]},
        {**_rec("snapkv", 256, None), "token_agreement": 0.5, "identical_prefix": 1,
         "mean_kl": 0.2},
        {**_rec("snapkv", 256, None, sample=1), "token_agreement": 1.0, "identical_prefix": 4,
         "mean_kl": 0.1},
        {**_rec("snapkv", 512, None), "token_agreement": 1.0, "identical_prefix": 4,
         "mean_kl": 0.0},
    ]  # fmt: skip
    _write_jsonl(tmp_path / "fidelity.jsonl", fidelity)
    with (tmp_path / "fidelity.jsonl").open("a") as handle:
        handle.write('{"method": "snapkv", "bud')  # killed mid-write
    table = write_report(tmp_path)["table"].read_text()
    section = table.split("## Fidelity to full KV")[1]
    agreement = section.split("### Identical prefix")[0]
    assert "| snapkv | 75.0* | 100.0 |" not in agreement  # counts differ: 2 vs 1 -> marked
    assert "| snapkv | 75.0 | 100.0* |" in agreement
    assert "| snapkv | 2.5 | 4.0* |" in section
    assert "| snapkv | 0.1500 | 0.0000* |" in section
    assert "100.0% of positions" in section


def test_write_report_without_results_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="run eval first"):
        write_report(tmp_path)

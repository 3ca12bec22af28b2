"""benchmarks/eval_cost.py on a tiny checkpoint: one row per batch, each sample's estimate
is its prefill plus every cell's timed step x answer tokens / batch (recomputed here from
the JSON it writes), the grid's cells are eval's, and bad flags are refused."""

from __future__ import annotations

import json

import pytest
from benchmark_scripts import load_script
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config

ec = load_script("eval_cost")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = tiny_checkpoint_config(max_position_embeddings=256)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", config)


def test_cells_are_full_once_and_every_method_at_every_budget():
    grid = ec.method_budget_grid  # eval's own grid, full only when asked for
    assert grid(["full", "rocketkv", "topk"], [256, 1024], include_full=False) == [
        ("full", None), ("rocketkv", 256), ("rocketkv", 1024), ("topk", 256), ("topk", 1024)]
    assert grid(["snapkv"], [64], include_full=False) == [("snapkv", 64)]


def test_estimate_per_sample_from_the_timed_steps(ckpt, tmp_path, capsys):
    path = tmp_path / "cost.json"
    assert ec.main(["--model", str(ckpt), "--context", "200", "--batches", "1,2",
                    "--methods", "full,rocketkv", "--budgets", "64", "--steps", "3",
                    "--answer-tokens", "20", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["prompt_tokens"] == 180 and set(data["batches"]) == {"1", "2"}
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[0] for r in rows] == ["1", "2"]
    for row, (batch, r) in zip(rows, data["batches"].items(), strict=True):
        assert set(r["step_s"]) == {"full", "rocketkv@64"}
        assert all(s > 0 for s in r["step_s"].values()) and r["prefill_s_per_prompt"] > 0
        decode = sum(r["step_s"].values()) * 20 / int(batch)
        assert r["s_per_sample"] == pytest.approx(r["prefill_s_per_prompt"] + decode)
        assert float(row[3]) == pytest.approx(r["s_per_sample"], abs=0.051)
    first, second = (data["batches"][b]["s_per_sample"] for b in ("1", "2"))
    assert float(rows[1][4].rstrip("x")) == pytest.approx(first / second, abs=0.0051)


@pytest.mark.parametrize("argv, message", [
    (["--context", "100", "--answer-tokens", "100"], "leaves no prompt"),
    (["--context", "1k"], "beyond the model's window (256 tokens)"),
    (["--steps", "1"], "--steps must be at least 2"),
    (["--batches", "4,x"], "--batches and --budgets take whole numbers"),
])
def test_bad_flags(ckpt, argv, message, capsys):
    with pytest.raises(SystemExit):
        ec.main(["--model", str(ckpt), *argv])
    assert message in capsys.readouterr().err


def test_memory_only_prints_the_prefill_program_per_batch(ckpt, capsys):
    assert ec.main(["--model", str(ckpt), "--context", "200", "--batches", "1,3",
                    "--answer-tokens", "20", "--memory-only"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "prefill program" in x]
    assert [x.split(":")[0] for x in lines] == ["batch 1", "batch 3"]
    # the outputs hold k and v of every layer for each padded row (3 -> 4 rows)
    out = [float(x.split("outputs ")[1].split()[0]) for x in lines]
    assert out[1] > 3.5 * out[0]

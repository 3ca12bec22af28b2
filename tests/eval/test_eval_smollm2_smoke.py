"""CI smoke of `rocketkv eval` on the real model: a tiny grid through the CLI.

Known level: SmolLM2-135M-Instruct with full KV retrieves every single needle of our 2k
task (docs/eval: 100% at 2k). RocketKV at a 256 budget must keep it.
"""

import json

import pytest

from rocketkv_jax.cli import main as cli_main


@pytest.mark.slow
def test_eval_smoke_full_and_rocketkv_keep_the_needle_at_2k(smollm2_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--model", str(smollm2_checkpoint), "--smoke", "--methods", "rocketkv",
            "--budgets", "256", "--contexts", "2k", "--tasks", "niah_single", "--samples", "2",
            "--fidelity-tokens", "4", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    header, *records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert header["identity"]["model"]["dtype"] == "float32"
    by_method = {}
    for r in records:
        assert 1800 < r["prompt_tokens"] <= 2048
        by_method.setdefault(r["method"], []).append(r["score"])
    assert sorted(by_method) == ["full", "rocketkv"]
    assert by_method["full"] == [1.0, 1.0]
    assert by_method["rocketkv"] == [1.0, 1.0]
    assert (out / "table.md").is_file() and (out / "accuracy_vs_budget.png").is_file()
    assert (out / "fidelity.jsonl").is_file()
    # resumable: a second run adds nothing
    before = (out / "results.jsonl").read_bytes()
    assert cli_main(args) == 0
    assert (out / "results.jsonl").read_bytes() == before

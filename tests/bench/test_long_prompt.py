"""benchmarks/long_prompt.py: the decode step against its byte roofline, with the bytes
recomputed here from the model's shapes and the plans' KV reads."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from benchmark_scripts import load_script

from rocketkv_jax.methods import make_method
from rocketkv_jax.models.config import ModelConfig

lp = load_script("long_prompt")

CFG = ModelConfig(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True)


def test_step_bytes_are_the_weights_and_the_plans_kv_reads():
    import jax.numpy as jnp

    params = {"w": jnp.zeros((2,), jnp.float32)}  # only the dtype is read
    layer = 32 * 4 * 8 * 2 + 32 * 2 * 8 * 2 + 3 * 32 * 64 + 2 * 32  # q, o; k, v; MLP; norms
    weights = (2 * layer + 100 * 32 + 32 + 32) * 4  # + LM head, final norm, one embedding row
    kv_token = 2 * 2 * 2 * 8 * 4  # layers x KV heads x (K, V) x D x 4 bytes
    full = make_method("full")
    assert lp.step_bytes(params, CFG, full, 1000, 64) == weights + (1000 + 32) * kv_token
    streaming = make_method("streaming", 128)  # reads its 128 slots, whatever the prompt
    assert lp.step_bytes(params, CFG, streaming, 1000, 64) == weights + 128 * kv_token


@pytest.mark.slow
def test_the_table_sets_each_step_against_its_roofline(tmp_path):
    out = tmp_path / "run.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = lp.main(["--model", "llama8b-shape", "--layers", "1", "--vocab", "512",
                        "--context", "512", "--new-tokens", "8", "--budget", "64",
                        "--methods", "full,rocketkv", "--json", str(out)])
    assert code == 0
    assert "; per-layer weights;" in buf.getvalue()  # auto: an 8B layer on CPU
    res = json.loads(out.read_text())
    bw = res["bandwidth"]["best_GBps"] * 1e9
    rows = [line.split("|")[1:-1] for line in buf.getvalue().splitlines()
            if line.startswith("| full") or line.startswith("| rocketkv")]
    assert [r[0].strip() for r in rows] == ["full", "rocketkv"]
    for r in rows:
        (run,) = res["runs"][r[0].strip()]
        step = run["decode_s"] / 8
        assert float(r[-2]) == pytest.approx(step * 1e3, abs=0.06)
        assert float(r[-1]) == pytest.approx(step / (run["step_bytes"] / bw), abs=0.006)
    assert res["runs"]["rocketkv"][0]["step_bytes"] < res["runs"]["full"][0]["step_bytes"]

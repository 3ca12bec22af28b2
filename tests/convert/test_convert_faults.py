"""Faults in conversion and in converted checkpoints: damaged weights (NaN/Inf), bad
config values, unsupported architectures, filesystem errors, interrupts. Each ends in one
`error:` line naming what is wrong, exit 2, and nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params

from rocketkv_jax.convert.cli import main as convert_main
from rocketkv_jax.convert.hf import expected_hf_shapes
from rocketkv_jax.models.config import ModelConfig

HF_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, hidden_act="silu",
)


def make_hf_dir(d: Path, edit=None, **config) -> Path:
    """A tiny HF Llama directory written with numpy only (no torch): config.json and one
    model.safetensors; `edit(tensors)` may change the tensors before they are saved."""
    cfg = {**HF_CONFIG, **config}
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    shapes = expected_hf_shapes(ModelConfig.from_hf_dict(HF_CONFIG))  # config: not sizes
    tensors = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in shapes.items()}
    if edit is not None:
        edit(tensors)
    save_file(tensors, d / "model.safetensors")
    return d


def run_convert(capsys, src: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = convert_main([str(src), str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def assert_one_error(code: int, err: str, out: Path | None = None) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, err)
    assert "error: " in lines[0], err
    if out is not None:
        assert not out.exists()
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
        assert left == [], left
    return lines[0]


# ----------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_convert_refuses_non_finite_weights_naming_the_tensor(capsys, tmp_path, bad):
    def poison(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = bad

    src = make_hf_dir(tmp_path / "src", poison)
    code, err = run_convert(capsys, src, tmp_path / "out")
    msg = assert_one_error(code, err, tmp_path / "out")
    assert "model.layers.1.mlp.up_proj.weight (model.safetensors)" in msg
    assert ("1 NaN" if np.isnan(bad) else "1 Inf") in msg


def test_convert_refuses_weights_that_overflow_bfloat16(capsys, tmp_path):
    def huge(t):
        t["model.norm.weight"][0] = 3.4e38  # finite in f32, Inf in bf16

    src = make_hf_dir(tmp_path / "src", huge)
    code, err = run_convert(capsys, src, tmp_path / "out", "--dtype", "bfloat16")
    msg = assert_one_error(code, err, tmp_path / "out")
    assert "model.norm.weight" in msg and "after the cast to bfloat16" in msg
    # float32 holds it: converts
    assert convert_main([str(src), str(tmp_path / "f32"), "--quiet", "--dtype", "float32"]) == 0


def test_generate_check_weights_refuses_a_damaged_checkpoint(tmp_path, capsys):
    from rocketkv_jax.cli import main as cli_main

    config = tiny_checkpoint_config()
    params = tiny_params(config)
    params["layers"]["wk"][1, 2, 3] = np.nan
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", config, params)
    args = ["generate", "--model", str(ckpt), "--method", "full", "--prompt", "w1 w2",
            "--max-new-tokens", "1"]
    assert cli_main(args + ["--check-weights"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "'layers/wk' holds 1 NaN" in err and str(ckpt) in err

"""Faults in conversion and in converted checkpoints: damaged weights (NaN/Inf), bad
config values, unsupported architectures, filesystem errors, interrupts. Each ends in one
`error:` line naming what is wrong, exit 2, and nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_checkpoint import (
    make_hf_dir,
    make_tiny_checkpoint,
    tiny_checkpoint_config,
    tiny_params,
)

from rocketkv_jax.cli.convert import main as convert_main


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


# ------------------------------------------------------------ config.json values
@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", None, "config value hidden_size must be an integer, got None"),
    ("rms_norm_eps", "abc", "config value rms_norm_eps must be a number, got 'abc' (str)"),
    ("rms_norm_eps", float("nan"), "config value rms_norm_eps must be a finite number, got nan"),
    ("rope_theta", float("inf"), "config value rope_theta must be a finite number, got inf"),
    ("num_hidden_layers", "2", "config value num_hidden_layers must be an integer, got '2'"),
    ("max_position_embeddings", [128], "max_position_embeddings must be an integer"),
    ("rope_theta", True, "config value rope_theta must be a number, got True (bool)"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
    ("eos_token_id", "2", "config value eos_token_id must be an integer, got '2'"),
    ("eos_token_id", [1, 64], "eos_token_id 64 is not a token id of the 64-token vocabulary"),
    ("rope_scaling", "linear", "rope_scaling must be an object or null, got 'linear'"),
])
def test_config_value_of_the_wrong_type_names_the_key(capsys, tmp_path, key, value, message):
    src = make_hf_dir(tmp_path / "src", **{key: value})
    code, err = run_convert(capsys, src, tmp_path / "out")
    assert message in assert_one_error(code, err, tmp_path / "out")
    assert "unexpected" not in err


def test_converted_config_of_the_wrong_type_names_the_key(tmp_path):
    from rocketkv_jax.convert.checkpoint import read_checkpoint_config

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    data = json.loads((ckpt / "config.json").read_text())
    data["num_heads"] = 6.5
    (ckpt / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="config value num_heads must be an integer, got 6.5"):
        read_checkpoint_config(ckpt)


def test_hidden_act_swish_is_silu(capsys, tmp_path):
    src = make_hf_dir(tmp_path / "src", hidden_act="swish")
    assert convert_main([str(src), str(tmp_path / "out"), "--quiet"]) == 0
    code, err = run_convert(capsys, make_hf_dir(tmp_path / "gelu", hidden_act="gelu"),
                            tmp_path / "out2")
    assert "unsupported hidden_act 'gelu'" in assert_one_error(code, err)


def test_hf_mixture_of_experts_config_is_refused_as_such(capsys, tmp_path):
    src = make_hf_dir(tmp_path / "src", num_local_experts=8, num_experts_per_tok=2)
    code, err = run_convert(capsys, src, tmp_path / "out")
    assert "mixture-of-experts models are not supported" in assert_one_error(code, err)


def test_mixtral_style_gguf_is_refused_as_mixture_of_experts(capsys, tmp_path):
    import gguf

    path = tmp_path / "mixtral.gguf"
    w = gguf.GGUFWriter(path, "llama")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64),
                   (w.add_embedding_length, 32), (w.add_feed_forward_length, 48),
                   (w.add_head_count, 4), (w.add_head_count_kv, 2), (w.add_expert_count, 8),
                   (w.add_expert_used_count, 2)):
        add(v)
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((8, 48, 32), np.float32))
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, err = run_convert(capsys, path, tmp_path / "out")
    msg = assert_one_error(code, err, tmp_path / "out")
    assert "mixture-of-experts models are not supported" in msg and "missing" not in msg


# ------------------------------------------------------------------- --force
def test_force_refuses_to_delete_a_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    src = make_hf_dir(tmp_path / "src")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, err = run_convert(capsys, src, precious, "--force")
    msg = assert_one_error(code, err)
    assert "--force replaces only a converted checkpoint" in msg and "thesis.tex" in msg
    assert (precious / "thesis.tex").read_text() == "years of work"
    # an HF model directory is not ours either
    code, err = run_convert(capsys, make_hf_dir(tmp_path / "src2"), src, "--force")
    assert "model.safetensors" in assert_one_error(code, err)
    assert (src / "model.safetensors").is_file()


def test_force_replaces_a_checkpoint_even_a_damaged_one(tmp_path):
    src = make_hf_dir(tmp_path / "src")
    out = tmp_path / "out"
    assert convert_main([str(src), str(out), "--quiet"]) == 0
    (out / "config.json").unlink()  # damaged: --force is how it is rebuilt
    assert convert_main([str(src), str(out), "--quiet", "--force"]) == 0
    assert (out / "config.json").is_file()


# ------------------------------------------------------------------ filesystem
def test_out_below_a_file_is_refused_before_reading_the_weights(capsys, tmp_path,
                                                                 monkeypatch):
    from rocketkv_jax.convert import checkpoint

    def never(*a, **kw):
        raise AssertionError("weights read before the output path was checked")

    monkeypatch.setattr(checkpoint, "load_hf", never)
    (tmp_path / "file").write_text("x")
    src = make_hf_dir(tmp_path / "src")
    code, err = run_convert(capsys, src, tmp_path / "file" / "sub" / "out")
    msg = assert_one_error(code, err)
    assert f"cannot write the checkpoint: {tmp_path / 'file'} is a file" in msg


def test_full_disk_while_saving_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    def full(self, directory, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    src = make_hf_dir(tmp_path / "src")
    out = tmp_path / "out"
    code, err = run_convert(capsys, src, out)
    msg = assert_one_error(code, err, out)
    assert "no space left on the device (the disk is full)" in msg and str(out) in msg


# ------------------------------------------------------------ damaged checkpoints
def _damage_truncate_data(ckpt: Path) -> None:
    biggest = max((p for p in (ckpt / "params").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)


def _damage_delete_data_dirs(ckpt: Path) -> None:
    for p in (ckpt / "params").iterdir():
        if p.is_dir():
            shutil.rmtree(p)


def _damage_tokenizer(ckpt: Path) -> None:
    text = (ckpt / "tokenizer.json").read_text()
    (ckpt / "tokenizer.json").write_text(text[: len(text) // 3])


@pytest.mark.parametrize("damage, says", [
    (_damage_truncate_data, "cannot be read (a truncated or missing file)"),
    (_damage_delete_data_dirs, "params/d is missing"),
    (_damage_tokenizer, "tokenizer.json is damaged"),
])
def test_damaged_checkpoint_is_one_error_naming_the_path(tmp_path, capsys, damage, says):
    from rocketkv_jax.cli import main as cli_main

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    damage(ckpt)
    code = cli_main(["generate", "--model", str(ckpt), "--method", "full", "--prompt", "w1",
                     "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(ckpt) in err and says in err
    assert "NoneType" not in err and "tensorstore_spec" not in err
    if damage is not _damage_tokenizer:
        assert f"rocketkv-convert SRC {ckpt} --force" in err


def test_damaged_checkpoint_in_a_fresh_process_prints_no_background_tracebacks(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    _damage_delete_data_dirs(ckpt)
    r = subprocess.run([sys.executable, "-m", "rocketkv_jax.cli", "generate", "--model",
                        str(ckpt), "--method", "full", "--prompt", "w1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr

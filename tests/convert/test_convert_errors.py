"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and no OUT left."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from rocketkv_jax.cli.convert import main
from rocketkv_jax.convert import checkpoint as checkpoint_mod

BAD_INPUT = 2


def run_bad(capsys, src: Path, out: Path, *extra: str, code: int = BAD_INPUT) -> str:
    rc = main([str(src), str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("rocketkv-convert: error: ") or code == 130, err
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == [], leftovers
    return lines[0]


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(d: Path, edit) -> None:
    """Load the single-file model.safetensors as float32 numpy, apply `edit`, save back."""
    from safetensors.numpy import load_file

    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors")


def test_dir_without_config(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")
    (src / "config.json").unlink()
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "no config.json" in msg and str(src) in msg


def test_dir_without_weights(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")
    (src / "model.safetensors").unlink()
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "no model.safetensors" in msg


def test_truncated_safetensors(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")
    f = src / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "model.safetensors" in msg and "truncated or corrupt" in msg


def test_garbage_safetensors(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "not a readable safetensors file" in msg


def test_truncated_shard_of_sharded_model(capsys, tiny_llama_sharded_dir, tmp_path):
    src = copy_dir(tiny_llama_sharded_dir, tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 16)
    msg = run_bad(capsys, src, tmp_path / "out")
    assert shard.name in msg


def test_missing_shard(capsys, tiny_llama_sharded_dir, tmp_path):
    src = copy_dir(tiny_llama_sharded_dir, tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.unlink()
    msg = run_bad(capsys, src, tmp_path / "out")
    assert shard.name in msg and "missing" in msg


def test_config_disagrees_with_weights(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 80  # weights have 96
    (src / "config.json").write_text(json.dumps(cfg))
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "model.layers.0.mlp.gate_proj.weight" in msg
    assert "(96, 64)" in msg and "(80, 64)" in msg


def test_missing_tensor(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")
    rewrite_tensors(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in msg and "(96, 64)" in msg


def test_unexpected_tensor(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")

    def add_bias(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.ones(64, np.float32)

    rewrite_tensors(src, add_bias)
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "unexpected tensor model.layers.0.self_attn.q_proj.bias" in msg and "(64,)" in msg


def test_extra_layer(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")

    def add_layer(t):
        t["model.layers.2.input_layernorm.weight"] = np.ones(64, np.float32)

    rewrite_tensors(src, add_layer)
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "says 2 layers (num_hidden_layers in" in msg and "config.json" in msg
    assert "weights hold 3 (model.layers.0 to model.layers.2)" in msg


def test_misshapen_tensor(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")

    def reshape(t):
        t["model.layers.1.self_attn.k_proj.weight"] = np.ones((48, 64), np.float32)

    rewrite_tensors(src, reshape)
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "model.layers.1.self_attn.k_proj.weight" in msg
    assert "shape (48, 64)" in msg and "expected (32, 64)" in msg


def test_inv_freq_buffers_are_ignored(tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")

    def add_inv_freq(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)

    rewrite_tensors(src, add_inv_freq)
    assert main([str(src), str(tmp_path / "out"), "-q"]) == 0


def test_bert_config_is_unsupported(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")
    (src / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 96,
        "vocab_size": 128,
    }))
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "unsupported architecture" in msg and "bert" in msg


def test_bad_json_config(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")
    (src / "config.json").write_text("{not json")
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "config.json is not valid json" in msg


def test_gelu_activation_is_unsupported(capsys, tiny_llama_dir, tmp_path):
    src = copy_dir(tiny_llama_dir, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(cfg))
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "hidden_act 'gelu'" in msg


def test_missing_source(capsys, tmp_path):
    msg = run_bad(capsys, tmp_path / "nope", tmp_path / "out")
    assert "does not exist" in msg


def test_not_a_model_file(capsys, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(b"\x00" * 64)
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "neither a Hugging Face model directory nor a .gguf file" in msg


def test_corrupt_gguf(capsys, tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF" + b"\xff" * 60)
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "not a readable GGUF file" in msg


def test_truncated_gguf(capsys, smollm2_gguf, tmp_path):
    src = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        src.write_bytes(f.read(4 << 20))
    msg = run_bad(capsys, src, tmp_path / "out")
    assert "cut.gguf is not a readable GGUF file" in msg


def test_existing_out_without_force(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main([str(tiny_llama_dir), str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == BAD_INPUT
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_dtype_is_a_usage_error(capsys, tiny_llama_dir, tmp_path):
    assert main([str(tiny_llama_dir), str(tmp_path / "out"), "--dtype", "float16"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class _InterruptingCheckpointer:
    """Writes some files, then the user presses Ctrl-C in the middle of the save."""

    def save(self, path, tree):
        Path(path).mkdir(parents=True)
        (Path(path) / "partial").write_bytes(b"x" * 1024)
        raise KeyboardInterrupt


def test_interrupt_during_save_leaves_nothing(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_mod.ocp, "StandardCheckpointer", _InterruptingCheckpointer)
    out = tmp_path / "out"
    msg = run_bad(capsys, tiny_llama_dir, out, code=130)
    assert "interrupted" in msg
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_force_replace_keeps_old(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main([str(tiny_llama_dir), str(out), "-q"]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    monkeypatch.setattr(checkpoint_mod.ocp, "StandardCheckpointer", _InterruptingCheckpointer)
    assert main([str(tiny_llama_dir), str(out), "-q", "--force"]) == 130
    assert sorted(p.name for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_error_while_reading_tensors_leaves_nothing(capsys, tiny_llama_dir, tmp_path,
                                                    monkeypatch):
    from rocketkv_jax.convert import hf

    def boom(*args, **kwargs):
        raise hf.ConversionError("cannot read tensor model.norm.weight: disk on fire")

    monkeypatch.setattr(hf, "assemble_params", boom)
    msg = run_bad(capsys, tiny_llama_dir, tmp_path / "out")
    assert "disk on fire" in msg
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint(tmp_path, tiny_llama_dir):
    from rocketkv_jax.convert import ConversionError, load_checkpoint

    with pytest.raises(ConversionError, match="is not a converted checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(ConversionError, match="is not a converted checkpoint directory"):
        load_checkpoint(tmp_path / "missing")
    # an HF directory has a config.json but no params/
    with pytest.raises(ConversionError, match="is not a converted checkpoint"):
        load_checkpoint(tiny_llama_dir)
    # an HF config.json next to a params/ directory
    fake = copy_dir(tiny_llama_dir, tmp_path / "fake")
    (fake / "params").mkdir()
    with pytest.raises(ConversionError, match="not a rocketkv-jax config"):
        load_checkpoint(fake)

"""HF safetensors directory -> checkpoint -> params: exact equality with the HF tensors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from tiny_checkpoint import tokenizer_json

from rocketkv_jax.cli.convert import main
from rocketkv_jax.convert import load_checkpoint
from rocketkv_jax.models.config import ModelConfig

# params key -> (HF name pattern, transposed); written out independently of convert/hf.py.
EXPECTED_LAYOUT = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
    "layers/attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "layers/wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "layers/wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "layers/wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "layers/wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "layers/mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "layers/w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "layers/w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "layers/w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
}


def expected_params(hf: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    out = {}
    for key, (pattern, transposed) in EXPECTED_LAYOUT.items():
        if key == "lm_head" and config.tie_word_embeddings:
            continue
        if key.startswith("layers/"):
            ws = [hf[pattern.format(i=i)] for i in range(config.num_layers)]
            out[key] = np.stack([w.T if transposed else w for w in ws])
        else:
            out[key] = hf[pattern].T if transposed else hf[pattern]
    return out


def get(params: dict, key: str) -> np.ndarray:
    node = params
    for part in key.split("/"):
        node = node[part]
    return np.asarray(node)


def assert_matches_hf(ckpt: Path, hf: dict[str, np.ndarray], dtype=np.float32) -> ModelConfig:
    params, config = load_checkpoint(ckpt)
    expected = expected_params(hf, config)
    assert set(expected) == set(config.param_shapes())
    for key, want in expected.items():
        got = get(params, key)
        assert got.dtype == np.dtype(dtype), key
        assert got.shape == config.param_shapes()[key], key
        np.testing.assert_array_equal(got, want.astype(dtype), err_msg=key)
    return config


@pytest.mark.parametrize(
    "fixture", ["tiny_llama_dir", "tiny_llama_sharded_dir", "tiny_mistral_dir"]
)
def test_cli_f32_roundtrip_is_exact(fixture, request, tmp_path, hf_state_dict):
    src = request.getfixturevalue(fixture)
    out = tmp_path / "ckpt"
    assert main([str(src), str(out), "--dtype", "float32", "--quiet"]) == 0
    config = assert_matches_hf(out, hf_state_dict(src))
    hf_cfg = json.loads((src / "config.json").read_text())
    assert config == ModelConfig.from_hf_dict(hf_cfg)
    assert config.model_type == hf_cfg["model_type"]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "params"
    ]
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (src / "generation_config.json").read_text()
    )
    # nothing else next to OUT (no temporary directory left behind)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_sharded_save_really_is_sharded(tiny_llama_sharded_dir):
    assert (tiny_llama_sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(tiny_llama_sharded_dir.glob("model-*.safetensors"))) > 1


def test_mistral_keeps_sliding_window(tiny_mistral_dir, tmp_path):
    assert main([str(tiny_mistral_dir), str(tmp_path / "o"), "-q"]) == 0
    _, config = load_checkpoint(tmp_path / "o")
    assert config.sliding_window == 8
    assert config.num_kv_heads == 1


def test_default_dtype_is_bf16_rounding_of_hf(tiny_llama_dir, tmp_path, hf_state_dict):
    out = tmp_path / "ckpt"
    assert main([str(tiny_llama_dir), str(out), "-q"]) == 0
    assert_matches_hf(out, hf_state_dict(tiny_llama_dir), dtype=ml_dtypes.bfloat16)


def test_tied_embeddings(hf_model_dir, tmp_path, hf_state_dict):
    src = hf_model_dir("llama", seed=3, tie_word_embeddings=True)
    hf = hf_state_dict(src)
    out = tmp_path / "ckpt"
    assert main([str(src), str(out), "--dtype", "float32", "-q"]) == 0
    params, config = load_checkpoint(out)
    assert config.tie_word_embeddings and "lm_head" not in params
    assert "lm_head.weight" not in hf or np.array_equal(hf["lm_head.weight"],
                                                        hf["model.embed_tokens.weight"])
    assert_matches_hf(out, hf_state_dict(src))


def test_bf16_safetensors_read_exactly(hf_model_dir, tmp_path, hf_state_dict):
    """A bf16 HF save (the common case on the hub) widens to float32 without change."""
    src = hf_model_dir("llama", seed=4, save_dtype="bfloat16")
    out = tmp_path / "ckpt"
    assert main([str(src), str(out), "--dtype", "float32", "-q"]) == 0
    assert_matches_hf(out, hf_state_dict(src))


def test_rope_scaling_and_head_dim_survive(hf_model_dir, tmp_path, hf_state_dict):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    src = hf_model_dir("llama", seed=5, rope_scaling=rope, head_dim=32, num_key_value_heads=1)
    out = tmp_path / "ckpt"
    assert main([str(src), str(out), "--dtype", "float32", "-q"]) == 0
    config = assert_matches_hf(out, hf_state_dict(src))
    assert config.head_dim == 32
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    assert config.rope_scaling.original_max_position_embeddings == 32


def test_force_replaces_existing_checkpoint(tiny_llama_dir, tiny_mistral_dir, tmp_path,
                                            hf_state_dict):
    out = tmp_path / "ckpt"
    assert main([str(tiny_llama_dir), str(out), "-q"]) == 0
    assert main([str(tiny_mistral_dir), str(out), "-q", "--force", "--dtype", "float32"]) == 0
    assert_matches_hf(out, hf_state_dict(tiny_mistral_dir))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_subprocess_module_entry_point(tiny_llama_dir, tmp_path, hf_state_dict):
    out = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "rocketkv_jax.cli.convert", str(tiny_llama_dir), str(out),
         "--dtype", "float32"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "converted" in proc.stderr and "2 layers" in proc.stderr
    assert proc.stdout == ""
    assert_matches_hf(out, hf_state_dict(tiny_llama_dir))


def test_help_lists_examples(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and ".gguf" in text and "--dtype" in text and "--force" in text


def test_tokenizer_files_are_copied(tiny_llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    files = {
        "tokenizer.json": tokenizer_json(61).encode(),
        "tokenizer_config.json": b'{"bos_token": "<s>"}',
        "special_tokens_map.json": b'{"eos_token": "</s>"}',
        "chat_template.jinja": "{{ messages }} \u2728".encode(),
        "README.md": b"not copied",
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    out = tmp_path / "ckpt"
    assert main([str(src), str(out), "-q"]) == 0
    for name, data in files.items():
        if name == "README.md":
            assert not (out / name).exists()
        else:
            assert (out / name).read_bytes() == data, name


def test_out_may_not_contain_the_source(tiny_llama_dir, tmp_path, capsys):
    parent = tmp_path / "models"
    shutil.copytree(tiny_llama_dir, parent / "llama")
    assert main([str(parent / "llama"), str(parent), "--force", "-q"]) == 2
    assert "would overwrite the source" in capsys.readouterr().err
    assert (parent / "llama" / "config.json").is_file()

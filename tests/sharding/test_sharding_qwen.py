"""Qwen-family params on a mesh: q/k/v, o and MLP biases and the q/k RMSNorm weights have
partition rules, a tiny random Qwen2 (14 / 2 heads) and a Qwen3 with every bias give the
single-device tokens on model=2, and model=4 (which does not divide 2 KV heads) is refused.

The 4-device runs share ONE subprocess (`qwen_sharded_checks.py`), as in test_sharding.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from rocketkv_jax import sharding as shd
from rocketkv_jax.models.params import flatten

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from qwen_sharded_checks import CONFIGS, MESHES, NEW, NEW_PARAMS, PROMPT_LENS  # noqa: E402

MESH_IDS = [f"{d}x{m}" for d, m in MESHES]


def abstract_mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), shd.AXES, axis_types=(AxisType.Auto,) * 2)


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HERE / "qwen_sharded_checks.py")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESH_IDS)
@pytest.mark.parametrize("name", ["full", "rocketkv"])
@pytest.mark.parametrize("tag", list(CONFIGS))
def test_sharded_qwen_generate_equals_single_device(report, tag, name, mesh):
    assert report["devices"] == 4
    single = report[f"{tag}/{name}/single"]
    assert len(single) == len(PROMPT_LENS) and all(len(t) == NEW for t in single)
    assert report[f"{tag}/{name}/{mesh}"] == single


@pytest.mark.parametrize("mesh", MESH_IDS)
def test_qwen_biases_are_split_with_their_heads(report, mesh):
    """On the mesh, q/k/v and gate/up biases hold half their columns per device (the
    heads / F of that device); o / down biases and q/k norms are whole on every device."""
    rows = report[f"qwen3-biases/params/{mesh}"]
    assert set(rows) == set(NEW_PARAMS)
    for name in ("bq", "bk", "bv", "b_gate", "b_up"):
        Ly, n = rows[name]["shape"]
        assert rows[name]["shard_shape"] == [Ly, n // 2], name
    for name in ("bo", "b_down", "q_norm", "k_norm"):
        assert rows[name]["shard_shape"] == rows[name]["shape"], name
    assert set(report[f"qwen2/params/{mesh}"]) == {"bq", "bk", "bv"}


@pytest.mark.parametrize("tag", list(CONFIGS))
def test_model_axis_4_is_refused_for_2_kv_heads(report, tag):
    msg = report[f"{tag}/model4"]
    assert msg is not None, "model=4 on 2 KV heads ran instead of being refused"
    assert "mesh model axis 4 does not divide the model's 2 KV heads" in msg
    assert "--mesh data=2,model=2" in msg


# ------------------------------------------------------------------- in-process
@pytest.mark.parametrize("tag", list(CONFIGS))
def test_param_rules_cover_the_qwen_params(tag):
    cfg = CONFIGS[tag]
    flat = flatten(shd.param_shardings(cfg, abstract_mesh(2, 2)))
    assert set(flat) == set(cfg.param_shapes())
    for name in ("bq", "bk", "bv", "b_gate", "b_up"):
        if f"layers/{name}" in flat:
            assert flat[f"layers/{name}"].spec == P(None, "model")
    for name in ("bo", "b_down", "q_norm", "k_norm"):
        if f"layers/{name}" in flat:
            assert flat[f"layers/{name}"].spec == P(None, None)
    with pytest.raises(shd.MeshError, match="does not divide the model's 2 KV heads"):
        shd.param_shardings(cfg, abstract_mesh(1, 4))


# ------------------------------------------------------------- the CLI, 4 devices
def _cli_generate(ckpt, *extra):
    from tiny_checkpoint import words

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "ROCKETKV_JAX_COMPILE_CACHE": "off"}
    return subprocess.run(
        [sys.executable, "-m", "rocketkv_jax.cli", "generate", "--model", str(ckpt),
         "--prompt", words(150), "--method", "rocketkv", "--token-budget", "32",
         "--max-new-tokens", "6", "--no-stream", *extra],
        capture_output=True, text=True, timeout=600, env=env)


def test_cli_mesh_on_a_tiny_qwen2_checkpoint(tmp_path):
    """`rocketkv generate --mesh` on a converted Qwen2 checkpoint (q/k/v biases, 6 / 2
    heads): data=2,model=2 prints the single-device text; model=4 is one clear error."""
    from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config

    cfg = tiny_checkpoint_config(model_type="qwen2", qkv_bias=True,
                                 max_position_embeddings=256)
    assert cfg.num_kv_heads == 2
    ckpt = make_tiny_checkpoint(tmp_path / "qwen2", cfg)
    single = _cli_generate(ckpt)
    assert single.returncode == 0 and single.stdout.strip(), single.stderr[-2000:]
    sharded = _cli_generate(ckpt, "--mesh", "data=2,model=2")
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert sharded.stdout == single.stdout
    refused = _cli_generate(ckpt, "--mesh", "model=4")
    assert refused.returncode == 2
    assert "does not divide the model's 2 KV heads" in refused.stderr
    assert "Traceback" not in refused.stderr

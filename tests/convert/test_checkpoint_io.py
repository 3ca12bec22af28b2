"""save_checkpoint / load_checkpoint: round trip, dtype casts, shardings, bad checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

from rocketkv_jax.convert import (
    ConversionError,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from rocketkv_jax.models.config import ModelConfig

CONFIG = ModelConfig(
    model_type="llama", vocab_size=40, hidden_size=24, intermediate_size=20, num_layers=3,
    num_heads=6, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=5e5,
    max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2, 3),
)


def random_params(config: ModelConfig, dtype=np.float32, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    params: dict = {}
    for key, shape in config.param_shapes().items():
        node = params
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = rng.normal(size=shape).astype(dtype)
    return params


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_roundtrip(tmp_path, dtype):
    params = random_params(CONFIG, dtype)
    out = save_checkpoint(tmp_path / "c", params, CONFIG,
                          {"tokenizer.json": "{}", "blob.bin": b"\x00\x01"})
    assert out == (tmp_path / "c").absolute()
    assert (out / "tokenizer.json").read_text() == "{}"
    assert (out / "blob.bin").read_bytes() == b"\x00\x01"
    assert json.loads((out / "config.json").read_text())["rocketkv_config_version"] == 1
    assert read_checkpoint_config(out) == CONFIG
    loaded, config = load_checkpoint(out)
    assert config == CONFIG
    for key, want in flat(params).items():
        got = flat(loaded)[key]
        assert isinstance(got, jax.Array) and got.dtype == np.dtype(dtype), key
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_load_casts_dtype(tmp_path):
    params = random_params(CONFIG, np.float32)
    save_checkpoint(tmp_path / "c", params, CONFIG)
    loaded, _ = load_checkpoint(tmp_path / "c", dtype="bfloat16")
    for key, want in flat(params).items():
        got = flat(loaded)[key]
        assert got.dtype == np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(got), want.astype(ml_dtypes.bfloat16))


def test_relative_path_and_rename_after_save(tmp_path, monkeypatch):
    """orbax wants absolute paths; the checkpoint must survive being moved."""
    monkeypatch.chdir(tmp_path)
    params = random_params(CONFIG)
    save_checkpoint("rel", params, CONFIG)
    os.rename(tmp_path / "rel", tmp_path / "moved")
    loaded, _ = load_checkpoint("moved")
    np.testing.assert_array_equal(np.asarray(loaded["layers"]["wq"]), params["layers"]["wq"])


def test_single_device_shardings_pytree(tmp_path):
    params = random_params(CONFIG)
    save_checkpoint(tmp_path / "c", params, CONFIG)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    spec = jax.sharding.PartitionSpec
    shardings = jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, spec(*([None] * (x.ndim - 1)), "tp")), params
    )
    loaded, _ = load_checkpoint(tmp_path / "c", shardings=shardings)
    for key, got in flat(loaded).items():
        assert got.sharding == flat(shardings)[key], key
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loaded, _ = load_checkpoint(tmp_path / "c", shardings=one)
    assert all(x.sharding == one for x in flat(loaded).values())
    with pytest.raises(ValueError, match="shardings must be a pytree matching params"):
        load_checkpoint(tmp_path / "c", shardings={"embed": one})


def test_restores_into_multi_device_shardings(tmp_path):
    """Two fake CPU devices (a fresh process: the device count is fixed at jax start)."""
    params = random_params(CONFIG)
    save_checkpoint(tmp_path / "c", params, CONFIG)
    np.save(tmp_path / "wq.npy", params["layers"]["wq"])
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from rocketkv_jax.convert import load_checkpoint
        assert len(jax.devices()) == 2
        mesh = Mesh(np.array(jax.devices()), ("tp",))
        rep = NamedSharding(mesh, P())
        shard = {{"embed": rep, "final_norm": rep, "lm_head": NamedSharding(mesh, P(None, "tp")),
                  "layers": {{k: rep for k in ["attn_norm", "wk", "wv", "wo", "mlp_norm",
                                                "w_gate", "w_up", "w_down"]}}}}
        shard["layers"]["wq"] = NamedSharding(mesh, P(None, None, "tp"))  # 48 cols / 2
        params, _ = load_checkpoint({str(tmp_path / "c")!r}, shardings=shard)
        wq = params["layers"]["wq"]
        assert wq.sharding == shard["layers"]["wq"]
        assert [s.data.shape for s in wq.addressable_shards] == [(3, 24, 24)] * 2
        np.testing.assert_array_equal(np.asarray(wq), np.load({str(tmp_path / "wq.npy")!r}))
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_save_rejects_wrong_params(tmp_path):
    params = random_params(CONFIG)
    params["layers"]["wk"] = params["layers"]["wk"][:, :, :8]
    with pytest.raises(ConversionError, match=r"'layers/wk' has shape \(3, 24, 8\), expected"):
        save_checkpoint(tmp_path / "c", params, CONFIG)
    params = random_params(CONFIG)
    params["extra"] = np.ones(3)
    with pytest.raises(ConversionError, match="unexpected param 'extra'"):
        save_checkpoint(tmp_path / "c", params, CONFIG)
    del params["extra"], params["lm_head"]
    with pytest.raises(ConversionError, match="params lack 'lm_head'"):
        save_checkpoint(tmp_path / "c", params, CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_existing_without_force(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        save_checkpoint(tmp_path / "c", random_params(CONFIG), CONFIG)
    save_checkpoint(tmp_path / "c", random_params(CONFIG), CONFIG, force=True)
    assert read_checkpoint_config(tmp_path / "c") == CONFIG


def test_config_that_disagrees_with_params(tmp_path):
    save_checkpoint(tmp_path / "c", random_params(CONFIG), CONFIG)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["num_layers"] = 4
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"'layers/attn_norm' has shape \(3, 24\), "
                                              r"config.json says \(4, 24\)"):
        load_checkpoint(tmp_path / "c")
    cfg["num_layers"], cfg["tie_word_embeddings"] = 3, True
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="does not match its config.json.*lm_head"):
        load_checkpoint(tmp_path / "c")


def test_broken_params_dir(tmp_path):
    save_checkpoint(tmp_path / "c", random_params(CONFIG), CONFIG)
    for f in (tmp_path / "c" / "params").iterdir():
        if f.is_file():
            f.unlink()
    with pytest.raises(ConversionError, match=r"is damaged: .*_METADATA is missing; convert "
                                              r"the model again over it"):
        load_checkpoint(tmp_path / "c")


def test_convert_package_does_not_import_torch_or_transformers():
    code = ("import sys, rocketkv_jax.convert, rocketkv_jax.cli.convert; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

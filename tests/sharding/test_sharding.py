"""Sharded generate on a ("data", "model") mesh.

The multi-device checks need 4 devices, and XLA_FLAGS=--xla_force_host_platform_device_count
only works before JAX starts, so they run in ONE subprocess (`sharded_checks.py`, ~1 min on
a loaded 2-core machine) whose JSON report the tests below read. Checks that need no second
device (flag parsing, rules, error messages on abstract meshes) run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from rocketkv_jax import partitioned
from rocketkv_jax import sharding as shd
from rocketkv_jax.convert.checkpoint import save_checkpoint
from rocketkv_jax.methods import make_method
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.params import flatten, random_params

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from sharded_checks import BUDGET, CFG, MESHES, NEW, PROMPT_LENS  # noqa: E402

MESH_IDS = [f"{d}x{m}" for d, m in MESHES]


def abstract_mesh(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), shd.AXES, axis_types=(AxisType.Auto,) * 2)


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{**vars(CFG), **overrides})


# ------------------------------------------------------------- the 4-device report
@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    ckpt = save_checkpoint(
        tmp_path_factory.mktemp("sharding") / "ckpt", random_params(CFG, seed=0, scale=0.3), CFG
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_checks.py"), str(ckpt)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_subprocess_sees_four_devices(report):
    assert report["devices"] == 4


@pytest.mark.parametrize("mesh", MESH_IDS)
@pytest.mark.parametrize("name", ["full", "rocketkv"])
def test_sharded_generate_equals_single_device(report, name, mesh):
    single = report[f"stock/{name}/single"]
    assert len(single) == len(PROMPT_LENS) and all(len(t) == NEW for t in single)
    assert report[f"stock/{name}/{mesh}"]["tokens"] == single


def test_sampled_generate_equals_single_device(report):
    """A replicated PRNG key and partitionable threefry: sampling does not depend on the
    mesh (3 prompts, so the batch is padded to 4 rows)."""
    assert len(report["sampled/single"]) == 3
    assert report["sampled/2x2"] == report["sampled/single"]


def test_rocketkv_really_compresses(report):
    # 256: the prompt bucket; stage2 "on" as in sharded_checks (the cost model's fallback
    # would attend densely at this size)
    plan = make_method("rocketkv", BUDGET, stage2="on").plan(CFG, 256, NEW)
    assert plan.prompt_budget < max(PROMPT_LENS)  # stage 1 evicts on the long rows
    assert not plan.stage2_dense and plan.k_top < plan.prompt_budget  # stage 2 is sparse
    assert report["stock/rocketkv/single"] != report["stock/full/single"]


@pytest.mark.parametrize("mesh", MESH_IDS)
@pytest.mark.parametrize("name", ["full", "rocketkv"])
def test_cache_is_never_whole_on_a_device(report, name, mesh):
    """The compiled program holds the stacked cache only as its per-device shard
    [Ly, B/data, K/model, C, D]; the whole [Ly, B, K, C, D] never appears."""
    run = report[f"stock/{name}/{mesh}"]
    assert run["cache_local_in_hlo"]
    assert not run["cache_whole_in_hlo"]


def test_cache_specs(report):
    assert report["cache_specs"] == {
        "k": "P(None, 'data', 'model', None, None)",
        "v": "P(None, 'data', 'model', None, None)",
        "pos": "P(None, 'data', 'model', None)",
        "length": "P(None, 'data')",
        "page_max": "P(None, 'data', 'model', None, None)",
        "page_min": "P(None, 'data', 'model', None, None)",
    }


def test_restored_checkpoint_lands_in_the_rule_shardings(report):
    rows = report["restored"]
    assert set(rows) == set(CFG.param_shapes())
    assert all(r["matches"] and r["devices"] == 4 for r in rows.values()), rows
    # 2x2 mesh: "model"-sharded dims are halved on each device, the rest whole
    for path in ("layers/wq", "layers/wk", "layers/wv", "layers/w_gate", "layers/w_up"):
        Ly, E, out = rows[path]["shape"]
        assert rows[path]["shard_shape"] == [Ly, E, out // 2], path
    for path in ("layers/wo", "layers/w_down"):
        Ly, inp, E = rows[path]["shape"]
        assert rows[path]["shard_shape"] == [Ly, inp // 2, E], path
    assert rows["embed"]["shard_shape"] == [CFG.vocab_size // 2, CFG.hidden_size]
    assert rows["lm_head"]["shard_shape"] == [CFG.hidden_size, CFG.vocab_size // 2]
    for path in ("final_norm", "layers/attn_norm", "layers/mlp_norm"):
        assert rows[path]["shard_shape"] == rows[path]["shape"], path


# Where the collectives of the full-KV programs come from: the row-parallel wo / w_down
# matmuls ("dot_general"), the vocab-parallel embedding lookup ("gather"), the argmax over
# vocab-sharded logits ("reduce"), and with data > 1 the prefill's longest and shortest
# rows over the data axis ("reduce_max" / "reduce_min" of the int32 lengths: key blocks
# past the longest are skipped, blocks before the shortest need no mask) and the decode
# loop's "every row stopped" test ("reduce_and" of the row-sharded done flags). The tokens
# stay row-sharded: the host gathers what it reads between calls, no program does.
# Never a collective-permute or an all-to-all.
FULL_SOURCES = ("dot_general", "gather", "reduce", "reduce_max", "reduce_min", "reduce_and")


@pytest.mark.parametrize("mesh", MESH_IDS)
def test_full_collectives_are_the_tensor_parallel_ones(report, mesh):
    found = report[f"stock/full/{mesh}"]["collectives"]
    for c in found:
        kind, op = c.split(" ", 1)
        assert kind in ("all-reduce", "all-gather"), c
        assert op.rsplit("/", 1)[-1] in FULL_SOURCES, c
    d, m = map(int, mesh.split("x"))
    # two row-parallel all-reduces per layer, in the prefill and in the decode layer scan
    matmuls = [c for c in found if c.endswith("dot_general")]
    assert len(matmuls) == (4 if m > 1 else 0), found


@pytest.mark.parametrize("mesh", MESH_IDS)
def test_rocketkv_selection_collectives(report, mesh):
    """Stock lax.top_k: every collective rocketkv adds over full is an all-gather of a
    top_k operand (XLA replicates `topk`). With `partitioned.top_k`: none, and the same tokens."""
    full = report[f"stock/full/{mesh}"]["collectives"]
    stock = list(report[f"stock/rocketkv/{mesh}"]["collectives"])
    for c in full:
        stock.remove(c)
    gathers = report[f"stock/rocketkv/{mesh}"]["top_k_operand_gathers"]
    assert stock and sorted(stock) == gathers, (stock, gathers)
    assert all(c.startswith("all-gather") for c in stock), stock
    assert report[f"stock/full/{mesh}"]["top_k_operand_gathers"] == []
    patched = report[f"patched/rocketkv/{mesh}"]
    assert patched["collectives"] == full
    assert patched["tokens"] == report["stock/rocketkv/single"]
    assert patched["cache_local_in_hlo"] and not patched["cache_whole_in_hlo"]


def test_sharded_errors_are_clear(report):
    errors = report["errors"]
    assert "does not divide the model's 6 KV heads" in errors["heads"]
    assert "--mesh data=2,model=2" in errors["heads"]
    assert "uses 3 devices but 4 are available" in errors["devices (3, 1)"]
    assert "needs 8 devices but only 4 are available" in errors["devices (4, 2)"]
    assert "xla_force_host_platform_device_count=8" in errors["devices (4, 2)"]


# ------------------------------------------------------------------- in-process
@pytest.mark.parametrize(
    "spec, expected",
    [("data=2,model=2", (2, 2)), ("model=4", (1, 4)), (" model = 2 , data=3 ", (3, 2)),
     ("data=8", (8, 1))],
)
def test_parse_mesh(spec, expected):
    assert shd.parse_mesh(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [("data=2,heads=2", "unknown mesh axis 'heads'"), ("data2", "bad mesh item 'data2'"),
     ("data=two", "is not an int"), ("model=0", "must be >= 1"),
     ("data=1,data=2", "given twice"), (",", "empty mesh spec")],
)
def test_parse_mesh_errors(spec, message):
    with pytest.raises(shd.MeshError, match=message):
        shd.parse_mesh(spec)


def test_mesh_from_flag():
    assert shd.mesh_from_flag(None) is None
    assert shd.mesh_from_flag("") is None
    n = jax.device_count()
    mesh = shd.mesh_from_flag(f"data={n}")
    assert dict(mesh.shape) == {"data": n, "model": 1}
    with pytest.raises(shd.MeshError, match=f"needs {2 * n} devices but only {n}"):
        shd.mesh_from_flag(f"data=2,model={n}")


def test_check_mesh_heads_mlp_and_batch():
    cfg = config(num_kv_heads=4, num_heads=12, intermediate_size=96)
    shd.check_mesh(cfg, abstract_mesh(2, 4), batch=8)
    with pytest.raises(ValueError, match="model axis 3 does not divide the model's 4 KV heads"):
        shd.check_mesh(cfg, abstract_mesh(2, 3))
    with pytest.raises(ValueError, match="does not divide the MLP hidden size 90"):
        shd.check_mesh(config(intermediate_size=90), abstract_mesh(1, 4))
    with pytest.raises(ValueError, match="data axis 4 does not divide the batch of 6 rows"):
        shd.check_mesh(cfg, abstract_mesh(4, 1), batch=6)


@pytest.mark.parametrize("H, K", [(8, 8), (12, 4), (16, 4), (24, 8), (8, 1)])
def test_query_head_columns_sit_with_their_kv_head(H, K):
    """wq's i-th column chunk holds exactly the query heads of wk's i-th KV-head chunk."""
    for m in (m for m in (1, 2, 4, 8) if K % m == 0):
        cfg = config(num_heads=H, num_kv_heads=K)
        D, G = cfg.head_dim, cfg.group_size
        q_dev = np.arange(H * D) // (H * D // m)  # device of each wq column
        kv_dev = np.arange(K * D) // (K * D // m)  # device of each wk column
        for h in range(H):
            assert set(q_dev[h * D:(h + 1) * D]) == {kv_dev[(h // G) * D]}
        shd.check_mesh(cfg, abstract_mesh(1, m))


@pytest.mark.parametrize("tied", [False, True])
def test_param_rules_cover_every_param(tied):
    cfg = config(tie_word_embeddings=tied)
    flat = flatten(shd.param_shardings(cfg, abstract_mesh(1, 4)))
    assert set(flat) == set(cfg.param_shapes())
    assert flat["layers/wq"].spec == P(None, None, "model")
    assert flat["layers/wo"].spec == P(None, "model", None)
    assert flat["embed"].spec == P("model", None)


def test_param_axes_name_their_dims():
    """Each declared logical axis has the size it names (sizes all distinct here)."""
    cfg = config(hidden_size=48, vocab_size=130, qkv_bias=True, o_bias=True, mlp_bias=True,
                 qk_norm=True)
    D = cfg.head_dim
    size = {"layer": cfg.num_layers, "embed": 48, "vocab": 130, "mlp": cfg.intermediate_size,
            "q_heads": cfg.num_heads * D, "kv_heads": cfg.num_kv_heads * D, "head_dim": D}
    assert len(set(size.values())) == len(size)
    infos = cfg.param_infos()
    assert len(infos) == 21  # every param this package knows
    for path, info in infos.items():
        assert tuple(size[a] for a in info.axes) == info.shape, path


def test_a_logical_axis_without_a_rule_is_a_clear_error():
    assert shd.logical_spec(("layer", "embed", "q_heads")) == P(None, None, "model")
    assert shd.logical_spec(("batch", "kv_heads", "slots")) == P("data", "model", None)
    with pytest.raises(shd.MeshError, match="add it to ShardingRules"):
        shd.logical_spec(("layer", "experts"))


def test_vocab_the_model_axis_does_not_divide_is_replicated():
    flat = flatten(shd.param_shardings(config(vocab_size=130), abstract_mesh(1, 4)))
    assert flat["embed"].spec == P(None, None)
    assert flat["lm_head"].spec == P(None, None)


def test_round_batch():
    assert shd.round_batch(4, None) == 4
    assert shd.round_batch(4, abstract_mesh(3, 1)) == 6
    assert shd.round_batch(8, abstract_mesh(2, 2)) == 8


@pytest.mark.parametrize("shape, k", [((3, 5, 40), 7), ((2, 4, 3, 16), 16)])
def test_partition_aware_top_k_equals_lax_top_k(shape, k):
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape).astype(np.float32))
    x = x.at[..., 3].set(x[..., 5])  # a tie: both must pick the lower index
    got = jax.jit(lambda a: partitioned.top_k(a, k))(x)
    want = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))

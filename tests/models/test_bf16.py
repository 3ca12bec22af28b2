"""bf16 params run as bf16 on XLA:CPU: `linear`'s numbers, the layer slice's bits, and the
compiled prefill chunk and decode step, whose dots must take bf16 operands and which must
not convert a stacked weight to f32 (docs/benchmarks.md, "bf16 against f32")."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.engine.generate import make_decode_step, make_prefill
from rocketkv_jax.methods.registry import make_method
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.layers import linear
from rocketkv_jax.models.llama import index_layer, init_prefill_state, prefill_chunk
from rocketkv_jax.models.params import random_params, unstack_layers

CONFIG = ModelConfig(
    model_type="llama", vocab_size=256, hidden_size=96, intermediate_size=160, num_layers=3,
    num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4,
    max_position_embeddings=4096, tie_word_embeddings=True,
)


@pytest.mark.parametrize("lead", [(1, 1), (2, 5), (7,)])
def test_linear_f32_is_the_plain_matmul(lead):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((*lead, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(linear)(x, w)), np.asarray(jax.jit(
        jnp.matmul)(x, w)))


@pytest.mark.parametrize("lead", [(1, 1), (1,), (3, 4)])
def test_linear_bf16_accumulates_the_bf16_values_in_f32(lead):
    """One row (padded to two inside) and several: float32 results equal float64 products
    of the bf16 values to float32 accuracy (a bf16-rounded result would be off by ~1e-3)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((*lead, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.bfloat16)
    out = jax.jit(linear)(x, w)
    assert out.dtype == jnp.float32 and out.shape == (*lead, 48)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_index_layer_is_the_slice_bit_for_bit(dtype):
    rng = np.random.default_rng(2)
    stacked = jnp.asarray(rng.standard_normal((4, 5, 6)), dtype)
    got = jax.jit(index_layer)(stacked, jnp.int32(2))
    assert got.dtype == dtype
    assert np.asarray(got).tobytes() == np.asarray(stacked)[2].tobytes()


def _params(dtype, layout):
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), random_params(CONFIG))
    return unstack_layers(params) if layout == "per-layer" else params


def _dots(hlo: str) -> list[str]:
    """The operand types of every dot in a compiled HLO text (from its fusion's params)."""
    params = dict(re.findall(r"%(\S+) = (\w+)\[[^\]]*\]\{[^}]*\} parameter", hlo))
    dots = re.findall(r"= \w+\[[^\]]*\]\{[^}]*\} dot\(%(\S+), %(\S+)\)", hlo)
    return [(params.get(a, "?"), params.get(b, "?")) for a, b in dots]


def _stack_in_f32(hlo: str) -> list[str]:
    """Lines that hold a whole stacked weight ([layers, E, F] and such) as f32."""
    L, E, F = CONFIG.num_layers, CONFIG.hidden_size, CONFIG.intermediate_size
    shapes = {f"f32[{L},{E},{F}]", f"f32[{L},{F},{E}]", f"f32[{L},{E},{E}]"}
    return [line for line in hlo.splitlines() if any(s in line for s in shapes)]


@pytest.mark.parametrize("layout", ["stacked", "per-layer"])
def test_bf16_prefill_chunk_runs_bf16_dots_and_no_f32_weight_copy(layout):
    params = _params(jnp.bfloat16, layout)
    T = 512
    state = init_prefill_state(CONFIG, 1, T, 0, jnp.bfloat16)
    f = jax.jit(lambda p, s, t, n: prefill_chunk(p, CONFIG, s, t, 0, n, kernels="reference"))
    hlo = f.lower(params, state, jnp.zeros((1, T), jnp.int32),
                  jnp.asarray([T], jnp.int32)).compile().as_text()
    dots = _dots(hlo)
    assert dots and all(d == ("bf16", "bf16") for d in dots), dots
    assert not _stack_in_f32(hlo)
    # the KV buffers are written in place as their bits, not converted to f32 whole
    S = f"[{CONFIG.num_layers},1,{CONFIG.num_kv_heads},{T},{CONFIG.head_dim}]"
    assert f"f32{S}" not in hlo


@pytest.mark.parametrize("layout", ["stacked", "per-layer"])
@pytest.mark.parametrize("batch", [1, 4])
def test_bf16_decode_step_runs_bf16_matmuls_and_no_f32_weight_copy(layout, batch):
    params = _params(jnp.bfloat16, layout)
    T = 256
    plan = make_method("full").plan(CONFIG, T, 8)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    cache = jax.eval_shape(make_prefill(CONFIG, plan), params,
                           jax.ShapeDtypeStruct((batch, T), jnp.int32), rows)[1]
    hlo = make_decode_step(CONFIG, plan).lower(params, rows, rows, cache).compile().as_text()
    assert not _stack_in_f32(hlo)
    # the projections (E -> H*D, E -> F, F -> E) multiply bf16 weights
    E, F = CONFIG.hidden_size, CONFIG.intermediate_size
    weights = re.findall(r"dot\(%\S+, %(\S+)\).*", hlo)
    assert weights
    kinds = dict(re.findall(r"%(\S+) = (\w+\[[^\]]*\])\{[^}]*\} parameter", hlo))
    projections = [kinds.get(w) for w in weights if kinds.get(w, "").endswith(
        (f"[{E},{F}]", f"[{F},{E}]"))]
    assert projections and all(k.startswith("bf16") for k in projections), projections

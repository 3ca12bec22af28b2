"""Per-layer weights (`unstack_layers`): the model's layer loop multiplies by one array per
layer (a switch over the layers in the `lax.fori_loop`) instead of slicing stacked
[L, ...] weights.

The two layouts must compute the same thing (the stacked layout is checked against
transformers in test_parity.py), and the per-layer one must do what it is for: no copy of
a layer's weights before its matmuls (and still no copy of the stacked KV cache:
test_decode_inplace.py runs its no-copy check on both layouts)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.bench.xla_stats import copy_fusions
from rocketkv_jax.engine.generate import make_decode_step, make_prefill
from rocketkv_jax.methods.registry import make_method
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.params import random_params, stack_layers, unstack_layers

CONFIG = ModelConfig(
    model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=160, num_layers=3,
    num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4,
    max_position_embeddings=512, tie_word_embeddings=False,
)
METHODS = [("full", {}), ("rocketkv", {"token_budget": 64, "stage2": "on"}),
           ("quest", {"token_budget": 64, "skip_layers": 1})]


def test_unstack_then_stack_is_the_identity_and_layers_are_their_own_arrays():
    params = random_params(CONFIG)
    per = unstack_layers(params)
    assert isinstance(per["layers"], tuple) and len(per["layers"]) == CONFIG.num_layers
    for i, layer in enumerate(per["layers"]):
        for name, w in layer.items():
            np.testing.assert_array_equal(np.asarray(w), np.asarray(params["layers"][name][i]))
    back = stack_layers(per)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert unstack_layers(per) is per and stack_layers(params) is params


def test_unstack_rejects_disagreeing_layer_counts():
    params = random_params(CONFIG)
    params["layers"]["wq"] = params["layers"]["wq"][:2]
    with pytest.raises(ValueError, match="layer count"):
        unstack_layers(params)


@pytest.mark.parametrize("name,kw", METHODS)
def test_per_layer_prefill_and_decode_equal_stacked(name, kw):
    params = random_params(CONFIG, seed=3, scale=0.05)
    per = unstack_layers(params)
    T, N, B = 200, 6, 2
    plan = make_method(name, **kw).plan(CONFIG, T, N)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)), jnp.int32)
    lengths = jnp.asarray([T, T - 37], jnp.int32)
    prefill, step = make_prefill(CONFIG, plan, 64), make_decode_step(CONFIG, plan)
    runs = []
    for p in (params, per):
        logits, cache = prefill(p, tokens, lengths)
        out = [logits]
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        pos = lengths
        for _ in range(N):
            logits, cache = step(p, tok, pos, cache)
            out.append(logits)
            tok, pos = jnp.argmax(logits, -1).astype(jnp.int32), pos + 1
        runs.append(out)
    for a, b in zip(*runs, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def _compiled_step(params, plan, T: int, B: int):
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    cache = jax.eval_shape(make_prefill(CONFIG, plan), params, tokens, lengths)[1]
    row = jax.ShapeDtypeStruct((B,), jnp.int32)
    return make_decode_step(CONFIG, plan).lower(params, row, row, cache).compile()


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the slice copy is XLA:CPU's; GPU fuses the slice into the matmul")
def test_per_layer_decode_copies_no_weights_where_stacked_does():
    params = random_params(CONFIG)
    plan = make_method("full").plan(CONFIG, 256, 8)
    gate = (CONFIG.hidden_size, CONFIG.intermediate_size)
    stacked = _compiled_step(params, plan, 256, 2)
    per = _compiled_step(unstack_layers(params), plan, 256, 2)
    assert copy_fusions(stacked.as_text(), gate) > 0  # what the layout is for
    assert copy_fusions(per.as_text(), gate) == 0


def test_per_layer_cache_writes_copy_no_stacked_buffer():
    """The position write of layer i+1 does not depend on layer i's activations; were the
    loop unrolled, XLA could run it before layer i reads the positions and copy the whole
    stacked array to keep that read right (once per layer)."""
    T, B = 256, 2
    plan = make_method("full").plan(CONFIG, T, 8)
    compiled = _compiled_step(unstack_layers(random_params(CONFIG)), plan, T, B)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    cache = jax.eval_shape(make_prefill(CONFIG, plan), random_params(CONFIG), tokens,
                           jax.ShapeDtypeStruct((B,), jnp.int32))[1]
    shapes = {",".join(map(str, x.shape)) for x in jax.tree.leaves(cache)
              if x.ndim >= 4 and x.size}  # (empty leaves: metadata a method does not keep)
    copies = [line for line in compiled.as_text().splitlines()
              if " copy(" in line and any(f"[{s}]" in line.split("copy(")[0] or
                                          f"[{s},1]" in line.split("copy(")[0] for s in shapes)]
    assert len(copies) <= 1, copies  # one copy of the positions passed in; was 1 per layer


def test_per_layer_compiles_one_layer_body_whatever_the_depth():
    """The per-layer layout keeps the layer loop (compile time that does not grow with
    depth): the decode step's softmax exponentials, one set per layer body, are as many at
    6 layers as at 2, as with stacked weights."""
    def exps(num_layers, layout):
        config = dataclasses.replace(CONFIG, num_layers=num_layers)
        params = random_params(config)
        if layout == "per-layer":
            params = unstack_layers(params)
        plan = make_method("full").plan(config, 256, 8)
        tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
        row = jax.ShapeDtypeStruct((2,), jnp.int32)
        cache = jax.eval_shape(make_prefill(config, plan), params, tokens, row)[1]
        text = make_decode_step(config, plan).lower(params, row, row, cache).as_text()
        return text.count("exponential")

    per = [exps(n, "per-layer") for n in (2, 6)]
    assert per[0] == per[1] == exps(6, "stacked") > 0, per


def test_auto_layout_is_per_layer_on_cpu_for_big_layers_only():
    """`--weight-layout auto`: per-layer where a layer's weights reach PER_LAYER_MIN_BYTES
    on CPU (an 8B layer: 872 MB in f32), stacked for small layers (SmolLM2: 14 MB) and on
    GPU, in either layout of the same weights."""
    from rocketkv_jax.models.params import (
        PER_LAYER_MIN_BYTES,
        auto_layout,
        layer_bytes,
        with_layout,
    )

    small = random_params(CONFIG)
    assert auto_layout(small, "cpu") == auto_layout(unstack_layers(small), "cpu") == "stacked"
    mats = {"wq": (64, 64), "wk": (64, 32), "wv": (64, 32), "wo": (64, 64),
            "w_gate": (64, 160), "w_up": (64, 160), "w_down": (160, 64)}
    want = sum(a * b for a, b in mats.values()) * 4
    assert layer_bytes(small) == want + 2 * 64 * 4  # the matrices and the two norms
    big = {"layers": {"w": jax.ShapeDtypeStruct((3, PER_LAYER_MIN_BYTES // 4), jnp.float32)}}
    assert layer_bytes(big) == PER_LAYER_MIN_BYTES
    assert auto_layout(big, "cpu") == "per-layer"
    assert auto_layout(big, "gpu") == "stacked"
    just_under = {"layers": {"w": jax.ShapeDtypeStruct((3, PER_LAYER_MIN_BYTES // 4 - 1),
                                                      jnp.float32)}}
    assert auto_layout(just_under, "cpu") == "stacked"
    # with_layout: what the CLI and benchmarks load
    assert with_layout(small, "auto", "cpu") == (small, "stacked")
    per, layout = with_layout(small, "per-layer", "gpu")
    assert layout == "per-layer" and len(per["layers"]) == CONFIG.num_layers

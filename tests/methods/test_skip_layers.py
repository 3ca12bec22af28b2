"""`skip_layers` on the methods side (SkipLayersPlan): the first layers keep every token
and attend densely (pinned to a float64 numpy loop), the others are exactly the method's
own plan; run the way the model's decode layer loops would (one fori_loop per layer group,
traced layer index)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.methods import make_method
from rocketkv_jax.methods.base import MethodConfigError
from rocketkv_jax.methods.skip_layers import SkipLayersPlan, skip_layers_plan
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.plan import compress_layers, layer_groups

D, K, L, T, N = 16, 2, 4, 48, 8


def config(G):
    return ModelConfig(
        model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64,
        num_layers=L, num_heads=K * G, num_kv_heads=K, head_dim=D, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
    )


def ref_dense(q, k, v, n):
    """One query head q [D] over the first n slots of k, v [C, D], float64."""
    logits = k[:n] @ q / math.sqrt(len(q))
    p = np.exp(logits - logits.max())
    return (p / p.sum()) @ v[:n]


def attend_layer(plan, q, stack, layer, pos, window):
    """One layer's attention on a stacked cache, as forward_decode reads it."""
    return plan.attend(q, jax.tree.map(lambda a: a[layer], stack), pos, window)


def decode_step(plan, cache, q, k_new, v_new, pos, window):
    """What forward_decode does per layer, through the model-side entry points."""
    outs = jnp.zeros(q.shape, jnp.float32)  # [L, B, H, D]
    for group in layer_groups(plan, L):
        sub, start = group.plan, group.start

        def layer(i, carry, sub=sub, start=start):
            stack, outs = carry
            stack = sub.append(stack, k_new[i], v_new[i], pos, i - start)
            out = attend_layer(sub, q[i], stack, i - start, pos, window)  # [B, H, D]
            return stack, outs.at[i].set(out.astype(outs.dtype))

        stack, outs = jax.lax.fori_loop(start, group.stop, layer, (group.stack(cache), outs))
        cache = group.replace(cache, stack)
    return cache, outs


@pytest.mark.parametrize(("method", "budget", "over", "G", "S"), [
    ("rocketkv", 16, {"window": 8}, 2, 2),
    ("quest", 16, {"page_size": 4}, 4, 1),
    ("snapkv++", 24, {"window": 8}, 1, 3),
])
def test_skip_layers_dense_then_method(method, budget, over, G, S):
    cfg = config(G)
    inner = make_method(method, budget, **over).plan(cfg, T, N)
    plan = skip_layers_plan(inner, S, L, T, N)
    assert isinstance(plan, SkipLayersPlan) and plan.capacity == inner.capacity
    rng = np.random.default_rng(S * 10 + G)
    B, H, W = 2, K * G, max(inner.query_window, 1)
    lengths = np.array([T, T - 9])

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    k, v, q_obs = rand(L, B, K, T, D), rand(L, B, K, T, D), rand(L, B, H, W, D)
    n = jnp.asarray(lengths, jnp.int32)
    cache = jax.jit(plan.compress_layers)(k, v, q_obs, n)
    # the dense stack holds every prompt token of the skipped layers
    assert cache.dense.k.shape[0] == S and cache.sparse.k.shape[0] == L - S
    np.testing.assert_array_equal(np.asarray(cache.dense.length), np.tile(lengths, (S, 1)))
    for b in range(B):
        np.testing.assert_array_equal(np.asarray(cache.dense.k[:, b, :, :lengths[b]]),
                                      np.asarray(k[:S, b, :, :lengths[b]]))
    # the other layers are the method's own caches
    own = jax.jit(lambda k, v, q: compress_layers(inner, k, v, q, n))(k[S:], v[S:], q_obs[S:])
    for a, b_ in zip(jax.tree.leaves(cache.sparse), jax.tree.leaves(own), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))

    q, k_new, v_new = rand(L, B, H, D), rand(L, B, K, D), rand(L, B, K, D)
    pos = n  # the first new token sits at position `length`
    step = jax.jit(decode_step, static_argnums=(0, 6))
    cache2, outs = step(plan, cache, q, k_new, v_new, pos, None)
    outs = np.asarray(outs, np.float64)
    assert np.isfinite(outs).all()
    # skipped layers: dense attention over prompt + the appended token (numpy, float64)
    k64, v64 = np.asarray(k, np.float64), np.asarray(v, np.float64)
    for i in range(S):
        for b in range(B):
            for h in range(H):
                kv = h // G
                new_k, new_v = np.asarray(k_new[i, b, kv])[None], np.asarray(v_new[i, b, kv])[None]
                keys = np.concatenate([k64[i, b, kv, :lengths[b]], new_k])
                vals = np.concatenate([v64[i, b, kv, :lengths[b]], new_v])
                want = ref_dense(np.asarray(q[i, b, h], np.float64), keys, vals, len(keys))
                np.testing.assert_allclose(outs[i, b, h], want, rtol=1e-5, atol=1e-5)
    # the other layers: exactly the method's own decode step on its own cache
    own_out = []
    for i in range(S, L):
        c = jax.tree.map(lambda a, j=i - S: a[j:j + 1], own)
        c = inner.append(c, k_new[i], v_new[i], pos, 0)
        own_out.append(attend_layer(inner, q[i], c, 0, pos, None))
    np.testing.assert_allclose(outs[S:], np.asarray(jnp.stack(own_out), np.float64),
                               rtol=1e-5, atol=1e-6)
    # the token went into the right stack, at slot `length`
    np.testing.assert_array_equal(np.asarray(cache2.dense.length), np.tile(lengths + 1, (S, 1)))
    np.testing.assert_array_equal(np.asarray(cache2.dense.k[:, 0, :, lengths[0]]),
                                  np.asarray(k_new[:S, 0]))
    assert (np.asarray(cache2.sparse.length) == np.asarray(own.length) + 1).all()
    # and the skipped layers' answers are not what the method would have given
    c0 = jax.tree.map(lambda a: a[:1], jax.jit(
        lambda k, v, q: compress_layers(inner, k, v, q, n))(k[:1], v[:1], q_obs[:1]))
    c0 = inner.append(c0, k_new[0], v_new[0], pos, 0)
    if inner.capacity < T:
        assert not np.allclose(np.asarray(attend_layer(inner, q[0], c0, 0, pos, None)),
                               outs[0], atol=1e-3)


def test_skip_layers_plan_checks_and_passthrough():
    cfg = config(2)
    inner = make_method("rocketkv", 16, window=8).plan(cfg, T, N)
    assert skip_layers_plan(inner, 0, L, T, N) is inner
    dense = make_method("rocketkv", 4096).plan(cfg, T, N)
    assert skip_layers_plan(dense, 2, L, T, N) is dense  # already dense everywhere
    for bad in (L, -1):
        with pytest.raises(MethodConfigError, match="skip_layers"):
            skip_layers_plan(inner, bad, L, T, N)
    plan = skip_layers_plan(inner, 2, L, T, N)
    hash(plan)  # a static jit argument
    assert plan.describe()["skip_layers"] == 2
    assert plan.read_tokens(T + N) > inner.read_tokens(T + N)


def test_skip_layers_flag():
    """`--skip-layers N` on generate builds the method with it, refuses methods without
    it, and eval takes the flag too."""
    from rocketkv_jax.cli import build_parser
    from rocketkv_jax.cli.common import UserError
    from rocketkv_jax.cli.common import method_from_flags as make_method_from_args

    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "x", "--method", "quest",
                              "--skip-layers", "2"])
    assert make_method_from_args(args) == make_method("quest", 256, skip_layers=2)
    args = parser.parse_args(["generate", "--prompt", "x", "--method", "rocketkv"])
    assert make_method_from_args(args) == make_method("rocketkv", 256)  # default 0
    args = parser.parse_args(["generate", "--prompt", "x", "--method", "streaming",
                              "--skip-layers", "2"])
    with pytest.raises(UserError, match="skip-layers"):
        make_method_from_args(args)
    with pytest.raises(SystemExit):  # the flag's own check (checks.skip_layers)
        parser.parse_args(["generate", "--prompt", "x", "--method", "snapkv",
                           "--skip-layers", "-1"])
    assert parser.parse_args(["eval", "--skip-layers", "2"]).skip_layers == 2


def test_two_stack_cache_shardings():
    """sharding.cache_shardings / constrain_cache take the two-stack cache: each stack gets
    the KVCache rules ("data" on B, "model" on K) behind its own leading layer axis."""
    from jax.sharding import PartitionSpec as P

    from rocketkv_jax import sharding as shd

    inner = make_method("quest", 16, page_size=4).plan(config(2), T, N)
    plan = skip_layers_plan(inner, 1, L, T, N)
    B, H, W = 2, K * 2, 1
    args = (jax.ShapeDtypeStruct((L, B, K, T, D), jnp.float32),) * 2 + (
        jax.ShapeDtypeStruct((L, B, H, W, D), jnp.float32),
        jax.ShapeDtypeStruct((B,), jnp.int32))
    cache = jax.eval_shape(plan.compress_layers, *args)
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    specs = shd.cache_shardings(cache, mesh)
    assert specs.dense.k.spec == specs.sparse.k.spec == P(None, "data", "model", None, None)
    assert specs.dense.length.spec == P(None, "data")
    out = jax.jit(lambda c: shd.constrain_cache(c, mesh))(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache))
    assert jax.tree.structure(out) == jax.tree.structure(cache)

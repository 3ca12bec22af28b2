"""Official-code knobs: RocketKV's fixed stage-1 share (`rocket_r0.3/0.5/0.7`) and the
official per-query-head top-k oracle (k = M), pinned to hand-worked numbers and to
float64 numpy loops written from docs/algorithm.md (not to the jnp code)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.methods import (
    METHOD_VARIANTS,
    RocketKV,
    TopK,
    TopKPlan,
    TwoStagePlan,
    make_method,
    rocketkv_split,
)
from rocketkv_jax.methods.base import MethodConfigError
from rocketkv_jax.methods.registry import method_hparams
from rocketkv_jax.models.config import ModelConfig

D, K = 16, 2


def config(G: int, head_dim: int = D) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64,
        num_layers=1, num_heads=K * G, num_kv_heads=K, head_dim=head_dim, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    )


# ----------------------------------------------------------------- stage1_share
def ref_split(M, L, N, D, a):
    """docs/algorithm.md's split with `a` given, float64, written out independently."""
    M = min(M, L)
    c = max(1.0, L / M)
    capacity = max(int(L / c**a), min(2 * N, L))
    c2 = max(1.0, capacity / M)
    page = math.ceil(math.sqrt(c2))
    page = page if page <= c2 else 1
    r = min(max(int(D * page / c2), 1), D)
    return capacity, capacity - N, M // 2, page, r


# M=256, L=4096, N=32, D=128: c = 16.
#   a=0.3: 16**0.3 = 2**1.2 = 2.2974, 4096/2.2974 = 1782.9 -> 1782; c2 = 6.961,
#          ceil(sqrt) = 3 -> page 3; r = int(384 / 6.961) = 55.
#   a=0.5: 16**0.5 = 4 -> 1024; c2 = 4 -> page 2; r = int(256 / 4) = 64.
#   a=0.7: 16**0.7 = 2**2.8 = 6.9644 -> 588; c2 = 2.297, ceil(sqrt) = 2 -> page 2;
#          r = int(256 / 2.297) = 111.
HAND = {0.3: (1782, 1750, 128, 3, 55), 0.5: (1024, 992, 128, 2, 64), 0.7: (588, 556, 128, 2, 111)}


@pytest.mark.parametrize("share", [0.3, 0.5, 0.7])
def test_fixed_stage1_share_hand_computed(share):
    s = rocketkv_split(256, 4096, 32, 128, share)
    assert s.stage1_share == share
    assert (s.capacity, s.prompt_budget, s.k_top, s.page_size, s.top_r) == HAND[share]
    assert ref_split(256, 4096, 32, 128, share) == HAND[share]
    # the adaptive split (a = 0.44 here) is unchanged without the knob
    assert rocketkv_split(256, 4096, 32, 128).capacity == 1209


def test_fixed_stage1_share_matches_reference_on_random_shapes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        D_ = int(rng.choice([32, 64, 128]))
        N = int(rng.integers(1, 200))
        L = N + int(rng.integers(1, 40_000))
        M = int(rng.integers(1, L + 100))
        a = float(rng.choice([0.3, 0.5, 0.7, rng.uniform(0, 1)]))
        s = rocketkv_split(M, L, N, D_, a)
        assert (s.capacity, s.prompt_budget, s.k_top, s.page_size, s.top_r) == ref_split(
            M, L, N, D_, a), (M, L, N, D_, a)


@pytest.mark.parametrize("share", [0.3, 0.5, 0.7])
def test_rocketkv_plan_and_stage1_use_the_fixed_share(share):
    T, N, M = 600, 8, 64
    plan = make_method("rocketkv", M, stage1_share=share, window=8).plan(config(4), T, N)
    assert isinstance(plan, TwoStagePlan)
    capacity, prompt_budget, k_top, page, r = ref_split(M, T + N, N, D, share)
    assert (plan.prompt_budget, plan.k_top, plan.page_size, plan.top_r) == (
        prompt_budget, k_top, page, r)
    # stage 1 keeps exactly prompt_budget tokens of a longer prompt
    rng = np.random.default_rng(1)
    k, v = (jnp.asarray(rng.standard_normal((1, K, T, D)), jnp.float32) for _ in range(2))
    q_obs = jnp.asarray(rng.standard_normal((1, K * 4, plan.window, D)), jnp.float32)
    cache = jax.jit(plan.compress)(k, v, q_obs, jnp.asarray([T], jnp.int32))
    assert int(cache.length[0]) == prompt_budget
    assert prompt_budget != make_method("rocketkv", M, window=8).plan(config(4), T, N).prompt_budget


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "0.5", True])
def test_stage1_share_rejects_bad_values(bad):
    with pytest.raises(MethodConfigError, match="stage1_share"):
        make_method("rocketkv", 256, stage1_share=bad)
    assert "stage1_share" in method_hparams("rocketkv")


# ----------------------------------------------------------------- per-head top-k oracle
def ref_visible(pos, qpos, window):
    return [c for c in range(len(pos)) if 0 <= pos[c] <= qpos
            and (window is None or qpos - pos[c] < window)]


def ref_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_topk_per_head(q, k, v, vis, M):
    """Official oracle for one query head: its own exact probabilities over the visible
    slots, its top M slots (ties to the lower slot), exact attention on them."""
    d = q.shape[0]
    logits = np.array([q @ k[c] for c in vis]) / math.sqrt(d)
    probs = ref_softmax(logits)
    order = np.argsort(-probs, kind="stable")[:M]
    sel = [vis[i] for i in order]
    p = ref_softmax(np.array([q @ k[c] for c in sel]) / math.sqrt(d))
    return p @ v[sel], sel, dict(zip(vis, probs, strict=True))


@pytest.mark.parametrize(("G", "dtype", "window"), [
    (1, jnp.float32, None), (3, jnp.float32, 20), (4, jnp.bfloat16, None),
    (8, jnp.float32, None), (4, jnp.float32, 24)])
def test_per_head_topk_matches_numpy(G, dtype, window):
    T, N, M = 64, 8, 16
    plan = make_method("topk", M, per_head=True).plan(config(G), T, N)
    assert isinstance(plan, TopKPlan) and plan.per_head and plan.k_top == M
    assert make_method("topk", M).plan(config(G), T, N).k_top == M // 2  # ours unchanged
    rng = np.random.default_rng(G * 7 + (window or 0))
    B, H = 2, K * G
    lengths = np.array([T, T - 13])

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 1.5, dtype)

    n = jnp.asarray(lengths, jnp.int32)
    cache = jax.jit(plan.compress)(rand(B, K, T, D), rand(B, K, T, D), None, n)
    append = jax.jit(plan.append)
    for i in range(5):
        cache = append(cache, rand(B, K, D), rand(B, K, D), jnp.asarray(lengths + i, jnp.int32))
    qpos = jnp.asarray(lengths + 4, jnp.int32)
    q = rand(B, H, D)
    out = jax.jit(plan.attend, static_argnums=3)(q, cache, qpos, window)
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.isfinite(out).all()

    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    ck, cv, q64, cpos = f64(cache.k), f64(cache.v), f64(q), np.asarray(cache.pos)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    differs_from_shared = False
    for b in range(B):
        for h in range(H):
            kv = h // G
            vis = ref_visible(cpos[b, kv], int(qpos[b]), window)
            want, sel, probs = ref_topk_per_head(q64[b, h], ck[b, kv], cv[b, kv], vis, M)
            if dtype == jnp.float32:
                np.testing.assert_allclose(out[b, h], want, **tol)
            else:  # bf16 ties at the cut may swap a slot: compare on our own selection
                np.testing.assert_allclose(out[b, h], want, rtol=0.1, atol=0.1)
            assert len(sel) == min(M, len(vis))
            group_scores = {c: 0.0 for c in vis}
            for g in range(G):
                qg = q64[b, kv * G + g]
                p = ref_softmax(np.array([qg @ ck[b, kv, c] for c in vis]) / math.sqrt(D))
                for c, pc in zip(vis, p, strict=True):
                    group_scores[c] += pc
            shared = sorted(vis, key=lambda c: -group_scores[c])[:M]
            differs_from_shared |= set(shared) != set(sel)
    if G > 1:  # per-head selections are not the group's shared one
        assert differs_from_shared


def test_per_head_topk_validation_and_dense_fallback():
    with pytest.raises(MethodConfigError, match="per_head"):
        make_method("topk", 16, per_head=1)
    assert "per_head" in method_hparams("topk")
    plan = make_method("topk", 100, per_head=True).plan(config(2), 64, 8)  # M >= L
    assert not isinstance(plan, TopKPlan)


def test_official_variants_by_name():
    assert set(METHOD_VARIANTS) == {"rocket_r0.3", "rocket_r0.5", "rocket_r0.7", "topk_head"}
    for share in (0.3, 0.5, 0.7):
        m = make_method(f"rocket_r{share}", 256, window=16)
        assert m == RocketKV(256, window=16, stage1_share=share)
    assert make_method("topk_head", 64) == TopK(64, per_head=True)
    assert make_method("rocket_r0.5", 256, stage1_share=0.5).stage1_share == 0.5
    with pytest.raises(MethodConfigError, match="cannot take stage1_share=0.3"):
        make_method("rocket_r0.5", 256, stage1_share=0.3)
    with pytest.raises(MethodConfigError, match="rocket_r0.3"):
        make_method("rocket_r0.4", 256)


def test_eval_knows_the_same_method_names():
    from rocketkv_jax.eval.runner import METHOD_VARIANT_NAMES
    from rocketkv_jax.methods.registry import METHOD_CLASSES
    from rocketkv_jax.names import METHOD_NAMES  # what eval lists

    assert tuple(cls.name for cls in METHOD_CLASSES) == METHOD_NAMES
    assert METHOD_VARIANT_NAMES == tuple(METHOD_VARIANTS)
    for base, _ in METHOD_VARIANTS.values():
        assert base in METHOD_NAMES

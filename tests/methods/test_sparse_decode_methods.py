"""Decode-time sparse methods (hybrid / rocketkv stage 2, quest, sparq, topk) pinned to
numpy loops written from docs/algorithm.md, not to the jnp code."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.cache import page_bounds, visible_slots
from rocketkv_jax.engine.generate import make_decode_step, make_prefill
from rocketkv_jax.methods import (
    QuestPlan,
    SparQPlan,
    TopKPlan,
    TwoStagePlan,
    make_method,
    method_hparams,
)
from rocketkv_jax.methods.quest import quest_select
from rocketkv_jax.methods.sparq import sparq_attend
from rocketkv_jax.methods.sparse_ops import (
    SelectsSlots,
    approx_scores,
    attend_selected,
    group_queries,
)
from rocketkv_jax.methods.stage2 import hybrid_select, select_channels
from rocketkv_jax.methods.topk import topk_select
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.llama import window_queries
from rocketkv_jax.models.params import random_params
from rocketkv_jax.models.plan import attend_layer

D = 16
K = 2


def config(G: int) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64,
        num_layers=1, num_heads=K * G, num_kv_heads=K, head_dim=D, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
    )


def build(plan, seed, G, T, lengths, n_append, dtype):
    """Prompt through plan.compress, n_append decode tokens through plan.append, and a
    decode query at the last appended position. Returns the cache, q [B, H, D], query
    positions [B], and float64 numpy views (k, v, pos, length) of the cache."""
    rng = np.random.default_rng(seed)
    B, H = len(lengths), K * G

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 1.5, dtype)

    n = jnp.asarray(lengths, jnp.int32)
    q_obs, _ = window_queries(rand(B, H, T, D), n, getattr(plan, "query_window", 0))
    cache = jax.jit(plan.compress)(rand(B, K, T, D), rand(B, K, T, D), q_obs, n)
    first_new = np.asarray(cache.pos).max(axis=(1, 2)) + 1  # [B]
    append = jax.jit(plan.append)
    for i in range(n_append):
        cache = append(cache, rand(B, K, D), rand(B, K, D), jnp.asarray(first_new + i, jnp.int32))
    q = rand(B, H, D)
    qpos = jnp.asarray(first_new + n_append - 1, jnp.int32)
    views = tuple(np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                  for x in (cache.k, cache.v))
    return cache, q, qpos, (*views, np.asarray(cache.pos), np.asarray(cache.length))


# ----------------------------------------------------------------- numpy reference
def ref_visible(pos, qpos, sliding_window):
    """Slots a decode query at qpos may attend (pos: [C] of one row / head)."""
    return [c for c in range(len(pos)) if 0 <= pos[c] <= qpos
            and (sliding_window is None or qpos - pos[c] < sliding_window)]


def ref_page_bounds(k, pos, page):
    """k [C, D], pos [C] -> (kmax, kmin) [P, D] over each page's filled slots."""
    C, Dh = k.shape
    kmax = np.full((C // page, Dh), -np.inf)
    kmin = np.full((C // page, Dh), np.inf)
    for p in range(C // page):
        for c in range(p * page, (p + 1) * page):
            if pos[c] >= 0:
                kmax[p] = np.maximum(kmax[p], k[c])
                kmin[p] = np.minimum(kmin[p], k[c])
    return kmax, kmin


def ref_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_attention(Q, k, v, slots):
    """Exact attention of Q [G, D] on the listed slots only -> [G, D]."""
    out = np.zeros((Q.shape[0], v.shape[-1]))
    for g in range(Q.shape[0]):
        p = ref_softmax(np.array([Q[g] @ k[c] for c in slots]) / math.sqrt(Q.shape[1]))
        out[g] = p @ v[slots]
    return out


def ref_stage2(Q, k, pos, length, vis, page, r, k_top):
    """docs/algorithm.md stage 2 for one (row, KV head): channels, page scores [G, P],
    s_hat [G, C], group-mean scores [C] and the selected slots."""
    G, Dh = Q.shape
    C = k.shape[0]
    s = np.sign(Q.sum(0))
    ch = np.argsort(-np.abs(Q).mean(0), kind="stable")[:r]
    kmax, kmin = ref_page_bounds(k, pos, page)
    approx = np.full((G, C // page), -np.inf)
    for p in range(C // page):
        if p * page < length:
            k_hat = np.array([kmax[p, i] if s[i] > 0 else -kmin[p, i] for i in ch])
            approx[:, p] = (Q[:, ch] * s[ch]) @ k_hat
    scale = np.sqrt(Dh * np.abs(Q[:, ch]).sum(1) / np.abs(Q).sum(1))
    s_hat = np.zeros((G, C))
    for g in range(G):
        s_hat[g, vis] = ref_softmax(np.array([approx[g, c // page] for c in vis]) / scale[g])
    score = s_hat.mean(0)
    sel = [vis[i] for i in np.argsort(-score[vis], kind="stable")[:k_top]]
    return ch, approx, s_hat, score, sel


def ref_quest(Q, k, pos, vis, page, n_pages):
    C = k.shape[0]
    kmax, kmin = ref_page_bounds(k, pos, page)
    pages = sorted({c // page for c in vis})
    bound = np.full(C // page, -np.inf)
    for p in pages:
        bound[p] = sum(max(Q[g, i] * kmax[p, i], Q[g, i] * kmin[p, i])
                       for g in range(Q.shape[0]) for i in range(Q.shape[1]))
    chosen = [pages[i] for i in np.argsort(-bound[pages], kind="stable")[:n_pages]]
    return bound, chosen, [c for c in vis if c // page in chosen]


def ref_sparq(Q, k, v, vis, r, k_top, selected):
    """SparQ: channels by sum_g |q|, approximate softmax with SparQ's scale, group-mean
    top-k; output for a given selection (alpha-mixed with the mean of V)."""
    G, Dh = Q.shape
    ch = np.argsort(-np.abs(Q).sum(0), kind="stable")[:r]
    s_hat = np.zeros((G, k.shape[0]))
    for g in range(G):
        scale = math.sqrt(Dh * np.abs(Q[g, ch]).sum() / np.abs(Q[g]).sum())
        s_hat[g, vis] = ref_softmax(np.array([Q[g, ch] @ k[c, ch] for c in vis]) / scale)
    score = s_hat.mean(0)
    sel = [vis[i] for i in np.argsort(-score[vis], kind="stable")[:k_top]]
    alpha = s_hat[:, selected].sum(1)
    attn = ref_attention(Q, k, v, selected)
    v_mean = v[vis].mean(0)
    out = alpha[:, None] * attn + (1 - alpha[:, None]) * v_mean[None]
    return ch, score, sel, alpha, out


def ref_topk(Q, k, vis, k_top):
    score = np.zeros(k.shape[0])
    for g in range(Q.shape[0]):
        score[vis] += ref_softmax(np.array([Q[g] @ k[c] for c in vis]) / math.sqrt(Q.shape[1]))
    return score, [vis[i] for i in np.argsort(-score[vis], kind="stable")[:k_top]]


def assert_same_selection(got, want, scores, rtol=1e-4):
    """Same index sets, except that near-ties at the cut (f32 vs f64) may swap."""
    got, want = set(got), set(want)
    assert len(got) == len(want)
    if got == want:
        return
    cut = min(scores[i] for i in want)
    for i in got ^ want:
        assert abs(scores[i] - cut) <= rtol * abs(cut) + 1e-7, (sorted(got ^ want), cut)


# ----------------------------------------------------------------- cases
T, N = 64, 8
PLANS = {
    # name: (method, budget, overrides). Derived at T=64, N=8, D=16: see the asserts.
    "hybrid": ("hybrid", 16, {}),  # c2 = 72/16 = 4.5 -> page 3, r = int(16*3/4.5) = 10
    "hybrid-p4": ("hybrid", 16, {"page_size": 4, "top_r": 5}),
    "rocketkv": ("rocketkv", 16, {"window": 8}),  # capacity 43, page 2, r 11
    "quest": ("quest", 32, {}),  # 2 pages of 16
    "quest-p4": ("quest", 16, {"page_size": 4}),  # 4 pages of 4
    "sparq": ("sparq", 16, {}),  # r = int(16*16/144) = 1
    "sparq-r6": ("sparq", 16, {"top_r": 6}),
    "topk": ("topk", 16, {}),
}
RESOLVED = {
    "hybrid": dict(page_size=3, top_r=10, k_top=8),
    "hybrid-p4": dict(page_size=4, top_r=5, k_top=8),
    "rocketkv": dict(page_size=2, top_r=11, k_top=8, prompt_budget=35),
    "quest": dict(page_size=16, num_pages=2),
    "quest-p4": dict(page_size=4, num_pages=4),
    "sparq": dict(top_r=1, k_top=8),
    "sparq-r6": dict(top_r=6, k_top=8),
    "topk": dict(k_top=8),
}
CASES = [
    # (plan key, G, dtype, sliding_window)
    ("hybrid", 1, jnp.float32, None),
    ("hybrid", 4, jnp.bfloat16, None),
    ("hybrid-p4", 3, jnp.float32, 20),
    ("hybrid-p4", 8, jnp.float32, None),
    ("rocketkv", 3, jnp.float32, None),
    ("rocketkv", 8, jnp.bfloat16, 24),
    ("quest", 1, jnp.float32, None),
    ("quest", 3, jnp.bfloat16, None),
    ("quest-p4", 4, jnp.float32, None),
    ("quest-p4", 8, jnp.float32, 20),
    ("sparq", 3, jnp.float32, None),
    ("sparq-r6", 1, jnp.float32, 20),
    ("sparq-r6", 4, jnp.bfloat16, None),
    ("sparq-r6", 8, jnp.float32, None),
    ("topk", 1, jnp.bfloat16, None),
    ("topk", 3, jnp.float32, 20),
    ("topk", 4, jnp.float32, None),
    ("topk", 8, jnp.float32, None),
]


def jitted(fn, **static):
    """fn with its static keyword arguments bound, compiled once (eager op-by-op dispatch
    compiles every primitive separately and is several times slower here)."""
    return jax.jit(functools.partial(fn, **static))


def attend(plan, q, cache, qpos, window):
    return jax.jit(plan.attend, static_argnums=3)(q, cache, qpos, window)


def make_plan(key, G):
    name, budget, over = PLANS[key]
    if "stage2" in method_hparams(name):  # these shapes are too small to pay: force sparse
        over = {**over, "stage2": "on"}
    plan = make_method(name, budget, **over).plan(config(G), T, N)
    for field, want in RESOLVED[key].items():
        assert getattr(plan, field) == want, (key, field, plan.describe())
    return plan


@pytest.mark.parametrize(("key", "G", "dtype", "window"), CASES)
def test_sparse_decode_matches_numpy(key, G, dtype, window):
    plan = make_plan(key, G)
    lengths = np.array([T, T - 13])
    cache, q, qpos, (ck, cv, cpos, clen) = build(plan, sum(map(ord, key)) + G, G, T, lengths,
                                                 6, dtype)
    B, C = len(lengths), ck.shape[2]
    q64 = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
    qpos_np = np.asarray(qpos)
    visible = np.zeros((B, K, C), bool)
    for b in range(B):
        for kv in range(K):
            visible[b, kv, ref_visible(cpos[b, kv], qpos_np[b], window)] = True
    out = np.asarray(jnp.asarray(attend(plan, q, cache, qpos, window), jnp.float32))
    assert np.isfinite(out).all()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    vis_j = jnp.asarray(visible)

    if isinstance(plan, TwoStagePlan):
        page = plan.page_size
        if plan.cache_page_size:  # page metadata stays exact through appends
            kmax_j, kmin_j = page_bounds(cache.k, cache.pos, page, channel_major=True)
            np.testing.assert_array_equal(np.asarray(cache.page_max), np.asarray(kmax_j))
            np.testing.assert_array_equal(np.asarray(cache.page_min), np.asarray(kmin_j))
        idx, s_hat = jitted(hybrid_select, page_size=page, top_r=plan.top_r,
                            k_top=plan.k_top)(q, cache, vis_j)
        qg = group_queries(q, K)
        channels = np.asarray(select_channels(qg, plan.top_r))
        ref_ch = np.zeros((B, K, plan.top_r), np.int32)
        for b in range(B):
            for kv in range(K):
                Q = q64[b, kv * G:(kv + 1) * G]
                vis = ref_visible(cpos[b, kv], qpos_np[b], window)
                ch, approx, ref_s_hat, score, sel = ref_stage2(
                    Q, ck[b, kv], cpos[b, kv], clen[b], vis, page, plan.top_r, plan.k_top)
                ref_ch[b, kv] = ch
                assert_same_selection(channels[b, kv], ch, np.abs(Q).mean(0))
                if plan.cache_page_size:
                    kmax, kmin = ref_page_bounds(ck[b, kv], cpos[b, kv], page)
                    np.testing.assert_array_equal(  # channel-major: [D, P]
                        np.asarray(cache.page_max[b, kv], np.float64), kmax.T)
                    np.testing.assert_array_equal(
                        np.asarray(cache.page_min[b, kv], np.float64), kmin.T)
                got_s = np.asarray(s_hat[b, kv], np.float64)
                if set(channels[b, kv]) == set(ch):
                    np.testing.assert_allclose(got_s, ref_s_hat, rtol=1e-4, atol=1e-6)
                got = np.asarray(idx[b, kv])
                assert (got == -1).sum() == plan.k_top - min(plan.k_top, len(vis))
                assert_same_selection(got[got >= 0], sel, score)
                np.testing.assert_allclose(
                    out[b, kv * G:(kv + 1) * G],
                    ref_attention(Q, ck[b, kv], cv[b, kv], got[got >= 0]), **tol)
        # approximate page scores with the reference's channels
        bounds = ((cache.page_max, cache.page_min) if plan.cache_page_size
                  else (cache.k, cache.k))
        approx_j = np.asarray(jitted(approx_scores, page_size=page,
                                     channel_major=bool(plan.cache_page_size))(
            qg, *bounds, jnp.asarray(ref_ch), cache.length))
        for b in range(B):
            for kv in range(K):
                Q = q64[b, kv * G:(kv + 1) * G]
                vis = ref_visible(cpos[b, kv], qpos_np[b], window)
                _, approx, *_ = ref_stage2(Q, ck[b, kv], cpos[b, kv], clen[b], vis, page,
                                           plan.top_r, plan.k_top)
                np.testing.assert_allclose(approx_j[b, kv], approx, rtol=1e-5, atol=1e-5)
                assert not np.isnan(approx_j[b, kv]).any()

    elif isinstance(plan, QuestPlan):
        kmax_j, kmin_j = page_bounds(cache.k, cache.pos, plan.page_size)
        np.testing.assert_array_equal(np.asarray(cache.page_max), np.asarray(kmax_j))
        idx, page_scores = jitted(quest_select, page_size=plan.page_size,
                                  num_pages=plan.num_pages)(q, cache, vis_j)
        for b in range(B):
            for kv in range(K):
                Q = q64[b, kv * G:(kv + 1) * G]
                vis = ref_visible(cpos[b, kv], qpos_np[b], window)
                kmax, kmin = ref_page_bounds(ck[b, kv], cpos[b, kv], plan.page_size)
                np.testing.assert_array_equal(np.asarray(cache.page_min[b, kv], np.float64),
                                              kmin)
                bound, chosen, slots = ref_quest(Q, ck[b, kv], cpos[b, kv], vis,
                                                 plan.page_size, plan.num_pages)
                np.testing.assert_allclose(np.asarray(page_scores[b, kv]), bound, rtol=1e-5,
                                           atol=1e-4)
                got = np.asarray(idx[b, kv])
                got_pages = {c // plan.page_size for c in got[got >= 0]}
                assert_same_selection(got_pages, chosen, bound)
                if got_pages == set(chosen):
                    assert sorted(got[got >= 0]) == slots
                np.testing.assert_allclose(
                    out[b, kv * G:(kv + 1) * G],
                    ref_attention(Q, ck[b, kv], cv[b, kv], sorted(got[got >= 0])), **tol)

    elif isinstance(plan, SparQPlan):
        out_j, idx, alpha = jitted(sparq_attend, top_r=plan.top_r, k_top=plan.k_top)(
            q, cache, vis_j)
        channels = np.asarray(select_channels(group_queries(q, K), plan.top_r))
        for b in range(B):
            for kv in range(K):
                Q = q64[b, kv * G:(kv + 1) * G]
                vis = ref_visible(cpos[b, kv], qpos_np[b], window)
                got = np.asarray(idx[b, kv])
                got = sorted(got[got >= 0])
                ch, score, sel, ref_alpha, ref_out = ref_sparq(
                    Q, ck[b, kv], cv[b, kv], vis, plan.top_r, plan.k_top, got)
                assert_same_selection(channels[b, kv], ch, np.abs(Q).sum(0))
                assert_same_selection(got, sel, score)
                np.testing.assert_allclose(np.asarray(alpha[b, kv]), ref_alpha, rtol=1e-4,
                                           atol=1e-5)
                assert (0 < ref_alpha).all() and (ref_alpha <= 1 + 1e-9).all()
                np.testing.assert_allclose(out[b, kv * G:(kv + 1) * G], ref_out, **tol)

    else:
        assert isinstance(plan, TopKPlan)
        idx = jitted(topk_select, k_top=plan.k_top)(q, cache, vis_j)
        for b in range(B):
            for kv in range(K):
                Q = q64[b, kv * G:(kv + 1) * G]
                vis = ref_visible(cpos[b, kv], qpos_np[b], window)
                score, sel = ref_topk(Q, ck[b, kv], vis, plan.k_top)
                got = np.asarray(idx[b, kv])
                assert_same_selection(got[got >= 0], sel, score)
                np.testing.assert_allclose(
                    out[b, kv * G:(kv + 1) * G],
                    ref_attention(Q, ck[b, kv], cv[b, kv], sorted(got[got >= 0])), **tol)


@pytest.mark.parametrize("key", ["hybrid", "hybrid-p4", "rocketkv", "quest-p4", "sparq-r6",
                                 "topk"])
@pytest.mark.parametrize("G", [1, 4])
def test_sparse_path_equals_full_when_budget_covers_context(key, G):
    """Static M < L, but these rows hold fewer visible tokens than the budget attends:
    the sparse path must give exactly dense attention (f32 tolerance)."""
    plan = make_plan(key, G)
    lengths = np.array([5, 2])  # + 2 appended -> 7 and 4 <= k_top = 8 (quest: 4 pages of 4)
    cache, q, qpos, (ck, cv, cpos, _) = build(plan, 11, G, T, lengths, 2, jnp.float32)
    out = np.asarray(attend(plan, q, cache, qpos, None))
    q64 = np.asarray(q, np.float64)
    for b in range(len(lengths)):
        for kv in range(K):
            vis = ref_visible(cpos[b, kv], int(qpos[b]), None)
            want = ref_attention(q64[b, kv * G:(kv + 1) * G], ck[b, kv], cv[b, kv], vis)
            np.testing.assert_allclose(out[b, kv * G:(kv + 1) * G], want, rtol=1e-5,
                                       atol=1e-6)


def test_page_metadata_tracks_appends_across_pages():
    """Appends that fill a partial page and open new ones keep max/min exact."""
    plan = make_method("quest", 8, page_size=4).plan(config(2), 10, 12)
    cache, *_ = build(plan, 5, 2, 10, np.array([10, 3]), 11, jnp.bfloat16)
    assert int(cache.length[0]) == 21 and int(cache.length[1]) == 14
    kmax, kmin = page_bounds(cache.k, cache.pos, 4)
    np.testing.assert_array_equal(np.asarray(cache.page_max), np.asarray(kmax))
    np.testing.assert_array_equal(np.asarray(cache.page_min), np.asarray(kmin))
    assert np.isneginf(np.asarray(cache.page_max[0, :, 6:], np.float32)).all()


@pytest.mark.parametrize("key", list(PLANS))
def test_select_contract_and_shared_attend(key):
    """Every sparse plan's `select` gives slot indices [B, K, M] int32, each a distinct
    visible slot or -1; where `attend` is the shared one it is exactly `attend_selected` on
    that selection, and SparQ's own attend uses the same selection."""
    G, window = 3, 20
    plan = make_plan(key, G)
    assert isinstance(plan, SelectsSlots)
    cache, q, qpos, _ = build(plan, 7, G, T, np.array([T, T - 21]), 5, jnp.float32)
    visible = jax.jit(visible_slots, static_argnums=2)(cache, qpos, window)
    idx = np.asarray(jax.jit(plan.select)(q, cache, visible))
    B, C = q.shape[0], cache.k.shape[2]
    assert idx.dtype == np.int32 and idx.shape[:2] == (B, K)
    vis = np.asarray(visible)
    for b in range(B):
        for kv in range(K):
            got = idx[b, kv][idx[b, kv] >= 0]
            assert ((idx[b, kv] >= -1) & (idx[b, kv] < C)).all()
            assert len(set(got)) == len(got) and vis[b, kv, got].all()
            assert len(got) == min(idx.shape[2], vis[b, kv].sum())
    out = np.asarray(attend(plan, q, cache, qpos, window))
    if isinstance(plan, SparQPlan):
        _, sparq_idx, _ = jitted(sparq_attend, top_r=plan.top_r, k_top=plan.k_top)(
            q, cache, visible)
        np.testing.assert_array_equal(np.asarray(sparq_idx), idx)
    else:
        shared = jitted(attend_selected, kernels=plan.kernels)(q, cache, jnp.asarray(idx))
        np.testing.assert_array_equal(out, np.asarray(shared))


@pytest.mark.parametrize("key,dtype", [("sparq", jnp.float32), ("sparq-r6", jnp.bfloat16),
                                       ("hybrid", jnp.float32)])
def test_attend_on_a_stacked_cache_equals_attend_on_the_layer(key, dtype):
    """`attend_layer` on layer i of a stacked cache (a traced index, what the decode step
    runs) gives what `attend` gives on layer i's own cache; SparQ reads mean(V) from the
    stack where it lies (`attend_stacked`)."""
    G, window = 3, 20
    plan = make_plan(key, G)
    lengths = np.array([T, T - 21])
    layers = [build(plan, 40 + i, G, T, lengths, 5, dtype) for i in range(3)]
    stack = jax.tree.map(lambda *a: jnp.stack(a), *[c for c, *_ in layers])
    q, qpos = layers[0][1], layers[0][2]
    stacked = jax.jit(lambda s, i: attend_layer(plan, q, s, i, qpos, window))
    for i, (cache, *_) in enumerate(layers):
        want = np.asarray(attend(plan, q, cache, qpos, window).astype(jnp.float32))
        got = np.asarray(stacked(stack, jnp.int32(i)).astype(jnp.float32))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_sparq_step_writes_no_masked_copy_of_the_values():
    """SparQ's mean(V) reads each layer's values blockwise (`masked_mean`): the compiled
    decode step computes no f32 array of a whole layer's cache shape (the one-shot
    where(visible, v, 0).sum() wrote one every step, then read it again)."""
    cfg = dataclasses.replace(config(4), num_layers=2)
    plan = make_method("sparq", 16, stage2="on").plan(cfg, 4000, 96)
    assert isinstance(plan, SparQPlan)
    B, C = 2, plan.capacity
    params = random_params(cfg)
    tokens = jax.ShapeDtypeStruct((B, 4000), jnp.int32)
    rows = jax.ShapeDtypeStruct((B,), jnp.int32)
    _, cache = jax.eval_shape(make_prefill(cfg, plan), params, tokens, rows)
    hlo = make_decode_step(cfg, plan).lower(params, rows, rows, cache).compile().as_text()
    whole = f"= f32[{B},{K},{C},{D}]"
    assert not [line for line in hlo.splitlines() if whole in line and " fusion(" in line]

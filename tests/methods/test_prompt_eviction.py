"""Stage-1 prompt eviction (snapkv, snapkv++) and streaming, pinned to numpy loops written
from docs/algorithm.md, not to the jnp code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.cache import append_token
from rocketkv_jax.methods import (
    DensePlan,
    PromptEvictionPlan,
    StreamingPlan,
    make_method,
)
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.llama import window_queries

D = 16
K = 2


def config(G: int, sliding_window=None) -> ModelConfig:
    return ModelConfig(
        model_type="mistral" if sliding_window else "llama", vocab_size=32, hidden_size=32,
        intermediate_size=64, num_layers=1, num_heads=K * G, num_kv_heads=K, head_dim=D,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        tie_word_embeddings=True, sliding_window=sliding_window,
    )


def random_prompt(seed, B, G, T, dtype):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, K, T, D)) * 1.5
    v = rng.standard_normal((B, K, T, D))
    q = rng.standard_normal((B, K * G, T, D)) * 1.5
    # Through the storage dtype, so the reference sees exactly what the jnp code sees.
    k, v, q = (jnp.asarray(x, dtype) for x in (k, v, q))
    return k, v, q, *(np.asarray(x.astype(jnp.float32), np.float64) for x in (k, v, q))


# ----------------------------------------------------------------- numpy reference
def ref_pool_kernel(kernel_size, T, window):
    """docs/algorithm.md: clamp to the scored span (T - window), then odd, at least 1."""
    k = min(kernel_size, max(T - window, 1))
    return max(k - 1 if k % 2 == 0 else k, 1)


def ref_stage1(k, q, length, budget, window, kernel, pool, sliding_window=None):
    """One row: k [K, T, D], q [H, T, D] float64. Returns (keep per KV head, pooled scores
    per KV head) with plain loops: softmax of each window query over its causal keys,
    summed over window queries and the group, pooled (torch-style padding: -inf for max,
    zeros counted for avg), stable top-(budget - window), then the window. With a sliding
    window W, a query at p sees keys (p - W, p], and tokens t <= length - W rank last."""
    Kh, T, Dh = k.shape
    G = q.shape[0] // Kh
    if length <= budget:
        return [list(range(length))] * Kh, None
    span = length - window
    keeps, pooled_all = [], []
    for kv in range(Kh):
        score = np.zeros(span)
        for g in range(G):
            h = kv * G + g
            for j in range(window):
                qp = span + j
                first = 0 if sliding_window is None else max(0, qp - sliding_window + 1)
                seen = range(first, qp + 1)
                logits = np.array([q[h, qp] @ k[kv, t] for t in seen]) / math.sqrt(Dh)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                for t, pt in zip(seen, p, strict=True):
                    if t < span:
                        score[t] += pt
        pad = kernel // 2
        pooled = np.empty(span)
        for t in range(span):
            window_vals = []
            for i in range(t - pad, t + pad + 1):
                if 0 <= i < span:
                    window_vals.append(score[i])
                else:
                    window_vals.append(-np.inf if pool == "max" else 0.0)
            pooled[t] = max(window_vals) if pool == "max" else sum(window_vals) / kernel
            if sliding_window is not None and t <= length - sliding_window:
                pooled[t] = -1e300  # no later query can see it
        order = np.argsort(-pooled, kind="stable")[: budget - window]
        keeps.append(sorted(order.tolist()) + list(range(span, length)))
        pooled_all.append(pooled)
    return keeps, pooled_all


def assert_same_selection(got, want, scores, n, rtol=1e-4):
    """Same index sets, except that near-ties at the cut (f32 vs f64) may swap."""
    got, want = set(got), set(want)
    assert len(got) == len(want)
    if got == want:
        return
    cut = np.sort(scores)[::-1][n - 1]
    for i in got ^ want:
        assert abs(scores[i] - cut) <= rtol * abs(cut) + 1e-7, (sorted(got ^ want), cut)


# ----------------------------------------------------------------- snapkv / snapkv++
STAGE1_CASES = [
    # (method, G, T, window, budget, dtype)
    ("snapkv", 1, 64, 8, 24, jnp.float32),
    ("snapkv", 3, 48, 4, 16, jnp.float32),
    ("snapkv", 4, 64, 8, 8, jnp.float32),
    ("snapkv", 8, 40, 4, 12, jnp.bfloat16),
    ("snapkv++", 1, 48, 4, 16, jnp.float32),
    ("snapkv++", 3, 64, 8, 24, jnp.bfloat16),
    ("snapkv++", 4, 40, 8, 20, jnp.float32),
    ("snapkv++", 8, 64, 16, 20, jnp.float32),
]


@pytest.mark.parametrize(("name", "G", "T", "window", "budget", "dtype"), STAGE1_CASES)
def test_stage1_selection_matches_numpy(name, G, T, window, budget, dtype):
    check_stage1(name, G, T, window, budget, dtype)


@pytest.mark.parametrize(("name", "G", "sliding_window"), [
    ("snapkv", 1, 40), ("snapkv++", 3, 40), ("snapkv++", 2, 20)])
def test_stage1_with_a_sliding_window_matches_numpy(name, G, sliding_window):
    """Mistral: window queries score only keys inside their sliding window, and tokens no
    later query can see are kept only when nothing visible is left to keep."""
    check_stage1(name, G, 64, 8, 24, jnp.float32, sliding_window)


def check_stage1(name, G, T, window, budget, dtype, sliding_window=None):
    lengths = np.array([T, T - 7, budget + 1, max(budget - 3, 1)])
    B = len(lengths)
    k, v, q, k64, v64, q64 = random_prompt(G * 100 + T, B, G, T, dtype)
    N = 4
    plan = make_method(name, budget, window=window).plan(config(G, sliding_window), T, N)
    assert isinstance(plan, PromptEvictionPlan) and plan.sliding_window == sliding_window
    default_kernel = 7 if name == "snapkv" else 63
    kernel = ref_pool_kernel(default_kernel, T, window)
    assert plan.kernel_size == kernel
    assert plan.capacity % 16 == 0 and plan.capacity >= budget + N
    lengths_j = jnp.asarray(lengths, jnp.int32)
    q_obs, _ = window_queries(q, lengths_j, plan.query_window)  # what the model passes
    cache = jax.jit(plan.compress)(k, v, q_obs, lengths_j)
    pos = np.asarray(cache.pos)
    np.testing.assert_array_equal(np.asarray(cache.length), np.minimum(lengths, budget))
    pool = "avg" if name == "snapkv" else "max"
    for b, length in enumerate(lengths):
        keeps, pooled = ref_stage1(k64[b], q64[b], int(length), budget, window, kernel, pool,
                                   sliding_window)
        n_kept = min(int(length), budget)  # kept count = min(real length, budget)
        for kv in range(K):
            got = pos[b, kv, :n_kept].tolist()
            assert (pos[b, kv, n_kept:] == -1).all()
            assert got == sorted(got), "kept tokens are compacted in ascending order"
            if length <= budget:  # short prompts keep everything
                assert got == list(range(length))
                continue
            # the observation window is always kept, at the end
            assert got[-window:] == list(range(length - window, length))
            assert_same_selection(got[:-window], keeps[kv][:-window], pooled[kv],
                                  budget - window)
            # compacted keys/values are the original ones at the kept positions
            np.testing.assert_array_equal(
                np.asarray(cache.k[b, kv, :n_kept].astype(jnp.float32)), k64[b, kv, got])
            np.testing.assert_array_equal(
                np.asarray(cache.v[b, kv, :n_kept].astype(jnp.float32)), v64[b, kv, got])


def test_stage1_ties_go_to_lower_index():
    """Max pooling makes plateaus; with identical keys every score ties and the selection
    must be the lowest indices (lax.top_k order, the numpy reference's stable argsort)."""
    B, G, T, window, budget = 1, 2, 40, 4, 12
    k = jnp.ones((B, K, T, D))
    q = jnp.ones((B, K * G, T, D))
    plan = make_method("snapkv++", budget, window=window).plan(config(G), T, 2)
    n = jnp.array([T], jnp.int32)
    cache = plan.compress(k, k, window_queries(q, n, plan.query_window)[0], n)
    want = list(range(budget - window)) + list(range(T - window, T))
    for kv in range(K):
        assert np.asarray(cache.pos[0, kv, :budget]).tolist() == want


def test_stage1_short_static_prompt_keeps_all():
    G, T = 2, 20
    k, v, q, *_ = random_prompt(0, 2, G, T, jnp.float32)
    plan = make_method("snapkv++", 24, window=8).plan(config(G), T, 8)
    n = jnp.array([T, 11], jnp.int32)
    cache = plan.compress(k, v, window_queries(q, n, plan.query_window)[0], n)
    np.testing.assert_array_equal(np.asarray(cache.length), [T, 11])
    np.testing.assert_array_equal(np.asarray(cache.pos[1, 0, :12]), list(range(11)) + [-1])


def test_snapkv_budget_covering_sequence_is_dense():
    plan = make_method("snapkv", 64).plan(config(1), 40, 24)
    assert isinstance(plan, DensePlan) and plan.describe()["dense"]


# ----------------------------------------------------------------- streaming
@pytest.mark.parametrize("G", [1, 4])
def test_streaming_keeps_sinks_and_recent(G):
    T, budget, sinks, N = 48, 20, 4, 5
    lengths = np.array([T, 30, 15])
    k, v, q, k64, v64, q64 = random_prompt(7, len(lengths), G, T, jnp.float32)
    plan = make_method("streaming", budget).plan(config(G), T, N)
    assert isinstance(plan, StreamingPlan) and plan.sinks == sinks
    cache = jax.jit(plan.compress)(k, v, q, jnp.asarray(lengths, jnp.int32))
    for b, length in enumerate(lengths):
        want = (list(range(length)) if length <= budget
                else list(range(sinks)) + list(range(length - (budget - sinks), length)))
        for kv in range(K):
            assert np.asarray(cache.pos[b, kv, :len(want)]).tolist() == want
    # Decode: append N tokens; attention reads only sinks + the most recent M - 4.
    rng = np.random.default_rng(1)
    positions = lengths.copy()
    append = jax.jit(plan.append)
    for _ in range(N):
        kn = jnp.asarray(rng.standard_normal((len(lengths), K, D)), jnp.float32)
        vn = jnp.asarray(rng.standard_normal((len(lengths), K, D)), jnp.float32)
        cache = append(cache, kn, vn, jnp.asarray(positions, jnp.int32))
        positions += 1
    qd = rng.standard_normal((len(lengths), K * G, D))
    out = np.asarray(jax.jit(plan.attend, static_argnums=3)(
        jnp.asarray(qd, jnp.float32), cache, jnp.asarray(positions - 1, jnp.int32), None))
    ck, cv, cpos = (np.asarray(x, np.float64) for x in (cache.k, cache.v, cache.pos))
    for b in range(len(lengths)):
        filled = [c for c in range(ck.shape[2]) if cpos[b, 0, c] >= 0]
        attended = filled[:sinks] + filled[-(budget - sinks):]
        attended = sorted(set(attended))
        assert len(attended) == min(len(filled), budget)
        for h in range(K * G):
            kv = h // G
            logits = np.array([qd[b, h] @ ck[b, kv, c] for c in attended]) / math.sqrt(D)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            np.testing.assert_allclose(out[b, h], p @ cv[b, kv, attended], rtol=1e-5,
                                       atol=1e-5)


def test_streaming_respects_sliding_window():
    """Mistral's window still applies on top of sinks + recent."""
    G, T, budget = 1, 32, 16
    k, v, q, *_ = random_prompt(3, 1, G, T, jnp.float32)
    plan = make_method("streaming", budget).plan(config(G, sliding_window=8), T, 4)
    cache = plan.compress(k, v, q, jnp.array([T], jnp.int32))
    kn = jnp.ones((1, K, D))
    cache = append_token(cache, kn, kn, jnp.array([T], jnp.int32))
    qd = jnp.asarray(np.random.default_rng(0).standard_normal((1, K * G, D)), jnp.float32)
    out = plan.attend(qd, cache, jnp.array([T], jnp.int32), 8)
    # Only positions T-7 .. T are visible: the sinks (0..3) must not contribute, so the
    # result equals attention over the last 8 slots alone.
    ck, cv = np.asarray(cache.k), np.asarray(cache.v)
    logits = np.einsum("d,cd->c", np.asarray(qd[0, 0]), ck[0, 0, 9:17]) / math.sqrt(D)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    np.testing.assert_allclose(np.asarray(out[0, 0]), p @ cv[0, 0, 9:17], rtol=1e-5, atol=1e-6)
    assert not jnp.isnan(jax.device_get(out)).any()

"""Dense fallback by cost (`methods/cost.py`): where a method's selection would cost more
than dense attention over its own cache, the plan attends densely over that cache (stage 1
still evicts). The decision is pinned at a few real shapes, and the fallback is pinned to
a float64 numpy dense attention over the stage-1 cache."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.bench.roofline import llama31_8b_config
from rocketkv_jax.methods import DensePlan, MethodConfigError, TwoStagePlan, make_method
from rocketkv_jax.methods.cost import dense_bytes, fallback_note, mean_slots, stage2_bytes
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.llama import window_queries

SMOLLM2 = ModelConfig(  # SmolLM2-135M's attention shape: 9 heads on 3 KV heads, D = 64
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
)


def path(method, budget, config, T, N, **kw):
    """"sparse", or the reason the plan attends densely."""
    plan = make_method(method, budget, **kw).plan(config, T, N)
    if isinstance(plan, DensePlan):
        return plan.fallback
    return getattr(plan, "fallback", "") or "sparse"


# --------------------------------------------------------------- the decision, pinned
@pytest.mark.parametrize(("method", "budget", "T", "want"), [
    ("rocketkv", 4096, 4096, "cost"),  # measured 0.60x full KV before the fallback
    ("hybrid", 4096, 4096, "cost"),  # 0.57x
    ("sparq", 2048, 4096, "cost"),  # 0.74x
    ("hybrid", 1024, 4096, "cost"),  # 0.97x
    ("rocketkv", 256, 7936, "sparse"),  # 2.87x
    # 2.36x, from stage 1's eviction: stage 2 was estimated at 0.99 of dense attention over
    # the stage-1 cache, inside the model's margin (SPARSE_MARGIN), so it attends densely
    ("rocketkv", 512, 7936, "cost"),
    ("hybrid", 256, 7936, "sparse"),  # 2.12x
    ("quest", 256, 7936, "sparse"),  # 2.57x
    ("quest", 2048, 4096, "sparse"),  # 1.29x
])
def test_cost_model_decision_on_smollm2(method, budget, T, want):
    """docs/benchmarks.md's SmolLM2 decode grid (64 new tokens): the fallback is taken
    where the sparse step was measured slower than full KV, and not where it was faster."""
    assert path(method, budget, SMOLLM2, T, 64) == want


def test_cost_model_decision_on_llama_8b_shape():
    cfg = llama31_8b_config()  # D = 128, G = 4
    assert path("rocketkv", 256, cfg, 32768, 256) == "sparse"
    assert path("rocketkv", 4096, cfg, 32768, 256) == "cost"
    assert path("hybrid", 4096, cfg, 32768, 256) == "sparse"
    assert path("rocketkv", 4096, cfg, 4096, 256) == "cost"


@pytest.mark.parametrize(("config", "M", "T", "measured", "want"), [
    # SparQ's sparse path forced (--stage2 on) against full KV, batch 1 / 4 / 8
    ("llama8b", 256, 32768, "1.04 / 0.90 / -", "sparse"),
    ("llama8b", 256, 16384, "1.06 / 0.89 / 1.01", "sparse"),
    ("llama8b", 256, 8192, "1.01 / 1.02 / 0.98", "sparse"),
    ("smollm2", 256, 32768, "1.33 / - / -", "sparse"),
    ("smollm2", 256, 16384, "1.31 / 1.31 / -", "sparse"),
    # 1.22 / 1.41 / 1.42, but estimated at 0.94 of dense: R = 1 channel is half of a
    # bf16 key row's two lines (in the f32 run, a quarter of four)
    ("smollm2", 256, 8192, "1.22 / 1.41 / 1.42", "cost"),
    ("llama8b", 2048, 32768, "0.91 / 0.80 / -", "cost"),
    ("llama8b", 2048, 16384, "0.88 / 0.81 / 0.73", "cost"),
    ("llama8b", 2048, 8192, "0.87 / 0.80 / 0.72", "cost"),
    ("smollm2", 2048, 32768, "1.12 / - / -", "cost"),  # dense costs 11% here
    ("smollm2", 2048, 16384, "0.90 / 0.77 / -", "cost"),
    ("smollm2", 2048, 8192, "0.80 / 0.62 / 0.61", "cost"),
])
def test_sparq_decision_in_the_batched_grid(config, M, T, measured, want):
    """docs/benchmarks/decode-batched-sparq.md (256 new tokens, A/A 0.94-1.04): every cell
    whose sparse step ran more than 5% slower than full KV at batch 1 and 8 attends densely.
    Its R key channels lie on memory lines, so a few channels of every row cost their lines
    (cost.key_channel_bytes), not their bytes; at M = 2048 that is most of the key."""
    cfg = (dataclasses.replace(SMOLLM2, max_position_embeddings=33024) if config == "smollm2"
           else llama31_8b_config(2, 8192))
    assert path("sparq", M, cfg, T, 256) == want


def test_key_channels_cost_at_least_their_lines():
    from rocketkv_jax.methods.cost import LINE_BYTES, REFERENCE_CONSTANTS, key_channel_bytes
    c = REFERENCE_CONSTANTS  # bf16 rows: D = 128 is 256 bytes, four 64-byte lines
    assert key_channel_bytes(1, 128, c) == LINE_BYTES == 64  # 1 x 2 x 5 = 10 bytes < a line
    assert key_channel_bytes(4, 128, c) == 4 * 64  # the whole row
    assert key_channel_bytes(32, 128, c) == 32 * 2 * 5  # above the row: the measured rate


def test_stage2_on_and_off_override_the_cost_model():
    assert path("rocketkv", 4096, SMOLLM2, 4096, 64, stage2="on") == "sparse"
    assert path("rocketkv", 256, SMOLLM2, 7936, 64, stage2="off") == "off"
    assert path("quest", 256, SMOLLM2, 7936, 64, stage2="off") == "off"
    assert path("sparq", 2048, SMOLLM2, 4096, 64, stage2="on") == "sparse"


def test_cost_model_numbers():
    """The model's arithmetic on one shape, by hand (cost.py's formulas)."""
    slots = mean_slots(1000, 64)
    assert slots == 1032
    assert dense_bytes(slots, 64) == 1032 * 2 * 64 * 2
    # pages 258 x 8 channels x 2 B x 5 + 1032 x (3 x 4 + 24) + 100 x (256 x 3 + 4)
    assert stage2_bytes(slots, 64, 3, 4, 8, 100) == 258 * 8 * 2 * 5 + 1032 * 36 + 100 * 772
    # page 1 reads R channels of each key row: 2 channels of a 128-byte row touch 2 lines
    assert stage2_bytes(slots, 64, 3, 1, 2, 100) == 1032 * 128 + 1032 * 36 + 100 * 772


def test_rocketkv_fallback_keeps_stage_one():
    auto = make_method("rocketkv", 4096).plan(SMOLLM2, 4096, 64)
    on = make_method("rocketkv", 4096, stage2="on").plan(SMOLLM2, 4096, 64)
    assert isinstance(auto, TwoStagePlan) and auto.stage2_dense and auto.fallback == "cost"
    assert (auto.capacity, auto.prompt_budget) == (on.capacity, on.prompt_budget)
    assert auto.prompt_budget < 4096  # stage 1 still evicts
    assert auto.cache_page_size == 0  # no page metadata for a stage 2 that never runs
    assert auto.describe()["stage2_path"] == "dense" and on.describe()["stage2_path"] == "sparse"
    assert "stage-1 cache" in fallback_note(auto) and fallback_note(on) == ""
    sparq = make_method("sparq", 2048).plan(SMOLLM2, 4096, 64)
    assert isinstance(sparq, DensePlan) and sparq.fallback == "cost"
    assert sparq.read_tokens(4160) == 4160


@pytest.mark.parametrize("method", ["rocketkv", "hybrid", "quest", "sparq"])
def test_stage2_is_validated(method):
    with pytest.raises(MethodConfigError, match="stage2 must be one of 'auto', 'on', 'off'"):
        make_method(method, 64, stage2="sometimes")


# ------------------------------------------------- the fallback is exact dense attention
D, K = 16, 2


def tiny(G):
    return ModelConfig(
        model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64,
        num_layers=1, num_heads=K * G, num_kv_heads=K, head_dim=D, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
    )


def numpy_dense(q, k, v, pos, qpos):
    """float64 attention of q [B, H, D] over every slot with 0 <= pos <= qpos."""
    B, H, _ = q.shape
    G = H // K
    out = np.zeros((B, H, D))
    for b in range(B):
        for h in range(H):
            kv = h // G
            slots = [c for c in range(k.shape[2]) if 0 <= pos[b, kv, c] <= qpos[b]]
            logits = np.array([q[b, h] @ k[b, kv, c] for c in slots]) / math.sqrt(D)
            p = np.exp(logits - logits.max())
            out[b, h] = (p / p.sum()) @ v[b, kv, slots]
    return out


@pytest.mark.parametrize(("method", "kw"), [
    ("rocketkv", {"window": 8}), ("hybrid", {}), ("quest", {"page_size": 4}), ("sparq", {}),
])
@pytest.mark.parametrize(("G", "dtype"), [(1, jnp.float32), (3, jnp.bfloat16),
                                          (4, jnp.float32), (8, jnp.float32)])
def test_fallback_equals_dense_attention_over_the_same_cache(method, kw, G, dtype):
    T, N, budget = 64, 8, 16
    fallback = make_method(method, budget, stage2="off", **kw).plan(tiny(G), T, N)
    sparse = make_method(method, budget, stage2="on", **kw).plan(tiny(G), T, N)
    assert not getattr(sparse, "stage2_dense", False) and not isinstance(sparse, DensePlan)
    rng = np.random.default_rng(G)

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 1.5, dtype)

    lengths = jnp.asarray([T, T - 13], jnp.int32)
    k, v = rand(2, K, T, D), rand(2, K, T, D)
    q_obs, _ = window_queries(rand(2, K * G, T, D), lengths, sparse.query_window)
    caches = [jax.jit(p.compress)(k, v, q_obs, lengths) for p in (fallback, sparse)]
    # stage 1 evicts the same tokens with and without stage 2
    for field in ("k", "v", "pos", "length"):
        np.testing.assert_array_equal(np.asarray(getattr(caches[0], field), np.float32),
                                      np.asarray(getattr(caches[1], field), np.float32))
    cache = caches[0]
    qpos = np.asarray(cache.pos).max(axis=(1, 2)) + 1
    for i in range(3):  # appends keep working on the fallback's cache
        cache = jax.jit(fallback.append)(cache, rand(2, K, D), rand(2, K, D),
                                         jnp.asarray(qpos + i, jnp.int32))
    q = rand(2, K * G, D)
    qpos = jnp.asarray(qpos + 2, jnp.int32)
    out = jax.jit(fallback.attend, static_argnums=3)(q, cache, qpos, None)
    ref = DensePlan("ref", fallback.capacity, T, budget)
    dense = jax.jit(ref.attend, static_argnums=3)(q, cache, qpos, None)
    out = np.asarray(jnp.asarray(out, jnp.float32))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, np.asarray(jnp.asarray(dense, jnp.float32)))
    f64 = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, cache.k, cache.v)]
    want = numpy_dense(*f64, np.asarray(cache.pos), np.asarray(qpos))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(out, want, **tol)


def test_stats_line_says_which_path_runs():
    from rocketkv_jax.engine.generate import GenerateStats, method_stats

    def line(method, T, N):
        fields = method_stats(method, method.plan(SMOLLM2, T, N), T, N)
        return GenerateStats(prompt_tokens=T, generated_tokens=N, compile_s=0.0, prefill_s=1.0,
                             decode_s=1.0, kv_cache_bytes=0, batch=1, prompt_bucket=T,
                             **fields).summary()

    assert ("method: rocketkv (budget 4096; dense over its stage-1 cache: the selection "
            "would cost more than dense attention) |") in line(make_method("rocketkv", 4096),
                                                               4096, 64)
    assert "method: sparq (budget 2048; dense over its cache" in line(
        make_method("sparq", 2048), 4096, 64)
    assert "method: hybrid (budget 256; dense over its cache: stage2 off) |" in line(
        make_method("hybrid", 256, stage2="off"), 7936, 64)
    assert "method: rocketkv (budget 256) |" in line(make_method("rocketkv", 256), 7936, 64)
    assert "budget 8192 >= sequence" in line(make_method("rocketkv", 8192), 4096, 64)

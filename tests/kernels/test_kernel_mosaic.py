"""The Mosaic GPU kernels in JAX's Mosaic GPU interpreter (CPU) == their jnp references.

Every run has race detection on (none may be recorded; JAX 0.12 also raises on one) and
leaves the interpreter's uninitialized memory as NaN, so outputs start NaN-poisoned: an
element the kernel does not write stays NaN and fails the comparison (a control kernel
shows that it does). The interpreter is slow (about 0.5 s per program), so the cases are
few and small and each covers several things: GQA 1/3/4/7/8, head dims 64/128, pages
1/8/16/32, ragged lengths and budgets, f32 and bf16. Needs JAX >= 0.11.2 (skipped with the
reason elsewhere).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import TOLERANCES, channel_sets, distinct_indices, page_metadata, random_normal

from rocketkv_jax.kernels.backend import MOSAIC_MIN_JAX, mosaic_jax_ok

if not mosaic_jax_ok():
    pytest.skip(f"the Mosaic GPU kernels and interpreter need JAX >= "
                f"{'.'.join(map(str, MOSAIC_MIN_JAX))}, this is {jax.__version__}",
                allow_module_level=True)

from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
from jax.experimental.pallas import mosaic_gpu as plgpu

from rocketkv_jax.kernels import (
    approx_scores_mosaic,
    approx_scores_reference,
    sparse_decode_attention_mosaic,
    sparse_decode_attention_reference,
)
from rocketkv_jax.kernels.sparse_decode_attention_mgpu import _call, make_plan

PARAMS = plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")


def races_found() -> bool:
    """Whether the interpreter recorded a race since its state was last reset."""
    try:
        return mgpu_interpret.get_races().races_found
    except AssertionError:  # no kernel interpreted since the reset
        return False


@pytest.fixture(autouse=True)
def fresh_interpreter():
    """Each test starts with clean interpreter state and ends with no race recorded."""
    mgpu_interpret.reset_gpu_interpret_mode_state()
    yield
    assert not races_found()


def assert_close(actual, desired, dtype):
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape
    assert not np.isnan(actual).any(), "an output element was not written (still NaN)"
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(desired))
    finite = np.isfinite(desired)
    rtol, atol = TOLERANCES[jnp.dtype(dtype).name]
    np.testing.assert_allclose(actual[finite], desired[finite], rtol=rtol, atol=atol)


# ------------------------------------------------------------------ sparse decode attention
# (B, K, G, D, C, M, lengths, -1 entries, num_splits, dtype)
ATTENTION_CASES = [
    (2, 1, 1, 64, 128, 70, [128, 40], 0, 2, jnp.float32),  # G=1, 2 splits, ragged rows
    (1, 2, 3, 128, 256, 64, [256], 5, 1, jnp.bfloat16),  # G=3, D=128, -1 slots
    (1, 1, 4, 64, 300, 200, [300], 0, 1, jnp.bfloat16),  # 4 blocks over 3 SMEM stages
    (1, 1, 7, 128, 96, 50, [96], 3, 1, jnp.float32),  # G=7, M < one block
    (2, 1, 8, 64, 64, 64, [64, 10], 2, 1, jnp.bfloat16),  # G=8, a short row: mostly -1
]


def attention_inputs(case, seed=0):
    b, kv, g, d, c, m, lengths, invalid, _, dtype = case
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(random_normal(rng, s), dtype)
               for s in ((b, kv, g, d), (b, kv, c, d), (b, kv, c, d)))
    idx = distinct_indices(rng, b, kv, c, m, np.asarray(lengths), invalid)
    return q, k, v, jnp.asarray(idx)


def attention_id(case):
    return f"G{case[2]}-D{case[3]}-M{case[5]}-{jnp.dtype(case[9]).name}"


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=attention_id)
def test_sparse_decode_attention_matches_reference(case):
    q, k, v, idx = attention_inputs(case)
    out = sparse_decode_attention_mosaic(q, k, v, idx, num_splits=case[8], interpret=PARAMS)
    assert out.dtype == q.dtype
    assert_close(out, sparse_decode_attention_reference(q, k, v, idx), q.dtype)


def test_sparse_decode_attention_every_partial_is_written():
    """The kernel's own outputs (o, max, sum per split), NaN until written, hold no NaN."""
    case = ATTENTION_CASES[0]
    q, k, v, idx = attention_inputs(case)
    plan = make_plan(q, k, idx, sm_scale=None, block_k=64, num_splits=2, num_stages=None)
    q_rows = jnp.pad(q, ((0, 0), (0, 0), (0, 64 - q.shape[2]), (0, 0)))
    hi = q_rows.astype(jnp.bfloat16)
    q_parts = jnp.stack([hi, (q_rows - hi.astype(jnp.float32)).astype(jnp.bfloat16)], axis=2)
    idx_pad = jnp.pad(idx, ((0, 0), (0, 0), (0, plan.splits * plan.chunk - idx.shape[-1])),
                      constant_values=-1)
    o, ml = _call(q_parts, idx_pad, k, v, plan=plan, interpret=PARAMS)
    assert plan.splits == 2 and plan.parts == 2
    assert not np.isnan(np.asarray(o)).any() and not np.isnan(np.asarray(ml)).any()


def test_sparse_decode_attention_empty_rows_invalid_slots_and_scale():
    case = ATTENTION_CASES[1]
    q, k, v, idx = attention_inputs(case, seed=1)
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    idx = idx.at[0, 1].set(-1)  # a KV head with no token at all
    idx = idx.at[0, 0, :7].set(-5).at[0, 0, 7:9].set(10**6)  # other invalid slots
    out = sparse_decode_attention_mosaic(q, k, v, idx, sm_scale=0.3, interpret=PARAMS)
    np.testing.assert_array_equal(np.asarray(out[0, 1]), 0.0)
    assert_close(out, sparse_decode_attention_reference(q, k, v, idx, sm_scale=0.3),
                 jnp.float32)


def test_sparse_decode_attention_jit_and_vmap():
    """A vmap adds a grid axis (the grid is (B*K, splits)); bf16 queries over an f32 cache
    compute in f32."""
    case = (1, 1, 4, 64, 96, 40, [96], 0, 1, jnp.float32)
    stacked = [attention_inputs(case, seed=s) for s in (0, 1)]
    args = [jnp.stack(xs) for xs in zip(*stacked, strict=True)]
    args[0] = args[0].astype(jnp.bfloat16)
    out = jax.jit(jax.vmap(lambda *a: sparse_decode_attention_mosaic(*a, interpret=PARAMS)))(
        *args)
    assert out.dtype == jnp.bfloat16
    for i in range(2):
        assert_close(out[i], sparse_decode_attention_reference(
            args[0][i].astype(jnp.float32), *stacked[i][1:]), jnp.bfloat16)


def test_sparse_decode_attention_bad_arguments():
    q, k, v, idx = attention_inputs(ATTENTION_CASES[0])
    d80 = [jnp.zeros((*x.shape[:-1], 80)) for x in (q, k, v)]
    with pytest.raises(ValueError, match="head dim 80 must be a multiple of 64"):
        sparse_decode_attention_mosaic(*d80, idx)
    with pytest.raises(ValueError, match="block_k must be a multiple of 64"):
        sparse_decode_attention_mosaic(q, k, v, idx, block_k=32)
    with pytest.raises(ValueError, match="G = 65 query heads"):
        sparse_decode_attention_mosaic(jnp.zeros((2, 1, 65, 64)), k, v, idx)
    with pytest.raises(ValueError, match="shared memory"):
        sparse_decode_attention_mosaic(q, k, v, idx, block_k=512, num_stages=3)
    with pytest.raises(ValueError, match="indices"):
        sparse_decode_attention_mosaic(q, k, v, idx[0])


# ------------------------------------------------------------------ approx scores
# (B, K, G, D, page_size, C, R, lengths, channel_major, dtype)
SCORE_CASES = [
    (2, 1, 1, 64, 8, 128, 8, [128, 37], True, jnp.float32),  # a partial page
    (1, 2, 3, 128, 16, 256, 20, [200], True, jnp.bfloat16),
    (2, 1, 4, 64, 32, 320, 16, [320, 0], True, jnp.bfloat16),  # P = 10, an empty row
    (1, 1, 7, 128, 16, 4200, 33, [4100], True, jnp.float32),  # P = 263: 3 page blocks
    (1, 1, 8, 64, 1, 96, 7, [90], False, jnp.bfloat16),  # page 1: the keys, row-major
    (2, 1, 4, 128, 16, 256, 20, [256, 100], False, jnp.float32),  # row-major pages
]


def score_inputs(case, seed=0):
    b, kv, g, d, page_size, c, r, lengths, channel_major, dtype = case
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    keys = np.asarray(jnp.asarray(random_normal(rng, (b, kv, c, d)), dtype).astype(jnp.float32))
    page_max, page_min = page_metadata(keys, lengths, page_size)
    if channel_major:
        page_max, page_min = page_max.swapaxes(2, 3), page_min.swapaxes(2, 3)
    q = random_normal(rng, (b, kv, g, d))
    return (jnp.asarray(q, dtype), jnp.asarray(page_max, dtype), jnp.asarray(page_min, dtype),
            jnp.asarray(channel_sets(rng, b, kv, d, r)), jnp.asarray(lengths))


def score_id(case):
    layout = "DP" if case[8] else "PD"
    return f"G{case[2]}-D{case[3]}-page{case[4]}-R{case[6]}-{layout}-{jnp.dtype(case[9]).name}"


@pytest.mark.parametrize("case", SCORE_CASES, ids=score_id)
def test_approx_scores_matches_reference(case):
    args = score_inputs(case)
    page_size, channel_major = case[4], case[8]
    out = approx_scores_mosaic(*args, page_size=page_size, channel_major=channel_major,
                               interpret=PARAMS)
    ref = approx_scores_reference(*args, page_size=page_size, channel_major=channel_major)
    assert out.dtype == jnp.float32
    # The kernel sums in f32 from the stored bounds; f32 tolerances for every dtype.
    assert_close(out, ref, jnp.float32)  # empty pages exactly -inf, as the reference


def test_approx_scores_bad_arguments():
    args = score_inputs(SCORE_CASES[0])
    with pytest.raises(ValueError, match="block_p must be 128 or 256"):
        approx_scores_mosaic(*args, page_size=8, channel_major=True, block_p=64)
    q, pmax, pmin, ch, lengths = score_inputs(SCORE_CASES[4])
    with pytest.raises(ValueError, match="block_p must be a multiple of 64"):
        approx_scores_mosaic(q, pmax, pmin, ch, lengths, page_size=1, block_p=32)
    q80, pmax80 = (jnp.zeros((*x.shape[:-1], 80)) for x in (q, pmax))
    with pytest.raises(ValueError, match="head dim 80 must be a multiple of 32"):
        approx_scores_mosaic(q80, pmax80, pmax80, ch, lengths, page_size=1)
    with pytest.raises(ValueError, match="share a dtype"):
        approx_scores_mosaic(q, pmax, pmin.astype(jnp.float32), ch, lengths, page_size=1)


def test_poison_check_detects_unwritten_elements():
    """Control: an output element no kernel writes stays NaN in the interpreter."""

    def half(x_ref, o_ref, smem, bar):
        plgpu.copy_gmem_to_smem(x_ref, smem, bar)
        plgpu.barrier_wait(bar)
        plgpu.copy_smem_to_gmem(smem.at[:8], o_ref.at[:8])
        plgpu.wait_smem_to_gmem(0)

    out = plgpu.kernel(half, out_type=jax.ShapeDtypeStruct((16, 32), jnp.float32),
                       scratch_types=(plgpu.SMEM((16, 32), jnp.float32), plgpu.Barrier()),
                       interpret=PARAMS)(jnp.ones((16, 32), jnp.float32))
    out = np.asarray(out)
    assert np.isnan(out[8:]).all() and (out[:8] == 1).all()


def test_race_detection_is_on():
    """Control: two warpgroups writing one element is reported as a race."""

    def racy(o_ref):
        o_ref[0] = jax.lax.axis_index("wg").astype(jnp.float32)

    fields = {f.name for f in dataclasses.fields(plgpu.InterpretGPUParams)}
    warn = {"on_race": "warn"} if "on_race" in fields else {}  # JAX 0.12 raises by default
    plgpu.kernel(racy, out_type=jax.ShapeDtypeStruct((1,), jnp.float32), num_threads=2,
                 thread_name="wg",
                 interpret=plgpu.InterpretGPUParams(detect_races=True, **warn))()
    assert races_found()
    mgpu_interpret.reset_gpu_interpret_mode_state()  # for the fixture's no-race check


# ------------------------------------------------------------------ a whole decode step
STEP_CHILD = "ROCKETKV_TEST_MOSAIC_STEP_CHILD"
STEP_TIMEOUT_S = 300


def test_rocketkv_decode_step_with_mosaic_kernels_equals_reference():
    """The whole-step check below, in a child process with a time limit. The interpreter
    runs each simulated warpgroup as its own program, from inside a callback of the outer
    jitted step, and the warpgroups wait on each other at barriers; on a 2-core machine
    XLA's CPU pool has two threads, and a run can deadlock with both waiting (seen once in
    CI). A child that hangs is killed and the check run again; two hangs in a row skip
    with that reason. A wrong result fails as usual."""
    import os
    import subprocess
    import sys

    if os.environ.get(STEP_CHILD):
        return _decode_step_with_mosaic_kernels_equals_reference()
    node = f"{__file__}::test_rocketkv_decode_step_with_mosaic_kernels_equals_reference"
    for _ in range(2):
        try:
            run = subprocess.run(
                [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                env={**os.environ, STEP_CHILD: "1"}, capture_output=True, text=True,
                timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue
        assert run.returncode == 0 and " passed" in run.stdout, run.stdout + run.stderr
        return
    pytest.skip(f"the Mosaic GPU interpreter deadlocked twice (over {STEP_TIMEOUT_S} s each) "
                f"on {os.cpu_count()} CPU cores; the kernels' own tests above still ran")


def _decode_step_with_mosaic_kernels_equals_reference():
    """kernels="mosaic" through make_method and the jitted decode step, run in the
    interpreter (`force_gpu_interpret_mode`: no user-facing name), gives the reference
    step's logits on a tiny model (head dim 64: the Mosaic kernels' smallest)."""
    from rocketkv_jax.engine.generate import make_decode_step, make_prefill
    from rocketkv_jax.methods import make_method
    from rocketkv_jax.models.config import ModelConfig
    from rocketkv_jax.models.params import random_params

    config = ModelConfig(
        model_type="llama", vocab_size=97, hidden_size=128, intermediate_size=160,
        num_layers=2, num_heads=4, num_kv_heads=1, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=1024, tie_word_embeddings=False)
    params = random_params(config, seed=1, scale=0.3)
    params["embed"] = params["embed"] * 50  # sharp attention, so selection matters
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 256)), jnp.int32)
    lengths = jnp.asarray([256, 201], jnp.int32)

    def step_logits(kernels):
        plan = make_method("rocketkv", 32, kernels=kernels, stage2="on").plan(config, 256, 8)
        assert plan.describe()["stage2_path"] == "sparse" and plan.kernels == kernels
        with plgpu.force_gpu_interpret_mode(PARAMS):
            logits, cache = make_prefill(config, plan)(params, tokens, lengths)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            logits, _ = make_decode_step(config, plan)(params, tok, lengths, cache)
        return np.asarray(logits)

    ref, got = step_logits("reference"), step_logits("mosaic")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)

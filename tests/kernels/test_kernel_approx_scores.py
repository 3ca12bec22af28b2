"""approx_scores: Pallas kernel (interpret mode; Triton on a GPU) == jnp reference ==
independent numpy loops."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import TOLERANCES, channel_sets, page_metadata, random_normal

from rocketkv_jax.kernels import approx_scores, approx_scores_pallas, approx_scores_reference
from rocketkv_jax.kernels.approx_scores import _approx_scores_call, prepare_approx_operands

DTYPES = [jnp.float32, jnp.bfloat16]

# (B, K, G, D, page_size, C, R, lengths, block_p)
CASES = [
    (2, 2, 1, 64, 8, 128, 8, [128, 37], 128),  # G=1, one partial page in row 1
    (2, 2, 3, 128, 16, 256, 20, [200, 1], 16),  # G=3, a row with a single token
    (3, 1, 4, 64, 32, 320, 16, [320, 33, 0], 16),  # P=10 (not a power of 2), an empty row
    (1, 2, 8, 128, 16, 512, 128, [509], 16),  # G=8, all D channels, 2 page blocks
    (2, 1, 4, 80, 16, 96, 5, [96, 50], 128),  # D=80 (not a power of 2), R=5
]


def make_inputs(case, dtype, seed=0):
    b, kv, g, d, page_size, c, r, lengths, _ = case
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    keys = random_normal(rng, (b, kv, c, d))
    # Round keys to the test dtype first, so the metadata is exactly what that cache would hold.
    keys = np.asarray(jnp.asarray(keys, dtype).astype(jnp.float32))
    page_max, page_min = page_metadata(keys, lengths, page_size)
    q = random_normal(rng, (b, kv, g, d))
    channels = channel_sets(rng, b, kv, d, r)
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(page_max, dtype),
        jnp.asarray(page_min, dtype),
        jnp.asarray(channels),
        jnp.asarray(lengths),
    )


def assert_scores_close(actual, desired, dtype):
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape
    assert not np.isnan(actual).any(), "kernel produced NaN"
    assert not np.isnan(desired).any(), "reference produced NaN"
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(desired))
    assert not np.isposinf(actual).any()
    finite = np.isfinite(desired)
    rtol, atol = TOLERANCES[jnp.dtype(dtype).name]
    np.testing.assert_allclose(actual[finite], desired[finite], rtol=rtol, atol=atol)


def numpy_approx_scores(q, page_max, page_min, channels, lengths, page_size):
    """Independent float64 loop implementation of docs/algorithm.md stage 2's `approx`."""
    q, page_max, page_min = (np.asarray(x, np.float64) for x in (q, page_max, page_min))
    channels, lengths = np.asarray(channels), np.asarray(lengths)
    b_size, kv_size, g_size, _ = q.shape
    p_size = page_max.shape[2]
    out = np.empty((b_size, kv_size, g_size, p_size))
    for b in range(b_size):
        for k in range(kv_size):
            sign = np.sign(q[b, k].sum(axis=0))
            for g in range(g_size):
                for p in range(p_size):
                    if p * page_size >= lengths[b]:
                        out[b, k, g, p] = -np.inf
                        continue
                    acc = 0.0
                    for c in channels[b, k]:
                        bound = page_max[b, k, p, c] if sign[c] > 0 else -page_min[b, k, p, c]
                        acc += q[b, k, g, c] * sign[c] * bound
                    out[b, k, g, p] = acc
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[2]}-D{c[3]}-page{c[4]}-P{c[5]//c[4]}")
def test_kernel_matches_reference(case, dtype, interpret):
    args = make_inputs(case, dtype)
    page_size, block_p = case[4], case[8]
    out = approx_scores_pallas(*args, page_size=page_size, block_p=block_p, interpret=interpret)
    ref = approx_scores_reference(*args, page_size=page_size)
    assert out.dtype == jnp.float32
    assert out.shape == (case[0], case[1], case[2], -(-case[5] // page_size))
    assert_scores_close(out, ref, dtype)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=["G3", "G4-emptyrow"])
def test_reference_matches_numpy_loops(case):
    args = make_inputs(case, jnp.float32, seed=1)
    ref = approx_scores_reference(*args, page_size=case[4])
    expected = numpy_approx_scores(*args, page_size=case[4])
    assert_scores_close(ref, expected, jnp.float32)


def test_single_head_all_channels_is_an_upper_bound(interpret):
    """With G = 1 and R = D the score bounds q.k of every valid token of its page (Quest)."""
    b, kv, d, page_size, c = 2, 2, 64, 8, 96
    rng = np.random.default_rng(3)
    lengths = np.array([96, 45], np.int32)
    keys = random_normal(rng, (b, kv, c, d))
    page_max, page_min = page_metadata(keys, lengths, page_size)
    q = random_normal(rng, (b, kv, 1, d))
    channels = np.tile(np.arange(d, dtype=np.int32), (b, kv, 1))
    out = np.asarray(
        approx_scores_pallas(q, page_max, page_min, channels, lengths, page_size=page_size,
                             interpret=interpret)
    )[:, :, 0]  # [B, K, P]
    dots = np.einsum("bkd,bkcd->bkc", q[:, :, 0].astype(np.float64), keys)  # [B, K, C]
    for bi in range(b):
        for t in range(lengths[bi]):
            assert (out[bi, :, t // page_size] >= dots[bi, :, t] - 1e-4).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_channel_major_layout(dtype, interpret):
    case = CASES[2]
    q, page_max, page_min, channels, lengths = make_inputs(case, dtype)
    expected = approx_scores_reference(q, page_max, page_min, channels, lengths,
                                       page_size=case[4])
    pm_t, pn_t = jnp.swapaxes(page_max, 2, 3), jnp.swapaxes(page_min, 2, 3)  # [B, K, D, P]
    kernel = functools.partial(approx_scores_pallas, block_p=16, interpret=interpret)
    for run in (kernel, approx_scores_reference):
        out = run(q, pm_t, pn_t, channels, lengths, page_size=case[4], channel_major=True)
        assert_scores_close(out, expected, dtype)


def test_every_output_element_is_written(interpret):
    """The output buffer starts as NaN (aliased input); no NaN may survive, padding included."""
    case = CASES[2]  # P = 10 -> padded to 16, G = 4 -> padded to 16
    q, page_max, page_min, channels, lengths = make_inputs(case, jnp.float32)
    q_hat, use_max, channels_pad = prepare_approx_operands(q, page_max, channels)
    b, kv, g_pad, _ = q_hat.shape
    poison = jnp.full((b, kv, g_pad, 16), jnp.nan, jnp.float32)
    out = _approx_scores_call(
        q_hat, use_max, channels_pad, page_max, page_min, lengths, page_size=case[4],
        block_p=16, num_warps=4, num_stages=2, interpret=interpret, channel_major=False,
        out_init=poison,
    )
    assert not np.isnan(np.asarray(out)).any()
    expected = approx_scores_reference(q, page_max, page_min, channels, lengths,
                                       page_size=case[4])
    assert_scores_close(out[:, :, : case[2], :10], expected, jnp.float32)


def test_empty_pages_are_exactly_neg_inf_with_negative_queries(interpret):
    """-inf metadata times a negative query would be +inf; the kernel must mask instead."""
    case = (1, 1, 2, 64, 16, 64, 16, [20], 16)
    q, page_max, page_min, channels, lengths = make_inputs(case, jnp.float32)
    for sign in (1.0, -1.0):
        out = np.asarray(
            approx_scores_pallas(sign * q, page_max, page_min, channels, lengths,
                                 page_size=16, interpret=interpret)
        )
        assert np.isfinite(out[..., :2]).all()
        assert np.isneginf(out[..., 2:]).all()


def test_jit_and_vmap(interpret):
    case = CASES[0]
    stacked = [make_inputs(case, jnp.float32, seed=s) for s in (0, 1)]
    args = [jnp.stack(xs) for xs in zip(*stacked, strict=True)]  # leading axis of 2
    f = jax.jit(jax.vmap(
        lambda *a: approx_scores_pallas(*a, page_size=case[4], interpret=interpret)
    ))
    out = f(*args)
    for i in range(2):
        assert_scores_close(out[i], approx_scores_reference(*stacked[i], page_size=case[4]),
                            jnp.float32)


def test_every_backend_name_matches_reference():
    """`approx_scores(kernels=...)`: what each name runs here ("triton" needs a GPU)."""
    case = CASES[1]
    args = make_inputs(case, jnp.float32)
    ref = approx_scores_reference(*args, page_size=case[4])
    on_gpu = jax.default_backend() == "gpu"
    for backend in ("reference", "auto", "interpret", *(("triton",) if on_gpu else ())):
        out = approx_scores(*args, page_size=case[4], kernels=backend)
        assert_scores_close(out, ref, jnp.float32)


def test_bad_arguments_raise():
    args = make_inputs(CASES[0], jnp.float32)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        approx_scores(*args, page_size=8, kernels="cuda")
    with pytest.raises(ValueError, match="block_p"):
        approx_scores_pallas(*args, page_size=8, block_p=48, interpret=True)
    with pytest.raises(ValueError, match="channels"):
        approx_scores_pallas(*args[:3], args[3][0], args[4], page_size=8, interpret=True)
    with pytest.raises(ValueError, match="channels"):
        approx_scores_reference(*args[:3], args[3][0], args[4], page_size=8)

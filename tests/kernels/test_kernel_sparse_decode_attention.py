"""sparse_decode_attention: Pallas kernel (interpret mode; Triton on a GPU) == jnp reference
== numpy loops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import TOLERANCES, distinct_indices, random_normal

from rocketkv_jax.kernels import (
    sparse_decode_attention,
    sparse_decode_attention_pallas,
    sparse_decode_attention_reference,
)
from rocketkv_jax.kernels.decode_shared import combine_splits
from rocketkv_jax.kernels.sparse_decode_attention import (
    _sparse_attention_call,
    prepare_attention_operands,
    split_plan,
)

DTYPES = [jnp.float32, jnp.bfloat16]

# (B, K, G, D, C, M, lengths, num_invalid, block_k, num_splits)
CASES = [
    (2, 2, 1, 64, 128, 64, [128, 100], 0, 32, 2),  # M a multiple of block_k
    (2, 2, 3, 128, 256, 100, [256, 130], 9, 32, 2),  # M not a multiple, -1 entries
    (3, 1, 4, 64, 200, 37, [200, 37, 20], 5, 16, 4),  # short rows: many -1, odd M
    (1, 2, 8, 128, 512, 300, [512], 0, 64, 16),  # defaults: 5 blocks -> 5 splits
    (2, 1, 4, 80, 96, 40, [96, 60], 3, 16, 2),  # D=80 (not a power of 2)
]


def make_inputs(case, dtype, seed=0):
    b, kv, g, d, c, m, lengths, num_invalid, _, _ = case
    rng = np.random.default_rng(seed)
    q = random_normal(rng, (b, kv, g, d))
    k = random_normal(rng, (b, kv, c, d))
    v = random_normal(rng, (b, kv, c, d))
    indices = distinct_indices(rng, b, kv, c, m, np.asarray(lengths), num_invalid)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(indices))


def assert_outputs_close(actual, desired, dtype):
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape
    assert np.isfinite(actual).all(), "kernel produced NaN or inf"
    assert np.isfinite(desired).all(), "reference produced NaN or inf"
    rtol, atol = TOLERANCES[jnp.dtype(dtype).name]
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol)


def numpy_sparse_attention(q, k, v, indices, sm_scale=None):
    """Independent float64 loop implementation: softmax over the valid selected tokens."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    indices = np.asarray(indices)
    b_size, kv_size, g_size, d = q.shape
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    out = np.zeros(q.shape)
    for b in range(b_size):
        for kh in range(kv_size):
            sel = [int(i) for i in indices[b, kh] if 0 <= i < k.shape[2]]
            if not sel:
                continue
            for g in range(g_size):
                logits = np.array([q[b, kh, g] @ k[b, kh, i] * scale for i in sel])
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[b, kh, g] = sum(wi * v[b, kh, i] for wi, i in zip(w, sel, strict=True))
    return out


def case_id(c):
    return f"G{c[2]}-D{c[3]}-M{c[5]}-bk{c[8]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference(case, dtype, interpret):
    q, k, v, indices = make_inputs(case, dtype)
    block_k, num_splits = case[8], case[9]
    out = sparse_decode_attention_pallas(q, k, v, indices, block_k=block_k,
                                         num_splits=num_splits, interpret=interpret)
    ref = sparse_decode_attention_reference(q, k, v, indices)
    assert out.dtype == dtype and out.shape == q.shape
    assert_outputs_close(out, ref, dtype)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=case_id)
def test_reference_matches_numpy_loops(case):
    q, k, v, indices = make_inputs(case, jnp.float32, seed=1)
    assert_outputs_close(sparse_decode_attention_reference(q, k, v, indices),
                         numpy_sparse_attention(q, k, v, indices), jnp.float32)
    assert_outputs_close(sparse_decode_attention_reference(q, k, v, indices, sm_scale=0.3),
                         numpy_sparse_attention(q, k, v, indices, sm_scale=0.3), jnp.float32)


def test_custom_scale_rows_without_tokens_and_out_of_range_slots(interpret):
    case = CASES[1]
    q, k, v, indices = make_inputs(case, jnp.float32)
    indices = indices.at[0, 1].set(-1)  # a (b, k) with no token at all
    indices = indices.at[1, 0, :7].set(-5).at[1, 0, 7:9].set(10**6)  # other invalid slots
    out = sparse_decode_attention_pallas(q, k, v, indices, sm_scale=0.25, block_k=32,
                                         num_splits=4, interpret=interpret)
    np.testing.assert_array_equal(np.asarray(out[0, 1]), 0.0)
    assert_outputs_close(out, numpy_sparse_attention(q, k, v, indices, sm_scale=0.25),
                         jnp.float32)


def test_every_partial_output_element_is_written(interpret):
    """All three kernel outputs start as NaN (aliased inputs); none may survive."""
    case = CASES[2]  # G=4 -> 16 rows, M=37 -> 3 blocks of 16 over 3 splits
    q, k, v, indices = make_inputs(case, jnp.float32)
    q_pad, indices_pad, block_k, splits = prepare_attention_operands(
        q, k, indices, block_k=16, num_splits=4
    )
    b, kv, g_pad, d_pad = q_pad.shape
    poison = (
        jnp.full((b, kv, splits, g_pad, d_pad), jnp.nan, jnp.float32),
        jnp.full((b, kv, splits, g_pad), jnp.nan, jnp.float32),
        jnp.full((b, kv, splits, g_pad), jnp.nan, jnp.float32),
    )
    partials = _sparse_attention_call(
        q_pad, indices_pad, k, v, sm_scale=1 / 8, block_k=block_k, num_splits=splits,
        num_warps=8, num_stages=2, interpret=interpret, out_init=poison,
    )
    for x in partials:
        assert not np.isnan(np.asarray(x)).any()
    out = combine_splits(*partials)[:, :, : case[2], : case[3]]
    assert_outputs_close(out, sparse_decode_attention_reference(q, k, v, indices), jnp.float32)


def test_poison_check_detects_unwritten_elements():
    """Control for the poison tests: an aliased NaN buffer stays NaN where nothing writes."""
    from jax.experimental import pallas as pl

    def half_kernel(x_ref, init_ref, o_ref):
        del init_ref
        o_ref[pl.ds(0, 8)] = x_ref[pl.ds(0, 8)]

    x = jnp.ones((16,), jnp.float32)
    out = pl.pallas_call(
        half_kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
        input_output_aliases={1: 0}, interpret=True,
    )(x, jnp.full((16,), jnp.nan, jnp.float32))
    assert np.isnan(np.asarray(out[8:])).all() and not np.isnan(np.asarray(out[:8])).any()


@pytest.mark.parametrize(
    "m,block_k,num_splits,expected",
    [(2048, 64, 16, (64, 16, 2)), (100, 64, 16, (64, 2, 1)), (5, 64, 16, (16, 1, 1)),
     (1100, 64, 16, (64, 9, 2)), (4096, 128, 16, (128, 16, 2))],
)
def test_split_plan(m, block_k, num_splits, expected):
    bk, splits, per_split = split_plan(m, block_k, num_splits)
    assert (bk, splits, per_split) == expected
    assert splits * per_split * bk >= m > (splits - 1) * per_split * bk  # no empty split


def test_jit_and_vmap(interpret):
    case = CASES[0]
    stacked = [make_inputs(case, jnp.float32, seed=s) for s in (0, 1)]
    args = [jnp.stack(xs) for xs in zip(*stacked, strict=True)]  # leading axis of 2
    f = jax.jit(jax.vmap(lambda *a: sparse_decode_attention_pallas(
        *a, block_k=32, num_splits=2, interpret=interpret)))
    out = f(*args)
    for i in range(2):
        assert_outputs_close(out[i], sparse_decode_attention_reference(*stacked[i]),
                             jnp.float32)


def test_mixed_dtypes_promote(interpret):
    q, k, v, indices = make_inputs(CASES[0], jnp.bfloat16)
    q32 = q.astype(jnp.float32)
    out = sparse_decode_attention_pallas(q32, k, v, indices, block_k=32, interpret=interpret)
    assert out.dtype == jnp.float32
    assert_outputs_close(out, sparse_decode_attention_reference(q32, k, v, indices),
                         jnp.float32)


def test_bad_arguments_raise():
    q, k, v, indices = make_inputs(CASES[0], jnp.float32)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        sparse_decode_attention(q, k, v, indices, kernels="Mosaic")
    with pytest.raises(ValueError, match="block_k"):
        sparse_decode_attention_pallas(q, k, v, indices, block_k=24, interpret=True)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_decode_attention_pallas(q, k, v, indices, num_splits=0, interpret=True)
    with pytest.raises(ValueError, match="indices"):
        sparse_decode_attention_pallas(q, k, v, indices[0], interpret=True)
    with pytest.raises(ValueError, match="indices"):
        sparse_decode_attention_reference(q, k, v, indices[0])


def test_every_backend_name_matches_reference():
    """`sparse_decode_attention(kernels=...)`: what each name runs here ("triton" needs a
    GPU)."""
    case = CASES[1]
    q, k, v, indices = make_inputs(case, jnp.float32)
    ref = sparse_decode_attention_reference(q, k, v, indices)
    on_gpu = jax.default_backend() == "gpu"
    for backend in ("reference", "auto", "interpret", *(("triton",) if on_gpu else ())):
        out = sparse_decode_attention(q, k, v, indices, block_k=32, kernels=backend)
        assert_outputs_close(out, ref, jnp.float32)

"""The compiled Triton and Mosaic GPU kernels against their jnp references on the same GPU,
at real model shapes: Llama-3.1-8B (8 KV heads, G = 4, D = 128) and Qwen2.5-0.5B (2 KV
heads, G = 7, D = 64), f32 and bf16, caches of 8k-128k slots with ragged rows, budgets
256-4096.

Skipped without a CUDA GPU (`-m gpu` selects them; on a CPU the interpreter tests in
tests/kernels/ run the same kernel bodies at small shapes). The references are pinned to
float64 numpy loops there; here the kernels are pinned to the references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_cases import (
    DECODE_BACKENDS,
    DTYPES,
    MODELS,
    NEEDS_GPU,
    TOLERANCES,
    distinct_slots,
    normal,
    page_bounds,
    ragged_lengths,
)

from rocketkv_jax.kernels import approx_scores, prefill_attention, sparse_decode_attention
from rocketkv_jax.methods.budget import stage2_reduction

pytestmark = NEEDS_GPU

# (model, cached slots C, token budget M): the decode shapes of hybrid / rocketkv. Each
# case compiles two programs per dtype (a few seconds on a GPU), and these run inside the
# GPU check's time budget: contexts 8k / 32k / 128k and budgets 256-4096 once each.
DECODE = [
    ("llama3.1-8b", 8192, 256), ("llama3.1-8b", 131072, 4096),
    ("qwen2.5-0.5b", 32768, 2048), ("qwen2.5-0.5b", 131072, 1024),
]
BATCH = 2  # row 0 full, row 1 ragged
# The Mosaic GPU decode kernels run on fewer of them (the GPU check runs them after the
# Triton tests, in what is left of its part a): Llama-3.1-8B at 128k / M 4096 and Qwen2.5
# (G 7, D 64) at 32k / M 2048.
MOSAIC_DECODE = [DECODE[1], DECODE[2]]


def decode_cases():
    """(case, backend) pairs: every case on Triton, MOSAIC_DECODE on Mosaic GPU too."""
    return [pytest.param(case, backend, id=f"{decode_id(case)}-{backend_id(backend)}")
            for backend in DECODE_BACKENDS for case in DECODE
            if backend == "triton" or case in MOSAIC_DECODE]


def backend_id(backend) -> str:
    return backend if isinstance(backend, str) else backend.values[0]


def dtype_id(d) -> str:
    return jnp.dtype(d).name


def decode_id(case) -> str:
    model, c, m = case
    return f"{model}-{c // 1024}k-M{m}"


def assert_close(actual, desired, dtype, what: str):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    desired = np.asarray(jnp.asarray(desired, jnp.float32), np.float64)
    assert actual.shape == desired.shape, what
    assert not np.isnan(actual).any() and not np.isnan(desired).any(), f"{what}: NaN"
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(desired), err_msg=what)
    finite = np.isfinite(desired)
    assert np.isfinite(actual[finite]).all(), f"{what}: inf where the reference is finite"
    rtol, atol = TOLERANCES[jnp.dtype(dtype).name]
    np.testing.assert_allclose(actual[finite], desired[finite], rtol=rtol, atol=atol,
                               err_msg=what)


def both(fn, *args, backend: str = "triton", **kw):
    """fn(*args, kernels=...) for the `backend` kernel and the reference, each jitted."""
    return [jax.jit(lambda *a, k=k: fn(*a, kernels=k, **kw))(*args)
            for k in (backend, "reference")]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case,backend", decode_cases())
def test_sparse_decode_attention(case, backend, dtype):
    model, C, M = case
    K, G, D = MODELS[model]
    keys = jax.random.split(jax.random.key(C + M), 4)
    q = normal(keys[0], (BATCH, K, G, D), dtype)
    k = normal(keys[1], (BATCH, K, C, D), dtype)
    v = normal(keys[2], (BATCH, K, C, D), dtype)
    slots = distinct_slots(keys[3], ragged_lengths(BATCH, C), K, C, M // 2, num_invalid=7)
    got, want = both(sparse_decode_attention, q, k, v, slots, backend=backend)
    assert got.dtype == dtype
    assert_close(got, want, dtype, f"sparse_decode_attention {decode_id(case)} {backend}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case,backend", decode_cases())
def test_approx_scores(case, backend, dtype):
    """Channel-major page bounds with hybrid's page and channel count for C / M."""
    model, C, M = case
    K, G, D = MODELS[model]
    page, r = stage2_reduction(C / M, D)
    keys = jax.random.split(jax.random.key(C - M), 3)
    lengths = ragged_lengths(BATCH, C)
    page_max, page_min = page_bounds(normal(keys[0], (BATCH, K, C, D), dtype), lengths, page)
    q = normal(keys[1], (BATCH, K, G, D), dtype)
    u = jax.random.uniform(keys[2], (BATCH, K, D))
    channels = jnp.argsort(u, axis=-1)[..., :r].astype(jnp.int32)  # [B, K, R] distinct
    got, want = both(approx_scores, q, page_max, page_min, channels, lengths, page_size=page,
                     channel_major=True, backend=backend)
    assert got.shape == (BATCH, K, G, page_max.shape[-1])
    assert_close(got, want, dtype,
                 f"approx_scores {decode_id(case)} page {page} r {r} {backend}")


# (model, query tokens T, KV buffer S, q_start, batch, sliding window)
PREFILL = [
    ("llama3.1-8b", 8192, 8192, 0, 1, None),  # a whole 8k prompt
    ("llama3.1-8b", 4096, 32768, 28672, 2, None),  # the last 4k chunk of a 32k prompt
    ("llama3.1-8b", 4096, 16384, 12288, 1, 4096),  # Mistral's sliding window
    ("qwen2.5-0.5b", 4096, 131072, 126976, 2, None),  # the last chunk of a 128k prompt
]


def prefill_id(case) -> str:
    model, t, s, start, b, w = case
    return f"{model}-T{t}-S{s // 1024}k-B{b}" + (f"-w{w}" if w else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PREFILL, ids=prefill_id)
def test_prefill_attention(case, dtype):
    model, T, S, start, B, window = case
    K, G, D = MODELS[model]
    keys = jax.random.split(jax.random.key(T + S), 3)
    q = normal(keys[0], (B, K * G, T, D), dtype)
    k = normal(keys[1], (B, K, S, D), dtype)
    v = normal(keys[2], (B, K, S, D), dtype)
    # row 0 fills the buffer, row 1 ends two thirds into the chunk
    lengths = jnp.asarray([S, start + 2 * T // 3 + 5][:B], jnp.int32)
    got, want = both(prefill_attention, q, k, v, lengths, jnp.int32(start),
                     sliding_window=window)
    # only real query rows (start + t < length) are specified
    real = (start + np.arange(T))[None, :] < np.asarray(lengths)[:, None]  # [B, T]
    got = np.asarray(jnp.asarray(got, jnp.float32)).transpose(0, 2, 1, 3)[real]
    want = np.asarray(jnp.asarray(want, jnp.float32)).transpose(0, 2, 1, 3)[real]
    assert real.any()
    assert_close(got, want, dtype, f"prefill_attention {prefill_id(case)}")

"""Prefill attention: the blockwise jnp reference and the Pallas kernel (interpret mode;
Triton on a GPU).

The reference is pinned to a float64 numpy loop written from the contract (causal, lengths,
Mistral's window q - k < w, a chunk of queries at q_start over a longer buffer) and to the
model's dense `attention_mask` + `dense_attention`; the kernel is pinned to the reference.
Only real query rows (q_start + t < length) are compared: padding rows are unspecified,
except that a row which sees no key must be exactly 0 and nothing may be NaN.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import TOLERANCES, random_normal

from rocketkv_jax.kernels import (
    prefill_attention,
    prefill_attention_pallas,
    prefill_attention_reference,
)
from rocketkv_jax.models.layers import attention_mask, dense_attention

DTYPES = [jnp.float32, jnp.bfloat16]


def ref_prefill(q, k, v, lengths, q_start, sliding_window):
    """float64 numpy: out[b, h, t] over keys s <= q_start + t, s < lengths[b], window."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    out = np.zeros((B, H, T, D))
    seen = np.zeros((B, T), bool)  # does query t of row b see any key
    for b in range(B):
        for t in range(T):
            pos = q_start + t
            keys = [s for s in range(S) if s <= pos and s < lengths[b]
                    and (sliding_window is None or pos - s < sliding_window)]
            if not keys:
                continue
            seen[b, t] = True
            for h in range(H):
                logits = k[b, h // G, keys] @ q[b, h, t] / np.sqrt(D)  # [n]
                p = np.exp(logits - logits.max())
                out[b, h, t] = (p / p.sum()) @ v[b, h // G, keys]
    return out, seen


def make_case(seed, b, kv, g, t, s, d, dtype, lengths):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(random_normal(rng, (b, kv * g, t, d)), dtype)
    k = jnp.asarray(random_normal(rng, (b, kv, s, d)), dtype)
    v = jnp.asarray(random_normal(rng, (b, kv, s, d)), dtype)
    return q, k, v, jnp.asarray(lengths, jnp.int32)


def masked_dense_attention(q, k, v, lengths, q_start, sliding_window):
    """The model's dense path: `attention_mask` over slot positions, -1 past lengths."""
    b, t, s = q.shape[0], q.shape[2], k.shape[2]
    q_pos = jnp.broadcast_to(q_start + jnp.arange(t), (b, t))  # [B, T]
    slots = jnp.arange(s)
    k_pos = jnp.where(slots[None, :] < lengths[:, None], slots[None, :], -1)  # [B, S]
    mask = attention_mask(q_pos, k_pos, sliding_window)[:, None]  # [B, 1, T, S]
    return dense_attention(q, k, v, mask)


def assert_matches(out, want, seen, lengths, q_start, dtype):
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "NaN/inf in the output"
    T = out.shape[2]
    real = (q_start + np.arange(T))[None, :] < np.asarray(lengths)[:, None]  # [B, T]
    rtol, atol = TOLERANCES[jnp.dtype(dtype).name]
    np.testing.assert_allclose(out.transpose(0, 2, 1, 3)[real],
                               np.asarray(want).transpose(0, 2, 1, 3)[real],
                               rtol=rtol, atol=atol)
    # A row that sees no key is exactly 0 (real rows always see themselves).
    assert (out.transpose(0, 2, 1, 3)[~seen] == 0).all()


# (b, kv, g, t, s, d, q_start, lengths, sliding_window, block_q, block_k)
REFERENCE_CASES = {
    "t_not_multiple": (2, 2, 1, 37, 37, 64, 0, [37, 21], None, 16, 16),
    "t_below_block": (1, 2, 3, 11, 11, 64, 0, [11], None, 256, 512),
    "gqa4_d128": (2, 2, 4, 40, 40, 128, 0, [40, 33], None, 16, 32),
    "gqa8_window": (2, 1, 8, 48, 48, 64, 0, [48, 30], 7, 16, 16),
    "gqa3_window_d128": (1, 2, 3, 50, 50, 128, 0, [50], 20, 32, 16),
    "chunk_q_start": (2, 2, 4, 24, 96, 64, 40, [64, 52], None, 16, 16),
    "chunk_window": (2, 1, 3, 16, 80, 64, 48, [64, 60], 10, 16, 32),
    # row 1: every query is past the row's last key plus the window -> fully masked
    "fully_masked_row": (2, 2, 1, 16, 64, 64, 40, [56, 20], 4, 16, 16),
    "window_one": (1, 1, 4, 20, 20, 64, 0, [20], 1, 16, 16),
    "empty_row": (2, 1, 2, 18, 18, 64, 0, [18, 0], None, 16, 16),
    # unmasked interior key blocks between the window's edge and the diagonal
    "window_interior": (2, 1, 2, 96, 96, 64, 0, [96, 90], 64, 16, 16),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", list(REFERENCE_CASES), ids=str)
def test_reference_matches_numpy_and_dense_attention(case, dtype):
    b, kv, g, t, s, d, q_start, lengths, window, block_q, block_k = REFERENCE_CASES[case]
    q, k, v, lens = make_case(zlib.crc32(case.encode()), b, kv, g, t, s, d, dtype, lengths)
    # jitted: one compile instead of an eager dispatch per op (seconds on this CPU)
    blockwise = jax.jit(functools.partial(prefill_attention_reference, q_start=q_start,
                                          sliding_window=window, block_q=block_q,
                                          block_k=block_k))
    out = blockwise(q, k, v, lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    want, seen = ref_prefill(q, k, v, lengths, q_start, window)
    assert_matches(out, want, seen, lengths, q_start, dtype)
    dense = jax.jit(functools.partial(masked_dense_attention, q_start=q_start,
                                      sliding_window=window))(q, k, v, lens)
    assert_matches(out, np.asarray(dense, np.float64), seen, lengths, q_start, dtype)


def test_reference_traced_q_start_and_default_blocks():
    q, k, v, lens = make_case(7, 1, 2, 2, 24, 64, 64, jnp.float32, [50])
    f = jax.jit(lambda q_start: prefill_attention_reference(q, k, v, lens, q_start))
    want, seen = ref_prefill(q, k, v, [50], 26, None)
    assert_matches(f(jnp.int32(26)), want, seen, [50], 26, jnp.float32)


# (b, kv, g, t, s, d, q_start, lengths, sliding_window, block_q, block_k): small, since
# interpret mode is slow; block_q counts rows of the folded (query, head) tile.
KERNEL_CASES = {
    "g1_t_not_multiple": (2, 2, 1, 37, 37, 64, 0, [37, 21], None, 32, 16),
    "g3_default_blocks": (1, 2, 3, 45, 45, 64, 0, [45], None, None, None),
    "g4_d128_window": (2, 1, 4, 40, 40, 128, 0, [40, 29], 9, 32, 16),
    "g8_chunk": (1, 1, 8, 12, 80, 64, 50, [62], None, 32, 32),
    "g3_chunk_window_masked_row": (2, 2, 3, 16, 64, 64, 40, [56, 20], 4, 16, 16),
    "d80_empty_row": (2, 1, 2, 18, 30, 80, 0, [18, 0], None, 16, 16),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", list(KERNEL_CASES), ids=str)
def test_kernel_matches_reference(case, dtype, interpret):
    b, kv, g, t, s, d, q_start, lengths, window, block_q, block_k = KERNEL_CASES[case]
    q, k, v, lens = make_case(zlib.crc32(case.encode()), b, kv, g, t, s, d, dtype, lengths)
    blocks = {"block_q": block_q, "block_k": block_k} if block_q else {}  # else the defaults
    out = prefill_attention_pallas(q, k, v, lens, jnp.int32(q_start), sliding_window=window,
                                   interpret=interpret, **blocks)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = jax.jit(functools.partial(prefill_attention_reference, q_start=q_start,
                                    sliding_window=window, block_q=16, block_k=16))
    ref = ref(q, k, v, lens)
    _, seen = ref_prefill(q, k, v, lengths, q_start, window)
    assert_matches(out, np.asarray(ref, np.float64), seen, lengths, q_start, dtype)


def test_kernel_rejects_bad_blocks():
    q, k, v, lens = make_case(0, 1, 1, 1, 16, 16, 64, jnp.float32, [16])
    for bad in ({"block_q": 24}, {"block_k": 8}):
        with pytest.raises(ValueError, match="power of 2"):
            prefill_attention_pallas(q, k, v, lens, interpret=True, **bad)
        with pytest.raises(ValueError, match="power of 2"):  # passed on by the backend name
            prefill_attention(q, k, v, lens, kernels="interpret", **bad)


def test_every_backend_name_matches_reference():
    """`prefill_attention(kernels=...)`, as the model calls it: what each name runs here
    ("triton" needs a GPU), with each implementation's default blocks."""
    q, k, v, lens = make_case(3, 2, 2, 3, 24, 40, 64, jnp.float32, [40, 29])
    want, seen = ref_prefill(q, k, v, [40, 29], 16, 8)
    on_gpu = jax.default_backend() == "gpu"
    for backend in ("reference", "auto", "interpret", *(("triton",) if on_gpu else ())):
        out = prefill_attention(q, k, v, lens, jnp.int32(16), sliding_window=8,
                                kernels=backend)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_matches(out, want, seen, [40, 29], 16, jnp.float32)


@pytest.mark.parametrize("block_k", [16, 24], ids=["whole_blocks", "partial_last_block"])
def test_layer_of_a_stack_matches_that_layer(block_k):
    """`layer=`: k, v as every layer's [Ly, B, K, S, D] (how the chunked prefill holds its
    buffers) give what the layer's own [B, K, S, D] gives, for every backend name."""
    rng = np.random.default_rng(11)
    q, _, _, lens = make_case(5, 2, 2, 3, 16, 64, 64, jnp.float32, [64, 40])
    k_all = jnp.asarray(random_normal(rng, (3, 2, 2, 64, 64)), jnp.float32)
    v_all = jnp.asarray(random_normal(rng, (3, 2, 2, 64, 64)), jnp.float32)
    for layer in (0, 2):
        want, seen = ref_prefill(q, k_all[layer], v_all[layer], [64, 40], 30, 12)
        f = jax.jit(lambda i: prefill_attention_reference(  # noqa: B023
            q, k_all, v_all, lens, 30, sliding_window=12, block_q=16, block_k=block_k,
            layer=i))
        assert_matches(f(jnp.int32(layer)), want, seen, [64, 40], 30, jnp.float32)
        for backend in ("reference", "interpret"):
            out = prefill_attention(q, k_all, v_all, lens, 30, sliding_window=12,
                                    kernels=backend, layer=layer)
            assert_matches(out, want, seen, [64, 40], 30, jnp.float32)
    with pytest.raises(ValueError, match=r"\[Ly, B, K, S, D\]"):
        prefill_attention_reference(q, k_all[0], v_all[0], lens, layer=0)

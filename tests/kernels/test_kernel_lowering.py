"""GPU lowering without a GPU: every kernel must lower to the Triton custom call.

`backend.lower_for_cuda` (an abstract H100 where no GPU is present, then
`lower(lowering_platforms=("cuda",))`) runs the real Pallas->Triton lowering on CPU and raises
Triton's refusals (non-power-of-2 arrays, unsupported primitives), so a block shape that would
fail on an H100 fails here. Shapes are Llama-3.1-8B-like: K=8, G=4, D=128, 32k/128k context
(and SmolLM2-like K=3, G=3, D=64 for prefill).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from rocketkv_jax.kernels import (
    approx_scores_pallas,
    backend,
    prefill_attention_pallas,
    sparse_decode_attention,
    sparse_decode_attention_pallas,
)

TRITON_CALL = "__gpu$xla.gpu.triton"
S = jax.ShapeDtypeStruct
DTYPES = [jnp.bfloat16, jnp.float32]


def lower_for_cuda(f, *shapes) -> str:
    return backend.lower_for_cuda(f, *shapes).as_text()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    "b,c,m", [(1, 32768, 2048), (1, 131072, 4096), (4, 32768, 256), (2, 5000, 300)]
)
def test_sparse_decode_attention_lowers_to_triton(dtype, b, c, m):
    kv, g, d = 8, 4, 128
    text = lower_for_cuda(
        sparse_decode_attention_pallas,
        S((b, kv, g, d), dtype), S((b, kv, c, d), dtype), S((b, kv, c, d), dtype),
        S((b, kv, m), jnp.int32),
    )
    assert TRITON_CALL in text


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("channel_major", [False, True], ids=["PD", "DP"])
@pytest.mark.parametrize("b,c,page_size,r", [(1, 32768, 16, 32), (2, 131072, 32, 7),
                                             (1, 4000, 8, 128)])
def test_approx_scores_lowers_to_triton(dtype, channel_major, b, c, page_size, r):
    kv, g, d = 8, 4, 128
    p = -(-c // page_size)
    meta = (b, kv, d, p) if channel_major else (b, kv, p, d)
    text = lower_for_cuda(
        lambda *a: approx_scores_pallas(*a, page_size=page_size, channel_major=channel_major),
        S((b, kv, g, d), dtype), S(meta, dtype), S(meta, dtype), S((b, kv, r), jnp.int32),
        S((b,), jnp.int32),
    )
    assert TRITON_CALL in text


@pytest.mark.parametrize("g", [1, 3, 8])
def test_gqa_ratios_and_vmap_lower_to_triton(g):
    """G != 16 is padded; a vmap adds the third (and last allowed) Triton grid axis."""
    n, b, kv, d, c, m, r = 2, 1, 8, 128, 8192, 512, 16
    dt = jnp.bfloat16
    attn = jax.vmap(sparse_decode_attention_pallas)
    text = lower_for_cuda(attn, S((n, b, kv, g, d), dt), S((n, b, kv, c, d), dt),
                          S((n, b, kv, c, d), dt), S((n, b, kv, m), jnp.int32))
    assert TRITON_CALL in text
    scores = jax.vmap(lambda *a: approx_scores_pallas(*a, page_size=16))
    p = c // 16
    text = lower_for_cuda(scores, S((n, b, kv, g, d), dt), S((n, b, kv, p, d), dt),
                          S((n, b, kv, p, d), dt), S((n, b, kv, r), jnp.int32),
                          S((n, b), jnp.int32))
    assert TRITON_CALL in text


PREFILL_SHAPES = {"llama8b": (8, 4, 128), "smollm2": (3, 3, 64)}


def lower_prefill(kv, g, d, t, s, dtype, sliding_window, batch=1):
    return lower_for_cuda(
        lambda q, k, v, lengths, q_start: prefill_attention_pallas(
            q, k, v, lengths, q_start, sliding_window=sliding_window),
        S((batch, kv * g, t, d), dtype), S((batch, kv, s, d), dtype),
        S((batch, kv, s, d), dtype), S((batch,), jnp.int32), S((), jnp.int32),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("window", [None, 4096], ids=["causal", "window4096"])
@pytest.mark.parametrize("model", list(PREFILL_SHAPES))
@pytest.mark.parametrize("t", [32768, 131072], ids=["32k", "128k"])
def test_prefill_attention_lowers_to_triton(t, model, window, dtype):
    """One-shot prefill (q_start traced, S = T) at long context."""
    kv, g, d = PREFILL_SHAPES[model]
    assert TRITON_CALL in lower_prefill(kv, g, d, t, t, dtype, window)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("model", list(PREFILL_SHAPES))
@pytest.mark.parametrize("t,s,window", [(4096, 32768, None), (4096, 131072, 4096),
                                        (1000, 5000, None)])
def test_prefill_attention_chunk_lowers_to_triton(t, s, window, model, dtype):
    """A chunk of a chunked prefill: T queries at a traced q_start over a longer buffer;
    T, S not multiples of the blocks are padded/masked, batch 2 has per-row lengths."""
    kv, g, d = PREFILL_SHAPES[model]
    assert TRITON_CALL in lower_prefill(kv, g, d, t, s, dtype, window, batch=2)


def test_prefill_attention_vmap_lowers_to_triton():
    """The grid is 2-D, so a vmap (e.g. over stacked layers) adds the third grid axis."""
    n, kv, g, d, t = 2, 8, 4, 128, 8192
    dt = jnp.bfloat16
    f = jax.vmap(prefill_attention_pallas)
    text = lower_for_cuda(f, S((n, 1, kv * g, t, d), dt), S((n, 1, kv, t, d), dt),
                          S((n, 1, kv, t, d), dt), S((n, 1), jnp.int32))
    assert TRITON_CALL in text


def test_lowering_check_rejects_non_power_of_2_blocks():
    """Control: the same check fails for an array shape Triton cannot hold."""

    def bad_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0

    def f(x):
        return backend.pallas_call(
            bad_kernel, interpret=False, out_shape=S((24, 16), jnp.float32), grid=(1,),
            in_specs=[pl.BlockSpec((24, 16), lambda i: (0, 0))],
            out_specs=pl.BlockSpec((24, 16), lambda i: (0, 0)),
            num_warps=4, num_stages=2, name="bad",
        )(x)

    with pytest.raises(Exception, match="power of 2"):
        lower_for_cuda(f, S((24, 16), jnp.float32))


def test_triton_backend_uses_triton_not_mosaic():
    """Without explicit Triton params, JAX 0.10 would lower GPU Pallas with Mosaic GPU; the
    backend name "triton" reaches the kernel with interpret=False."""
    text = lower_for_cuda(
        lambda *a: sparse_decode_attention(*a, kernels="triton"),
        S((1, 2, 4, 64), jnp.bfloat16), S((1, 2, 1024, 64), jnp.bfloat16),
        S((1, 2, 1024, 64), jnp.bfloat16), S((1, 2, 128), jnp.int32),
    )
    assert TRITON_CALL in text
    assert "mosaic_gpu" not in text.lower()


def test_cuda_lowering_raises_no_warning():
    """JAX >= 0.11 warns on each Pallas-Triton lowering; `lower_for_cuda` accepts that one
    warning, so a lowering under `-W error` still passes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = lower_for_cuda(
            lambda *a: sparse_decode_attention(*a, kernels="triton"),
            S((1, 2, 4, 64), jnp.float32), S((1, 2, 256, 64), jnp.float32),
            S((1, 2, 256, 64), jnp.float32), S((1, 2, 32), jnp.int32),
        )
    assert TRITON_CALL in text


def test_triton_lowering_accepts_only_the_triton_deprecation():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with backend.triton_lowering():
            emit_three_warnings()
    assert [(w.category, str(w.message)) for w in caught] == [
        (DeprecationWarning, "some other deprecation"),
        (UserWarning, "The Pallas Triton backend is deprecated")]


def emit_three_warnings():
    warnings.warn("The Pallas Triton backend is deprecated and will be removed",
                  DeprecationWarning, stacklevel=1)
    warnings.warn("some other deprecation", DeprecationWarning, stacklevel=1)
    warnings.warn("The Pallas Triton backend is deprecated", UserWarning, stacklevel=1)

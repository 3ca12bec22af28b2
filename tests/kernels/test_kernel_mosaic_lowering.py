"""GPU lowering without a GPU: the Mosaic GPU kernels lower to the `mosaic_gpu` custom call
for an (abstract) H100 at Llama-3.1-8B shapes (K 8, G 4, D 128; 32k and 128k context, M
256-4096) and others (G 1/8, D 64, batch 4, vmap).

`backend.lower_for_cuda` runs Pallas' Mosaic GPU lowering with its layout inference and
dialect lowering (sm_90), which refuses bad wgmma shapes, unsatisfiable layouts and TMA
transfers it cannot express (a control test shows a refusal). It stops before PTX: register
pressure and the runtime TMA descriptors are only checked on a GPU (tests/gpu).
Needs JAX >= 0.11.2 (skipped with the reason elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from rocketkv_jax.kernels.backend import MOSAIC_MIN_JAX, mosaic_jax_ok

if not mosaic_jax_ok():
    pytest.skip(f"the Mosaic GPU kernels need JAX >= {'.'.join(map(str, MOSAIC_MIN_JAX))}, "
                f"this is {jax.__version__}", allow_module_level=True)

from rocketkv_jax.kernels import (
    approx_scores,
    approx_scores_mosaic,
    backend,
    sparse_decode_attention,
    sparse_decode_attention_mosaic,
)

MOSAIC_CALL = "stablehlo.custom_call @mosaic_gpu"
S = jax.ShapeDtypeStruct
DTYPES = [jnp.bfloat16, jnp.float32]


def lower(f, *shapes) -> str:
    return backend.lower_for_cuda(f, *shapes).as_text()


def attention_shapes(b, kv, g, d, c, m, dtype):
    return (S((b, kv, g, d), dtype), S((b, kv, c, d), dtype), S((b, kv, c, d), dtype),
            S((b, kv, m), jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("b,c,m", [(1, 32768, 256), (1, 32768, 2048), (1, 131072, 4096),
                                   (4, 32768, 1024)])
def test_sparse_decode_attention_lowers_to_mosaic_gpu(dtype, b, c, m):
    text = lower(sparse_decode_attention_mosaic, *attention_shapes(b, 8, 4, 128, c, m, dtype))
    assert MOSAIC_CALL in text and "triton" not in text


@pytest.mark.parametrize("g,d", [(1, 128), (8, 128), (3, 64), (7, 64)])
def test_sparse_decode_attention_gqa_and_head_dims_lower(g, d):
    text = lower(sparse_decode_attention_mosaic,
                 *attention_shapes(1, 2, g, d, 8192, 512, jnp.bfloat16))
    assert MOSAIC_CALL in text


def meta_shapes(b, kv, g, d, c, page_size, r, dtype, channel_major):
    p = -(-c // page_size)
    meta = (b, kv, d, p) if channel_major else (b, kv, p, d)
    return (S((b, kv, g, d), dtype), S(meta, dtype), S(meta, dtype), S((b, kv, r), jnp.int32),
            S((b,), jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("b,c,page_size,r,channel_major", [
    (1, 32768, 16, 32, True),  # the plans' layout: channel-major page bounds
    (2, 131072, 32, 7, True),
    (1, 4000, 8, 128, True),  # P = 500, not a multiple of the page block
    (1, 32768, 1, 32, False),  # page 1: the keys themselves, row-major
    (1, 32768, 16, 60, False),
], ids=["32k-p16-DP", "128k-p32-DP", "4k-p8-R128-DP", "32k-p1-PD", "32k-p16-PD"])
def test_approx_scores_lowers_to_mosaic_gpu(dtype, b, c, page_size, r, channel_major):
    text = lower(
        lambda *a: approx_scores_mosaic(*a, page_size=page_size, channel_major=channel_major),
        *meta_shapes(b, 8, 4, 128, c, page_size, r, dtype, channel_major))
    assert MOSAIC_CALL in text and "triton" not in text


def test_vmap_adds_a_grid_axis_and_lowers():
    n = 2
    attn = jax.vmap(sparse_decode_attention_mosaic)
    shapes = [S((n, *s.shape), s.dtype)
              for s in attention_shapes(1, 8, 4, 128, 8192, 512, jnp.bfloat16)]
    assert MOSAIC_CALL in lower(attn, *shapes)
    scores = jax.vmap(lambda *a: approx_scores_mosaic(*a, page_size=16, channel_major=True))
    shapes = [S((n, *s.shape), s.dtype)
              for s in meta_shapes(1, 8, 4, 128, 8192, 16, 16, jnp.bfloat16, True)]
    assert MOSAIC_CALL in lower(scores, *shapes)


def test_backend_name_mosaic_reaches_the_mosaic_kernels():
    """`kernels="mosaic"` through the ops' dispatchers lowers to Mosaic GPU, not Triton."""
    text = lower(lambda *a: sparse_decode_attention(*a, kernels="mosaic"),
                 *attention_shapes(1, 2, 4, 64, 1024, 128, jnp.bfloat16))
    assert MOSAIC_CALL in text and "__gpu$xla.gpu.triton" not in text
    text = lower(lambda *a: approx_scores(*a, page_size=16, kernels="mosaic",
                                          channel_major=True),
                 *meta_shapes(1, 2, 4, 64, 1024, 16, 8, jnp.bfloat16, True))
    assert MOSAIC_CALL in text and "__gpu$xla.gpu.triton" not in text


def test_lowering_check_rejects_a_bad_wgmma():
    """Control: the same lowering refuses a wgmma tile the hardware does not have (M = 32)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def bad(o_ref, a, b, out):
        def mm(acc):
            plgpu.wgmma(acc, a, b)
            return acc[...]

        out[...] = jax.experimental.pallas.run_scoped(mm, plgpu.ACC((32, 64), jnp.float32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out, o_ref)
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(bad, out_type=S((32, 64), jnp.float32), scratch_types=(
        plgpu.SMEM((32, 64), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((64, 64), jnp.bfloat16, transforms=tiled),
        plgpu.SMEM((32, 64), jnp.float32)))
    with pytest.raises(Exception, match="accumulator's first dimension must be a multiple of 64"):
        lower(kernel)

"""Real-model shapes and device-side random inputs for the GPU tests (`-m gpu`).

Inputs are drawn on the device (a 128k-slot cache is 0.5-1 GiB: drawing it in numpy and
copying it over would cost more than the test) and pushed away from 0 like
`kernel_cases.random_normal`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

ON_GPU = jax.default_backend() == "gpu"
NEEDS_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: runs the compiled Triton "
                       "kernels (python -m pytest -m gpu on a GPU machine; docs/gpu.md)"),
]


def _mosaic_missing() -> str:
    from rocketkv_jax.kernels.backend import mosaic_missing

    return mosaic_missing() if ON_GPU else "needs a CUDA GPU"


# The Mosaic GPU kernels: also JAX >= 0.11.2 and compute capability >= 9.0.
MOSAIC_MISSING = _mosaic_missing()
NEEDS_MOSAIC = pytest.mark.skipif(bool(MOSAIC_MISSING), reason=MOSAIC_MISSING)
# The compiled GPU backends of the decode kernels, each a test parameter.
DECODE_BACKENDS = ["triton", pytest.param("mosaic", marks=NEEDS_MOSAIC)]

# name -> (KV heads, query heads per KV head, head dim)
MODELS = {"llama3.1-8b": (8, 4, 128), "qwen2.5-0.5b": (2, 7, 64)}
DTYPES = [jnp.float32, jnp.bfloat16]
# (rtol, atol) of a kernel against its jnp reference on the same device
TOLERANCES = {"float32": (5e-5, 5e-5), "bfloat16": (2e-2, 2e-2)}


def normal(key, shape, dtype):
    """Standard normal values pushed 0.05 away from 0 (inputs are never zeros)."""
    x = jax.random.normal(key, shape, jnp.float32)
    return (x + jnp.where(x >= 0, 0.05, -0.05)).astype(dtype)


def ragged_lengths(batch: int, capacity: int) -> jnp.ndarray:
    """Row 0 full, the others shorter by an odd amount (ragged pages and blocks)."""
    return jnp.asarray([capacity] + [capacity * 3 // 5 + 37 * (i + 1) for i in
                                     range(batch - 1)], jnp.int32)


def distinct_slots(key, lengths, kv_heads: int, capacity: int, m: int,
                   num_invalid: int) -> jnp.ndarray:
    """[B, K, m] int32 distinct slots below each row's length (m <= every length), in
    random order, `num_invalid` of them -1 at random places."""
    B = lengths.shape[0]
    k1, k2 = jax.random.split(key)
    u = jax.random.uniform(k1, (B, kv_heads, capacity))
    u = jnp.where(jnp.arange(capacity) < lengths[:, None, None], u, 2.0)  # [B, K, C]
    slots = jnp.argsort(u, axis=-1)[..., :m]  # [B, K, m] the m smallest: valid, distinct
    slots = slots.at[..., :num_invalid].set(-1)
    return slots[..., jax.random.permutation(k2, m)].astype(jnp.int32)


def page_bounds(keys, lengths, page_size: int):
    """Channel-major page max/min [B, K, D, P] of keys [B, K, C, D] over each row's valid
    slots (-inf / +inf where a page has none), as the stage-2 plans keep them."""
    B, K, C, D = keys.shape
    P = -(-C // page_size)
    valid = jnp.arange(P * page_size)[None, :] < lengths[:, None]  # [B, P * page]
    padded = jnp.pad(keys.astype(jnp.float32), ((0, 0), (0, 0), (0, P * page_size - C),
                                                (0, 0)))
    v = valid[:, None, :, None]
    hi = jnp.where(v, padded, -jnp.inf).reshape(B, K, P, page_size, D).max(axis=3)
    lo = jnp.where(v, padded, jnp.inf).reshape(B, K, P, page_size, D).min(axis=3)
    return (jnp.swapaxes(hi, 2, 3).astype(keys.dtype),  # [B, K, D, P]
            jnp.swapaxes(lo, 2, 3).astype(keys.dtype))

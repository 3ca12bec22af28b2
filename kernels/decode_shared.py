"""What the Triton and the Mosaic GPU versions of the two decode kernels share: the argument
checks, approx_scores' fold of the group's query sign into the selected channels, and the
log-sum-exp combine of flash-decoding partials (run in XLA after either kernel).

A module of its own so that `<op>.py` (the Triton kernel, the reference and the dispatcher)
and `<op>_mgpu.py` (the Mosaic GPU kernel) both import it and neither imports the other's
internals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def check_scores_args(q, page_max, page_min, channels, lengths, page_size, channel_major):
    """Raise ValueError unless the arguments of `approx_scores` fit together."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, K, G, D], got shape {q.shape}")
    b, kv, _, d = q.shape
    if page_max.shape != page_min.shape or page_max.ndim != 4:
        raise ValueError(
            f"page_max/page_min must both be [B, K, P, D], got {page_max.shape} and "
            f"{page_min.shape}"
        )
    meta_d = page_max.shape[2] if channel_major else page_max.shape[3]
    if page_max.shape[:2] != (b, kv) or meta_d != d:
        layout = "[B, K, D, P]" if channel_major else "[B, K, P, D]"
        raise ValueError(
            f"page metadata {page_max.shape} does not match q {q.shape} (layout {layout})"
        )
    if channels.ndim != 3 or channels.shape[:2] != (b, kv):
        raise ValueError(f"channels must be [B, K, R] = [{b}, {kv}, R], got {channels.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B] = [{b}], got {lengths.shape}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")


def channel_signs(q: jax.Array, channels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (Qh [B, K, G, R] f32, use_max [B, K, R] bool) for the selected channels."""
    q32 = q.astype(jnp.float32)  # [B, K, G, D]
    sign = jnp.sign(q32.sum(axis=2))  # [B, K, D]
    sign_sel = jnp.take_along_axis(sign, channels, axis=-1)  # [B, K, R]
    q_sel = jnp.take_along_axis(q32, channels[:, :, None, :], axis=-1)  # [B, K, G, R]
    return q_sel * sign_sel[:, :, None, :], sign_sel > 0


def check_attention_args(q, k, v, indices):
    """Raise ValueError unless the arguments of `sparse_decode_attention` fit together."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, K, G, D], got shape {q.shape}")
    b, kv, _, d = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[:2] != (b, kv) or k.shape[3] != d:
        raise ValueError(
            f"k and v must both be [B, K, C, D] = [{b}, {kv}, C, {d}], got {k.shape} and "
            f"{v.shape}"
        )
    if indices.ndim != 3 or indices.shape[:2] != (b, kv):
        raise ValueError(f"indices must be [B, K, M] = [{b}, {kv}, M], got {indices.shape}")


def combine_splits(acc: jax.Array, row_max: jax.Array, denom: jax.Array) -> jax.Array:
    """Log-sum-exp combine of flash-decoding partials.

    Args:
      acc: [B, K, S, Gp, Dp] unnormalized partial outputs; row_max, denom: [B, K, S, Gp]
        running max and softmax denominators (a split with no valid token has denom = 0).

    Returns:
      [B, K, Gp, Dp] float32 attention output; 0 for rows with no valid token.
    """
    global_max = row_max.max(axis=2)  # [B, K, Gp]
    # Upstream decode_attention.py keeps this barrier against NaNs after XLA fusion.
    global_max = lax.optimization_barrier(global_max)
    weight = jnp.exp(row_max - global_max[:, :, None])  # [B, K, S, Gp]
    total = (weight * denom).sum(axis=2)  # [B, K, Gp]
    out = (weight[..., None] * acc).sum(axis=2)  # [B, K, Gp, Dp]
    return out / jnp.where(total > 0, total, 1.0)[..., None]

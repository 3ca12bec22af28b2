"""The two stage-2 primitives that have GPU kernels, behind one dispatch point.

`approx_scores` (per-page upper bound of q.k on R of the D channels) and
`sparse_decode_attention` (exact attention on gathered token indices) follow the
contracts of `kernels/approx_scores.py` and `kernels/sparse_decode_attention.py`. This
module is the single place where those kernels get plugged in: the methods call only
the two public functions here, passing the plan's `kernels` backend name.

Today every backend runs the jnp versions below ("auto" resolves to them on any device);
asking for "interpret" or "triton" raises until the kernels are wired in here.
`jax.lax.top_k` stays in XLA either way (Pallas-Triton has no sort).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..models.layers import NEG_INF

KERNEL_BACKENDS = ("reference", "interpret", "triton", "auto")


def check_kernels(name: str, kernels: str) -> None:
    """Raise if `kernels` is not a known backend name (called in method constructors)."""
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(
            f"{name}: unknown kernels backend {kernels!r}; expected one of "
            f"{', '.join(KERNEL_BACKENDS)}"
        )


def _use_reference(kernels: str) -> bool:
    check_kernels("sparse_ops", kernels)
    if kernels in ("reference", "auto"):
        return True
    raise NotImplementedError(
        f"kernels={kernels!r}: the Pallas kernels are not plugged into "
        "rocketkv_jax/methods/sparse_ops.py yet; use kernels='reference' or 'auto'"
    )


def approx_scores(
    q: jax.Array,
    page_max: jax.Array,
    page_min: jax.Array,
    channels: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    kernels: str = "reference",
) -> jax.Array:
    """Stage-2 approximate page scores.

    q [B, K, G, D]; page_max, page_min [B, K, P, D]; channels [B, K, R] int32;
    lengths [B] int32 filled slots per row. Returns [B, K, G, P] float32, -inf for pages
    with no filled slot (never NaN).
    """
    if _use_reference(kernels):
        return _approx_scores_jnp(q, page_max, page_min, channels, lengths, page_size=page_size)
    raise AssertionError("unreachable")


def sparse_decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, *, kernels: str = "reference"
) -> jax.Array:
    """Exact attention of each group's queries on its selected slots.

    q [B, K, G, D]; k, v [B, K, C, D]; indices [B, K, M] int32 slot indices, -1 = none.
    Returns [B, K, G, D] in q's dtype; a head with no selected slot gets zeros.
    """
    if _use_reference(kernels):
        return _sparse_decode_attention_jnp(q, k, v, indices)
    raise AssertionError("unreachable")


def _approx_scores_jnp(q, page_max, page_min, channels, lengths, *, page_size):
    """jnp version of `approx_scores` (see there for shapes)."""
    q32 = q.astype(jnp.float32)  # [B, K, G, D]
    sign = jnp.sign(q32.sum(axis=2))  # [B, K, D]
    sign_r = jnp.take_along_axis(sign, channels, axis=-1)  # [B, K, R]
    q_hat = jnp.take_along_axis(q32, channels[:, :, None, :], axis=-1)  # [B, K, G, R]
    q_hat = q_hat * sign_r[:, :, None, :]
    idx = channels[:, :, None, :]  # [B, K, 1, R]
    kmax = jnp.take_along_axis(page_max, idx, axis=-1).astype(jnp.float32)  # [B, K, P, R]
    kmin = jnp.take_along_axis(page_min, idx, axis=-1).astype(jnp.float32)  # [B, K, P, R]
    k_hat = jnp.where(sign_r[:, :, None, :] > 0, kmax, -kmin)  # [B, K, P, R]
    num_pages = page_max.shape[2]
    filled = jnp.arange(num_pages)[None, :] * page_size < lengths[:, None]  # [B, P]
    # Empty pages hold -inf/+inf: zero them before the product so no inf * 0 makes a NaN.
    k_hat = jnp.where(filled[:, None, :, None], k_hat, 0.0)
    approx = jnp.einsum(
        "bkgr,bkpr->bkgp", q_hat, k_hat, precision=jax.lax.Precision.HIGHEST
    )  # [B, K, G, P]
    return jnp.where(filled[:, None, None, :], approx, -jnp.inf)


def _sparse_decode_attention_jnp(q, k, v, indices):
    """jnp version of `sparse_decode_attention` (see there for shapes)."""
    D = q.shape[-1]
    selected = indices >= 0  # [B, K, M]
    idx = jnp.maximum(indices, 0)[..., None]  # [B, K, M, 1]
    k_sel = jnp.take_along_axis(k, idx, axis=2).astype(jnp.float32)  # [B, K, M, D]
    v_sel = jnp.take_along_axis(v, idx, axis=2).astype(jnp.float32)  # [B, K, M, D]
    logits = jnp.einsum(
        "bkgd,bkmd->bkgm", q.astype(jnp.float32), k_sel, precision=jax.lax.Precision.HIGHEST
    ) / jnp.sqrt(jnp.float32(D))  # [B, K, G, M]
    logits = jnp.where(selected[:, :, None, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(selected[:, :, None, :], probs, 0.0)  # [B, K, G, M]
    out = jnp.einsum(
        "bkgm,bkmd->bkgd", probs, v_sel, precision=jax.lax.Precision.HIGHEST
    )  # [B, K, G, D]
    return out.astype(q.dtype)

"""The two stage-2 primitives that have GPU kernels, behind one dispatch point.

`approx_scores` (per-page upper bound of q.k on R of the D channels) and
`sparse_decode_attention` (exact attention on gathered token indices) follow the
contracts of `kernels/approx_scores.py` and `kernels/sparse_decode_attention.py`. This
module is the single place where those kernels get plugged in: the methods call only
the two public functions here, passing the plan's `kernels` backend name.

Backends: "reference" runs the kernels' pure-jnp references (any device), "interpret"
the Pallas kernels in the Pallas interpreter (CPU tests), "triton" the Triton-lowered
kernels (CUDA), and "auto" Triton on a GPU and the references elsewhere; the choice itself
lives in `kernels/backend.py`. `jax.lax.top_k` stays in XLA either way (Pallas-Triton has
no sort).
"""

from __future__ import annotations

import jax

from .. import kernels as kernel_lib
from ..names import KERNEL_BACKENDS


def check_kernels(name: str, kernels: str) -> None:
    """Raise if `kernels` is not a known backend name (called in method constructors)."""
    if kernels not in KERNEL_BACKENDS:
        raise ValueError(
            f"{name}: unknown kernels backend {kernels!r}; expected one of "
            f"{', '.join(KERNEL_BACKENDS)}"
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
    channel_major: bool = False,
) -> jax.Array:
    """Stage-2 approximate page scores.

    q [B, K, G, D]; page_max, page_min [B, K, P, D] ([B, K, D, P] if `channel_major`);
    channels [B, K, R] int32;
    lengths [B] int32 filled slots per row. Returns [B, K, G, P] float32, -inf for pages
    with no filled slot (never NaN).
    """
    check_kernels("approx_scores", kernels)
    return kernel_lib.approx_scores(
        q, page_max, page_min, channels, lengths, page_size=page_size, backend=kernels,
        channel_major=channel_major,
    )


def sparse_decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, *, kernels: str = "reference"
) -> jax.Array:
    """Exact attention of each group's queries on its selected slots.

    q [B, K, G, D]; k, v [B, K, C, D]; indices [B, K, M] int32 slot indices, -1 = none.
    Returns [B, K, G, D] in q's dtype; a head with no selected slot gets zeros.
    """
    check_kernels("sparse_decode_attention", kernels)
    return kernel_lib.sparse_decode_attention(q, k, v, indices, backend=kernels)

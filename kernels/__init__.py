"""Pallas GPU kernels (Triton lowering) of RocketKV's stage 2, each with a pure-jnp reference.

`approx_scores` scores pages with an upper bound read from R selected channels of the page
key max/min; XLA's top_k then picks tokens; `sparse_decode_attention` attends exactly over
them. The backend ("auto", "reference", "interpret", "triton") is chosen in `backend.py`.
"""

from .approx_scores import approx_scores, approx_scores_reference
from .backend import BACKENDS, Backend, resolve_backend
from .sparse_decode_attention import (
    sparse_decode_attention,
    sparse_decode_attention_reference,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "approx_scores",
    "approx_scores_reference",
    "resolve_backend",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
]

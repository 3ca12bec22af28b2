"""`rocketkv_jax.kernels`: this folder, installed under that name (pyproject's package-dir;
a top-level `kernels` package would collide with the HF `kernels` package transformers
imports). `from rocketkv_jax.kernels.backend import choose` reads kernels/backend.py.

Pallas GPU kernels (Triton lowering), each with a pure-jnp reference beside it.

Decode (RocketKV's stage 2): `approx_scores` scores pages with an upper bound read from R
selected channels of the page key max/min; XLA's top_k then picks tokens;
`sparse_decode_attention` attends exactly over them.

Prefill: `prefill_attention` is flash-style causal GQA attention of a block of queries
(a whole prompt, or one chunk at q_start) over the KV buffer, with per-row lengths and
Mistral's sliding window; its reference `prefill_attention_reference` is also the CPU path.

Each kernel file holds the Pallas kernel (`<op>_pallas`, `interpret=` for the Pallas
interpreter), its pure-jnp reference (`<op>_reference`) and `<op>(..., kernels=...)`, which
runs the one `backend.choose` picks for a backend name ("reference", "interpret",
"triton", "mosaic", "auto"; `rocketkv_jax.names.KERNEL_BACKENDS`). The decode kernels also
have Mosaic GPU versions for Hopper (`<op>_mosaic` in `<op>_mgpu.py`, JAX >= 0.11.2;
`interpret=` runs the Mosaic GPU interpreter).
"""

from .approx_scores import approx_scores, approx_scores_pallas, approx_scores_reference
from .approx_scores_mgpu import approx_scores_mosaic
from .backend import (
    BACKENDS,
    KernelsUnavailableError,
    available_backends,
    check_available,
    choose,
    prefill_backend,
    resolve_backend,
)
from .prefill_attention import (
    prefill_attention,
    prefill_attention_pallas,
    prefill_attention_reference,
)
from .sparse_decode_attention import (
    sparse_decode_attention,
    sparse_decode_attention_pallas,
    sparse_decode_attention_reference,
)
from .sparse_decode_attention_mgpu import sparse_decode_attention_mosaic

__all__ = [
    "BACKENDS",
    "KernelsUnavailableError",
    "approx_scores",
    "approx_scores_mosaic",
    "approx_scores_pallas",
    "approx_scores_reference",
    "available_backends",
    "check_available",
    "choose",
    "prefill_backend",
    "prefill_attention",
    "prefill_attention_pallas",
    "prefill_attention_reference",
    "resolve_backend",
    "sparse_decode_attention",
    "sparse_decode_attention_mosaic",
    "sparse_decode_attention_pallas",
    "sparse_decode_attention_reference",
]

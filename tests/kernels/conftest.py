"""One kernel test body, two runs (as JAX's own Pallas GPU tests do): in the Pallas
interpreter always, and lowered through Triton where a CUDA GPU is present."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(params=[True, False], ids=["interpret", "triton"])
def interpret(request) -> bool:
    """The kernels' `interpret=` argument: True runs the Pallas interpreter (any device),
    False the Triton kernel (skipped without a GPU)."""
    if not request.param and jax.default_backend() != "gpu":
        pytest.skip("the Triton kernel needs a CUDA GPU")
    return request.param

"""Backend selection: one place, clear errors."""

from __future__ import annotations

import jax
import pytest

from rocketkv_jax.kernels import BACKENDS, resolve_backend
from rocketkv_jax.kernels.backend import is_pallas, next_power_of_2, pallas_call


def test_backend_names():
    from rocketkv_jax.names import KERNEL_BACKENDS

    assert set(BACKENDS) == {"auto", "reference", "interpret", "triton"}
    assert BACKENDS is KERNEL_BACKENDS  # one tuple, the one the CLI offers


@pytest.mark.parametrize("name", ["reference", "interpret", "triton"])
def test_explicit_backends_resolve_to_themselves(name):
    assert resolve_backend(name) == name


def test_auto_follows_the_default_device():
    expected = "triton" if jax.default_backend() == "gpu" else "reference"
    assert resolve_backend("auto") == expected
    assert is_pallas("auto") == (expected == "triton")


@pytest.mark.parametrize("name", ["gpu", "Triton", "", "mosaic"])
def test_unknown_backend_is_a_clear_error(name):
    with pytest.raises(ValueError, match="unknown kernel backend.*expected one of"):
        resolve_backend(name)


def test_pallas_call_refuses_reference():
    with pytest.raises(ValueError, match="Pallas backend"):
        pallas_call(lambda: None, backend="reference", out_shape=None, grid=(1,), in_specs=[],
                    out_specs=None, num_warps=4, num_stages=2, name="x")


@pytest.mark.parametrize("n,expected", [(0, 1), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32)])
def test_next_power_of_2(n, expected):
    assert next_power_of_2(n) == expected

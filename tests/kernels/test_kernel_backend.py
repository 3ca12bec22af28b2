"""Backend selection: one place, clear errors."""

from __future__ import annotations

import functools

import jax
import pytest

from rocketkv_jax.kernels import (
    BACKENDS,
    KernelsUnavailableError,
    available_backends,
    check_available,
    choose,
    resolve_backend,
)
from rocketkv_jax.kernels.backend import next_power_of_2


def test_backend_names():
    from rocketkv_jax.names import KERNEL_BACKENDS

    assert set(BACKENDS) == {"auto", "reference", "interpret", "triton"}
    assert BACKENDS is KERNEL_BACKENDS  # one tuple, the one the CLI offers


@pytest.mark.parametrize("name", ["reference", "interpret", "triton"])
def test_explicit_backends_resolve_to_themselves(name):
    assert resolve_backend(name) == name


def kernel(*, interpret):
    return "interpret" if interpret else "triton"


def reference():
    return "reference"


@pytest.mark.parametrize("name", ["reference", "interpret", "triton"])
def test_choose_runs_what_the_name_says(name):
    run = choose(name, pallas=kernel, reference=reference)
    assert run() == name
    if name != "reference":
        assert isinstance(run, functools.partial) and run.func is kernel


def test_auto_follows_the_default_device():
    expected = "triton" if jax.default_backend() == "gpu" else "reference"
    assert resolve_backend("auto") == expected
    assert choose("auto", pallas=kernel, reference=reference)() == expected


@pytest.mark.parametrize("name", ["gpu", "Triton", "", "mosaic"])
def test_unknown_backend_is_a_clear_error(name):
    with pytest.raises(ValueError, match="unknown kernel backend.*expected one of"):
        resolve_backend(name)
    with pytest.raises(ValueError, match="unknown kernel backend.*expected one of"):
        choose(name, pallas=kernel, reference=reference)


@pytest.mark.parametrize("n,expected", [(0, 1), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32)])
def test_next_power_of_2(n, expected):
    assert next_power_of_2(n) == expected


def test_available_backends_and_refusal_name_what_runs_here():
    on_gpu = jax.default_backend() == "gpu"
    assert available_backends() == (("reference", "interpret", "triton", "auto") if on_gpu
                                    else ("reference", "interpret", "auto"))
    for name in available_backends():
        assert check_available(name) == resolve_backend(name)
    if not on_gpu:
        with pytest.raises(KernelsUnavailableError) as e:
            check_available("triton")
        assert str(e.value) == (
            f"the Triton kernels need a CUDA GPU, but JAX {jax.__version__} runs on cpu; "
            "available here: reference, interpret, auto (= reference here)")
        assert isinstance(e.value, ValueError)  # the CLI's one-line errors

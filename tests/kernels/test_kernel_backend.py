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
    prefill_backend,
    resolve_backend,
)
from rocketkv_jax.kernels import backend as backend_lib
from rocketkv_jax.kernels.backend import next_power_of_2

ON_GPU = jax.default_backend() == "gpu"
MOSAIC_JAX = backend_lib.mosaic_jax_ok()


def test_backend_names():
    from rocketkv_jax.names import KERNEL_BACKENDS

    assert set(BACKENDS) == {"auto", "reference", "interpret", "triton", "mosaic"}
    assert BACKENDS is KERNEL_BACKENDS  # one tuple, the one the CLI offers


@pytest.mark.parametrize("name", ["reference", "interpret", "triton", "mosaic"])
def test_explicit_backends_resolve_to_themselves(name):
    assert resolve_backend(name) == name


def kernel(*, interpret):
    return "interpret" if interpret else "triton"


def mosaic_kernel(*, interpret):
    return "mosaic-interpret" if interpret else "mosaic"


def reference():
    return "reference"


@pytest.mark.parametrize("name", ["reference", "interpret", "triton", "mosaic"])
def test_choose_runs_what_the_name_says(name):
    run = choose(name, pallas=kernel, reference=reference, mosaic=mosaic_kernel)
    assert run() == name
    if name in ("interpret", "triton"):
        assert isinstance(run, functools.partial) and run.func is kernel
    if name == "mosaic":
        assert isinstance(run, functools.partial) and run.func is mosaic_kernel


def test_an_op_without_a_mosaic_kernel_runs_its_reference_under_mosaic():
    assert choose("mosaic", pallas=kernel, reference=reference)() == "reference"
    assert prefill_backend("mosaic") == "reference"  # what the stats line says
    for name in ("reference", "interpret", "triton"):
        assert prefill_backend(name) == name


def test_auto_follows_the_default_device():
    expected = "triton" if ON_GPU else "reference"
    assert resolve_backend("auto") == expected
    assert choose("auto", pallas=kernel, reference=reference, mosaic=mosaic_kernel)() == expected


def test_auto_picks_mosaic_where_triton_is_gone(monkeypatch):
    """A JAX without Pallas Triton on a Hopper GPU: auto runs the Mosaic GPU kernels; with
    neither, the references."""
    monkeypatch.setattr(backend_lib, "pallas_triton", None)
    monkeypatch.setattr(backend_lib, "mosaic_runs_here", lambda: True)
    assert resolve_backend("auto") == "mosaic"
    assert choose("auto", pallas=kernel, reference=reference, mosaic=mosaic_kernel)() == "mosaic"
    monkeypatch.setattr(backend_lib, "mosaic_runs_here", lambda: False)
    assert resolve_backend("auto") == "reference"


def test_auto_keeps_triton_where_both_run(monkeypatch):
    monkeypatch.setattr(backend_lib, "triton_runs_here", lambda: True)
    monkeypatch.setattr(backend_lib, "mosaic_runs_here", lambda: True)
    assert resolve_backend("auto") == "triton"


@pytest.mark.parametrize("name", ["gpu", "Triton", "", "Mosaic", "mosaic-gpu"])
def test_unknown_backend_is_a_clear_error(name):
    with pytest.raises(ValueError, match="unknown kernel backend.*expected one of"):
        resolve_backend(name)
    with pytest.raises(ValueError, match="unknown kernel backend.*expected one of"):
        choose(name, pallas=kernel, reference=reference)


@pytest.mark.parametrize("n,expected", [(0, 1), (1, 1), (2, 2), (3, 4), (16, 16), (17, 32)])
def test_next_power_of_2(n, expected):
    assert next_power_of_2(n) == expected


@pytest.mark.skipif(ON_GPU, reason="a GPU is present")
def test_available_backends_and_refusals_name_what_runs_here():
    assert available_backends() == ("reference", "interpret", "auto")
    for name in available_backends():
        assert check_available(name) == resolve_backend(name)
    here = "available here: reference, interpret, auto (= reference here)"
    with pytest.raises(KernelsUnavailableError) as e:
        check_available("triton")
    assert str(e.value) == (
        f"the Triton kernels need a CUDA GPU, but JAX {jax.__version__} runs on cpu; {here}")
    assert isinstance(e.value, ValueError)  # the CLI's one-line errors
    with pytest.raises(KernelsUnavailableError) as e:
        check_available("mosaic")
    need = ("the Mosaic GPU kernels need JAX >= 0.11.2 and a CUDA GPU of compute capability "
            ">= 9.0 (Hopper or newer)")
    but = (f"JAX {jax.__version__} runs on cpu" if MOSAIC_JAX
           else f"this is JAX {jax.__version__}")
    assert str(e.value) == f"{need}, but {but}; {here}"


def test_mosaic_refused_on_an_older_gpu(monkeypatch):
    """A GPU older than Hopper (no TMA copies with barriers): the capability is named."""
    if not MOSAIC_JAX:
        pytest.skip(f"JAX {jax.__version__} is refused before the GPU is looked at")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(backend_lib, "cuda_capability", lambda: (8, 0))
    assert "but " in backend_lib.mosaic_missing() and " is 8.0" in backend_lib.mosaic_missing()
    monkeypatch.setattr(backend_lib, "cuda_capability", lambda: (9, 0))
    assert backend_lib.mosaic_missing() == ""

"""The one place where a kernel backend is chosen.

Each kernel file holds the Pallas kernel (`<op>_pallas(..., interpret=False)`) and its
pure-jnp reference (`<op>_reference`); `<op>(..., kernels=...)` runs the one that `choose`
picks for a backend name (the names are `rocketkv_jax.names.KERNEL_BACKENDS`; the option is
called `kernels` everywhere, from `--kernels` down to here):
  - "auto" (the default everywhere): the Triton-lowered Pallas kernel when JAX's default
    backend is a GPU, otherwise the pure-jnp reference.
  - "reference": the pure-jnp reference beside each kernel (XLA on any device).
  - "interpret": the Pallas kernel run by the Pallas interpreter (`interpret=True`). Slow; for
    CPU tests of the kernel body.
  - "triton": the Pallas kernel lowered through Triton. Needs a CUDA GPU to run; on a CPU-only
    machine it can still be lowered with `lower(lowering_platforms=("cuda",))`.

Why Triton params are always passed explicitly: `pallas_call` picks its GPU lowering from the
type of `compiler_params`. Without any, JAX 0.10 lowers GPU kernels with Mosaic GPU, which these
kernels are not written for (they use `plgpu.load` masks and pointer gathers). Pallas-Triton is
deprecated upstream from JAX 0.11 (see docs/kernels.md for the migration path); keeping the choice
here means a future Mosaic GPU or jax-triton port only touches this file and the kernel bodies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..names import KERNEL_BACKENDS as BACKENDS


class KernelsUnavailableError(ValueError):
    """A kernel backend this process cannot run (Triton without a CUDA GPU)."""


def resolve_backend(kernels: str) -> str:
    """Maps a requested backend name to the one that runs ("auto" is resolved here).

    Called at plan and trace time (the backend is a static argument), so "auto" follows the
    default device of the process.
    """
    if kernels not in BACKENDS:
        raise ValueError(
            f"unknown kernel backend {kernels!r}; expected one of {', '.join(BACKENDS)}. "
            "Use 'auto' to get the Triton kernel on GPU and the jnp reference elsewhere."
        )
    if kernels == "auto":
        return "triton" if triton_runs_here() else "reference"
    return kernels


def triton_runs_here() -> bool:
    """Whether the Triton-lowered kernels can run in this process: JAX's default backend is
    a GPU (the kernels import Pallas' Triton module, so this JAX has it)."""
    return jax.default_backend() == "gpu"


def available_backends() -> tuple[str, ...]:
    """The backend names this process can run, in `BACKENDS` order."""
    return tuple(b for b in BACKENDS if b != "triton" or triton_runs_here())


def check_available(kernels: str) -> str:
    """`resolve_backend(kernels)`, refusing a backend this machine or JAX cannot run with a
    message that names the ones it can (KernelsUnavailableError, a ValueError)."""
    resolved = resolve_backend(kernels)
    if resolved == "triton" and not triton_runs_here():
        here = ", ".join(f"{b} (= {resolve_backend(b)} here)" if b == "auto" else b
                         for b in available_backends())
        raise KernelsUnavailableError(
            f"the Triton kernels need a CUDA GPU, but JAX {jax.__version__} runs on "
            f"{jax.default_backend()}; available here: {here}")
    return resolved


def choose(kernels: str, *, pallas: Callable[..., Any], reference: Callable[..., Any]):
    """The implementation `kernels` names: `reference`, or the Pallas kernel `pallas` with
    `interpret=` set (True: the Pallas interpreter; False: lowered through Triton).

    The only place a backend name picks code; each kernel's `<op>(..., kernels=...)` calls
    it at trace time with its own `<op>_pallas` and `<op>_reference`.
    """
    resolved = resolve_backend(kernels)
    if resolved == "reference":
        return reference
    return functools.partial(pallas, interpret=resolved == "interpret")


def pallas_call(
    kernel: Callable[..., None],
    *,
    interpret: bool,
    out_shape: Any,
    grid: tuple[int, ...],
    in_specs: Sequence[Any],
    out_specs: Any,
    num_warps: int,
    num_stages: int,
    name: str,
    input_output_aliases: dict[int, int] | None = None,
) -> Callable[..., Any]:
    """`pl.pallas_call` for the Pallas interpreter (`interpret`) or the Triton lowering, which
    always gets explicit `plgpu.CompilerParams` so that Triton (not Mosaic GPU) is used."""
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=input_output_aliases or {},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )


def next_power_of_2(n: int) -> int:
    """Smallest power of 2 that is >= n (and >= 1). Triton arrays need power-of-2 sizes."""
    return 1 << max(0, int(n) - 1).bit_length()

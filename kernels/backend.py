"""The one place where a kernel backend is chosen.

Each kernel file holds the Pallas-Triton kernel (`<op>_pallas(..., interpret=False)`) and its
pure-jnp reference (`<op>_reference`); the decode kernels also have a Mosaic GPU version
(`<op>_mosaic`, `<op>_mgpu.py`). `<op>(..., kernels=...)` runs the one that `choose` picks
for a backend name (the names are `rocketkv_jax.names.KERNEL_BACKENDS`; the option is
called `kernels` everywhere, from `--kernels` down to here):
  - "auto" (the default everywhere): the Triton kernels on a GPU while this JAX has Pallas
    Triton, the Mosaic GPU kernels on a Hopper-or-newer GPU where it does not, otherwise
    the pure-jnp references.
  - "reference": the pure-jnp reference beside each kernel (XLA on any device).
  - "interpret": the Pallas-Triton kernel run by the Pallas interpreter (`interpret=True`).
    Slow; for CPU tests of the kernel body.
  - "triton": the Pallas kernel lowered through Triton. Needs a CUDA GPU to run; on a CPU-only
    machine it can still be lowered with `lower_for_cuda`.
  - "mosaic": the Mosaic GPU kernels (JAX >= 0.11.2, a GPU of compute capability >= 9.0).
    The prefill attention has no Mosaic kernel yet and runs its reference
    (`prefill_backend`). Tests run them in the Mosaic GPU interpreter through the
    kernels' own `interpret=` or `plgpu.force_gpu_interpret_mode`, not through a name.

Why Triton params are always passed explicitly: `pallas_call` picks its GPU lowering from the
type of `compiler_params`. Without any, JAX 0.10 lowers GPU kernels with Mosaic GPU, which the
Triton kernels are not written for (they use `plgpu.load` masks and pointer gathers).
Pallas-Triton is deprecated upstream from JAX 0.11 (docs/kernels.md): from then on every
Triton lowering warns about that deprecation; the places that lower our programs enter
`triton_lowering()`, which accepts exactly that warning and nothing else, and CUDA lowering
without a GPU goes through `lower_for_cuda`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.experimental import pallas as pl

from ..names import KERNEL_BACKENDS as BACKENDS

try:  # deprecated upstream from JAX 0.11, to be removed: the Triton kernels need it
    from jax.experimental.pallas import triton as pallas_triton
except ImportError:  # pragma: no cover - a JAX without Pallas Triton
    pallas_triton = None

# The Mosaic GPU kernels use `plgpu.kernel` as JAX 0.11.2 and 0.12 have it: both lower them
# for an H100 and run them in the Mosaic GPU interpreter (0.10's API differs). 0.11.2 is
# what the lent GPU machines run. Their TMA copies with barriers need Hopper (sm_90).
MOSAIC_MIN_JAX = (0, 11, 2)
MOSAIC_MIN_CAPABILITY = (9, 0)


def mosaic_jax_ok() -> bool:
    """Whether this JAX has the Mosaic GPU API the kernels are written for."""
    return tuple(jax.__version_info__[:3]) >= MOSAIC_MIN_JAX


class KernelsUnavailableError(ValueError):
    """A kernel backend this process cannot run (Triton without a CUDA GPU, Mosaic GPU
    without JAX >= 0.11.2 and a Hopper GPU)."""


def check_backend_name(kernels: object, what: str = "") -> str:
    """`kernels` if it names a backend (`BACKENDS`), else ValueError listing them: the one
    check of a backend name, for the methods' settings and the model's prefill too."""
    if kernels not in BACKENDS:
        raise ValueError(
            f"{what + ': ' if what else ''}unknown kernel backend {kernels!r}; expected one "
            f"of {', '.join(BACKENDS)}. Use 'auto' to get the GPU kernels on a GPU and the "
            "jnp references elsewhere."
        )
    return kernels


def resolve_backend(kernels: str) -> str:
    """Maps a requested backend name to the one that runs ("auto" is resolved here).

    Called at plan and trace time (the backend is a static argument), so "auto" follows the
    default device of the process.
    """
    check_backend_name(kernels)
    if kernels == "auto":
        if triton_runs_here():
            return "triton"
        return "mosaic" if mosaic_runs_here() else "reference"
    return kernels


def triton_runs_here() -> bool:
    """Whether the Triton-lowered kernels can run in this process: this JAX has Pallas
    Triton and its default backend is a GPU."""
    return pallas_triton is not None and jax.default_backend() == "gpu"


def mosaic_missing() -> str:
    """What keeps the Mosaic GPU kernels from running in this process ("" if nothing):
    JAX >= 0.11.2 and a default GPU of compute capability >= 9.0 (Hopper or newer)."""
    want = (f"the Mosaic GPU kernels need JAX >= {'.'.join(map(str, MOSAIC_MIN_JAX))} and a "
            f"CUDA GPU of compute capability >= {'.'.join(map(str, MOSAIC_MIN_CAPABILITY))} "
            "(Hopper or newer)")
    if not mosaic_jax_ok():
        return f"{want}, but this is JAX {jax.__version__}"
    if jax.default_backend() != "gpu":
        return f"{want}, but JAX {jax.__version__} runs on {jax.default_backend()}"
    capability = cuda_capability()
    if capability < MOSAIC_MIN_CAPABILITY:
        return f"{want}, but {jax.devices()[0].device_kind} is {'.'.join(map(str, capability))}"
    return ""


def cuda_capability() -> tuple[int, int]:
    """Compute capability of the default GPU ((0, 0) where it does not say)."""
    text = getattr(jax.devices()[0], "compute_capability", "") or ""
    try:
        major, minor = (int(x) for x in str(text).split(".")[:2])
    except ValueError:
        return (0, 0)
    return (major, minor)


def mosaic_runs_here() -> bool:
    """Whether the Mosaic GPU kernels can run in this process (see `mosaic_missing`)."""
    return not mosaic_missing()


def available_backends() -> tuple[str, ...]:
    """The backend names this process can run, in `BACKENDS` order."""
    runs = {"triton": triton_runs_here(), "mosaic": mosaic_runs_here(),
            "interpret": pallas_triton is not None}
    return tuple(b for b in BACKENDS if runs.get(b, True))


def check_available(kernels: str) -> str:
    """`resolve_backend(kernels)`, refusing a backend this machine or JAX cannot run with a
    message that names the ones it can (KernelsUnavailableError, a ValueError)."""
    resolved = resolve_backend(kernels)
    if resolved == "triton" and not triton_runs_here():
        missing = (f"the Triton kernels need a CUDA GPU, but JAX {jax.__version__} runs on "
                   f"{jax.default_backend()}" if pallas_triton is not None else
                   f"the Triton kernels need Pallas Triton, which JAX {jax.__version__} "
                   "no longer has")
    elif resolved == "mosaic":
        missing = mosaic_missing()
    elif resolved == "interpret" and pallas_triton is None:
        missing = ("the Pallas-Triton interpreter needs Pallas Triton, which JAX "
                   f"{jax.__version__} no longer has")
    else:
        return resolved
    if not missing:
        return resolved
    here = ", ".join(f"{b} (= {resolve_backend(b)} here)" if b == "auto" else b
                     for b in available_backends())
    raise KernelsUnavailableError(f"{missing}; available here: {here}")


def choose(
    kernels: str,
    *,
    pallas: Callable[..., Any],
    reference: Callable[..., Any],
    mosaic: Callable[..., Any] | None = None,
):
    """The implementation `kernels` names: `reference`; the Pallas-Triton kernel `pallas`
    with `interpret=` set (True: the Pallas interpreter, False: lowered through Triton); or
    the Mosaic GPU kernel `mosaic` (interpret=False: compiled, unless traced inside
    `plgpu.force_gpu_interpret_mode`). An op without a Mosaic kernel (mosaic=None) runs its
    reference under "mosaic".

    The only place a backend name picks code; each kernel's `<op>(..., kernels=...)` calls
    it at trace time with its own `<op>_pallas`, `<op>_reference` and `<op>_mosaic`.
    """
    resolved = resolve_backend(kernels)
    if resolved == "reference" or (resolved == "mosaic" and mosaic is None):
        return reference
    if resolved == "mosaic":
        return functools.partial(mosaic, interpret=False)
    return functools.partial(pallas, interpret=resolved == "interpret")


def prefill_backend(kernels: str) -> str:
    """The resolved backend the prefill attention runs under `kernels`: Mosaic GPU has no
    prefill kernel yet, so "mosaic" prefills with the jnp reference (what the stats say)."""
    resolved = resolve_backend(kernels)
    return "reference" if resolved == "mosaic" else resolved


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
    always gets explicit Triton `CompilerParams` so that Triton (not Mosaic GPU) is used."""
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=input_output_aliases or {},
        compiler_params=pallas_triton.CompilerParams(num_warps=num_warps,
                                                     num_stages=num_stages),
        interpret=interpret,
        name=name,
    )


def next_power_of_2(n: int) -> int:
    """Smallest power of 2 that is >= n (and >= 1). Triton arrays need power-of-2 sizes."""
    return 1 << max(0, int(n) - 1).bit_length()


# ------------------------------------------------------------------ lowering
# JAX >= 0.11 warns on every Pallas-Triton lowering (`jax-pallas-triton`); we keep Triton on
# purpose (docs/versions.md), so the warning says nothing new to our users.
TRITON_DEPRECATION_MESSAGE = r"The Pallas Triton backend is deprecated"
# The device kind an H100 SXM reports; JAX maps "NVIDIA H100" to compute capability 9.0.
H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"
H100_NUM_SMS = 132


@contextlib.contextmanager
def triton_lowering() -> Iterator[None]:
    """Lower (trace, compile) programs that may hold our Pallas-Triton kernels: inside, JAX's
    Triton deprecation warning is ignored; every other warning passes as before.

    The warning is raised when the enclosing program is lowered, not where `pallas_call` is
    bound, so this wraps the lowering (`programs.compile_program`, `lower_for_cuda`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=TRITON_DEPRECATION_MESSAGE, category=DeprecationWarning
        )
        yield


@contextlib.contextmanager
def cuda_target(device_kind: str = H100_DEVICE_KIND, num_cores: int = H100_NUM_SMS):
    """`triton_lowering()` for a CUDA GPU, present or not.

    On a machine without a GPU, JAX >= 0.11 refuses to lower Pallas-Triton for CUDA ("No
    supported GPU devices found") unless an abstract GPU device says which card to target;
    inside this context that is `device_kind` (an H100 by default). JAX 0.10.2 accepts the
    same abstract device. On a GPU machine the real device is used."""
    with triton_lowering():
        if jax.default_backend() == "gpu":
            yield
            return
        device = jax.sharding.AbstractDevice(
            device_kind=device_kind, num_cores=num_cores, platform="gpu"
        )
        with jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((), (), abstract_device=device)
        ):
            yield


def lower_for_cuda(f: Callable[..., Any], *args: Any, **target: Any) -> jax.stages.Lowered:
    """`jax.jit(f)` traced for `args` (arrays or `jax.ShapeDtypeStruct`s) and lowered for CUDA
    on any machine, GPU or not: this runs the real Pallas->Triton lowering and raises Triton's
    refusals (non-power-of-2 arrays, unsupported primitives). `target`: see `cuda_target`."""
    with cuda_target(**target):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


def mosaic_interpret_params(interpret: Any) -> Any:
    """The `interpret=` of a Mosaic GPU kernel: False/None compiles for the GPU (or defers
    to `plgpu.force_gpu_interpret_mode`), True runs the Mosaic GPU interpreter with race
    detection (a race raises), an `InterpretGPUParams` is passed as it is."""
    if interpret is None or interpret is False:
        return None
    if interpret is True:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        return plgpu.InterpretGPUParams(detect_races=True)
    return interpret

"""Method names -> method objects, with clear errors for unknown names and bad settings.

The names themselves are written once, in `rocketkv_jax/names.py` (JAX-free, so the CLI's
--help, eval and bench can list them); each class here carries its own as `name`.
"""

from __future__ import annotations

import dataclasses

from ..names import METHOD_NAMES, METHOD_VARIANTS, MULTI_TURN_METHOD_NAMES
from .base import MethodConfigError
from .full import Full
from .hybrid import Hybrid
from .multiturn import MULTI_TURN_CLASSES
from .quest import Quest
from .rocketkv import RocketKV
from .snapkv import SnapKV, SnapKVPlusPlus
from .sparq import SparQ
from .sparse_ops import check_kernels
from .streaming import Streaming
from .topk import TopK

METHOD_CLASSES = (Full, Streaming, SnapKV, SnapKVPlusPlus, Quest, SparQ, Hybrid, RocketKV, TopK)
_METHODS = {cls.name: cls for cls in (*METHOD_CLASSES, *MULTI_TURN_CLASSES)}
__all__ = ["METHOD_CLASSES", "METHOD_NAMES", "METHOD_VARIANTS", "make_method", "method_hparams"]


def method_hparams(name: str) -> tuple[str, ...]:
    """Hyperparameters `make_method` accepts for `name` besides token_budget."""
    return tuple(f.name for f in dataclasses.fields(_METHODS[name]) if f.name != "token_budget")


def make_method(name: str, token_budget: int | None = None, **hparams):
    """Build a KV method by name.

    token_budget: M, KV tokens' worth read per decode step per KV head; required by every
    method except `full` (which ignores it, so a sweep can pass one budget to all names).
    hparams: optional overrides (window, kernel_size, page_size, top_r, sinks, depending on
    the method; see `method_hparams`). A value of None keeps the default. `kernels` (the
    stage-2 kernel backend, one of names.KERNEL_BACKENDS) is accepted for every method
    and dropped by those that run no kernel (full, streaming, snapkv, snapkv++), so one
    setting can be passed to all names.
    A name of METHOD_VARIANTS (e.g. "rocket_r0.5") builds its base method with the
    variant's settings, which other hparams may not contradict.
    Raises MethodConfigError (a ValueError) for an unknown name or hyperparameter, a missing
    or non-positive budget, and settings the method rejects.
    """
    if not isinstance(name, str):
        raise MethodConfigError(f"the method name must be a str such as 'rocketkv', got "
                                f"{type(name).__name__}")
    if name in METHOD_VARIANTS:
        base, fixed = METHOD_VARIANTS[name]
        clash = sorted(k for k, v in fixed.items() if hparams.get(k) not in (None, v))
        if clash:
            raise MethodConfigError(
                f"method {name!r} is {base} with {fixed}; it cannot take "
                f"{', '.join(f'{k}={hparams[k]!r}' for k in clash)}"
            )
        return make_method(base, token_budget, **{**hparams, **fixed})
    if name not in _METHODS:
        raise MethodConfigError(
            f"unknown KV method {name!r}; expected one of "
            f"{', '.join((*METHOD_NAMES, *METHOD_VARIANTS, *MULTI_TURN_METHOD_NAMES))}"
        )
    hparams = {k: v for k, v in hparams.items() if v is not None}
    allowed = method_hparams(name)
    if "kernels" in hparams and "kernels" not in allowed:
        check_kernels(name, hparams.pop("kernels"))
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise MethodConfigError(
            f"method {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(allowed) or 'none'}"
        )
    if name == "full":
        return Full()
    if token_budget is None:
        raise MethodConfigError(
            f"method {name!r} needs a token_budget (KV tokens read per decode step per KV "
            "head), e.g. make_method(name, 256)"
        )
    return _METHODS[name](token_budget=token_budget, **hparams)

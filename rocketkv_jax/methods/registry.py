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
__all__ = ["METHOD_CLASSES", "METHOD_NAMES", "METHOD_VARIANTS", "make_method", "method_hparams",
           "sweep_settings", "UnknownSettingError"]


class UnknownSettingError(MethodConfigError):
    """Settings a method does not have. `method`, `settings` (the names refused) and
    `holders` ({setting: the methods that have it}) let a caller say it in its own words
    (the CLI names its flags)."""

    def __init__(self, method: str, settings: list[str], accepted: tuple[str, ...]):
        self.method, self.settings = method, settings
        self.holders = {k: [n for n in (*METHOD_NAMES, *MULTI_TURN_METHOD_NAMES)
                            if k in method_hparams(n)] for k in settings}
        have = "; ".join(f"{k}: {', '.join(h)}" for k, h in self.holders.items() if h)
        super().__init__(
            f"method {method!r} has no hyperparameter {', '.join(map(repr, settings))}"
            + (f" (the methods that have it: {have})" if have else "")
            + f"; it accepts: {', '.join(accepted) or 'none'}")


def _base_name(name: str) -> str:
    """The registered method a name builds: a variant's base method, else the name."""
    if not isinstance(name, str):
        raise MethodConfigError(f"the method name must be a str such as 'rocketkv', got "
                                f"{type(name).__name__}")
    base = METHOD_VARIANTS[name][0] if name in METHOD_VARIANTS else name
    if base not in _METHODS:
        raise MethodConfigError(
            f"unknown KV method {name!r}; expected one of "
            f"{', '.join((*METHOD_NAMES, *METHOD_VARIANTS, *MULTI_TURN_METHOD_NAMES))}"
        )
    return base


def method_hparams(name: str) -> tuple[str, ...]:
    """Settings `make_method` accepts for `name` (a method, a variant or a multi-turn
    name) besides token_budget."""
    return tuple(f.name for f in dataclasses.fields(_METHODS[_base_name(name)])
                 if f.name != "token_budget")


def sweep_settings(name: str, **settings) -> dict:
    """The `settings` that method `name` takes, for a sweep that gives one value of a
    setting to every method that has it (eval's --skip-layers, bench's --stage2): the
    other methods run without it. `kernels` goes to every method."""
    has = method_hparams(name)
    return {k: v for k, v in settings.items() if k in has or k == "kernels"}


def make_method(name: str, token_budget: int | None = None, **settings):
    """Build a KV method by name: the one rule from a name, a budget and settings to a
    method, for the API, the CLI, eval and bench alike.

    token_budget: M, KV tokens' worth read per decode step per KV head; required by every
    method except `full`, which ignores it (so a sweep can pass one budget to all names).
    settings: the method's hyperparameters (window, kernel_size, page_size, top_r, sinks,
    stage2, skip_layers, ... depending on the method; see `method_hparams`). A value of
    None keeps the default. `kernels` (the kernel backend, one of names.KERNEL_BACKENDS)
    is accepted for every method and dropped by those that run no kernel (full,
    streaming, snapkv, snapkv++), so one setting can be passed to all names; any other
    setting a method does not have is refused (a sweep that applies a setting only where
    it exists filters with `sweep_settings`).
    A name of METHOD_VARIANTS (e.g. "rocket_r0.5") builds its base method with the
    variant's settings, which other settings may not contradict; a multi-turn name
    (`rocketkv-mt`) builds its multi-turn method.
    Raises MethodConfigError (a ValueError) for an unknown name or setting, a missing or
    non-positive budget, and settings the method rejects.
    """
    base = _base_name(name)
    if name in METHOD_VARIANTS:
        fixed = METHOD_VARIANTS[name][1]
        clash = sorted(k for k, v in fixed.items() if settings.get(k) not in (None, v))
        if clash:
            raise MethodConfigError(
                f"method {name!r} is {base} with {fixed}; it cannot take "
                f"{', '.join(f'{k}={settings[k]!r}' for k in clash)}"
            )
        settings = {**settings, **fixed}
    settings = {k: v for k, v in settings.items() if v is not None}
    allowed = method_hparams(base)
    if "kernels" in settings and "kernels" not in allowed:
        check_kernels(base, settings.pop("kernels"))
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise UnknownSettingError(name, unknown, allowed)
    if base == "full":
        return Full()
    if token_budget is None:
        raise MethodConfigError(
            f"method {name!r} needs a token_budget (KV tokens read per decode step per KV "
            "head), e.g. make_method(name, 256)"
        )
    return _METHODS[base](token_budget=token_budget, **settings)

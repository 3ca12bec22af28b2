"""`skip_layers`: the first layers keep every token and attend densely, the others run the
method (the official RocketKV configs keep 2 for LongChat-7B and Llama-2-7B-32k; Quest's
own code keeps 2).

The layers then hold caches of different capacities, so one stacked cache (leading layer
axis) no longer fits. `SkipLayersPlan` keeps two stacks in a `LayeredCache`: `dense` for
layers [0, S) at full capacity and `sparse` for layers [S, L) at the method's capacity.

The model sees this through the two generic entry points of its plan contract
(`models/plan.py`: `compress_layers`, `layer_groups`), never a method's name. The decode
step runs one layer loop per group, each with its own stack as the loop carry and the
group's plan's own `append` / `attend`, so each stack is updated in place (no `lax.cond`
on the layer index in the hot loop, whose branches would both carry the whole cache).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from .. import checks
from ..cache import KVCache
from ..models.plan import LayerGroup, compress_layers
from .base import DensePlan, MethodConfigError, round_capacity


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayeredCache:
    """Two stacked caches: dense [S, B, K, C_full, D] for layers [0, S), sparse
    [L - S, B, K, C, D] for layers [S, L) (KVCache fields, leading layer axis)."""

    dense: KVCache
    sparse: Any  # the inner plan's stacked cache (a KVCache for every method here)


@dataclasses.dataclass(frozen=True)
class SkipLayersPlan:
    """Layers [0, skip_layers) dense and unevicted (`dense`), the rest `inner`."""

    inner: Any
    dense: DensePlan
    skip_layers: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 0 < self.skip_layers < self.num_layers:
            raise MethodConfigError(
                f"skip_layers must be in 1..{self.num_layers - 1} for a {self.num_layers}-layer "
                f"model, got {self.skip_layers}; 0 means no skipped layer (use the plan itself)"
            )

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def query_window(self) -> int:
        return self.inner.query_window

    def layer_groups(self) -> tuple[LayerGroup, LayerGroup]:
        S = self.skip_layers
        return (LayerGroup(self.dense, "dense", 0, S),
                LayerGroup(self.inner, "sparse", S, self.num_layers))

    def compress_layers(self, k, v, q, lengths) -> LayeredCache:
        """k, v [L, B, K, T, D]; q [L, B, H, W, D]; lengths [B] -> LayeredCache."""
        S = self.skip_layers
        dense = jax.lax.map(lambda kv: self.dense.compress(*kv, None, lengths), (k[:S], v[:S]))
        sparse = compress_layers(self.inner, k[S:], v[S:], q[S:], lengths)
        return LayeredCache(dense, sparse)

    def read_tokens(self, context: int) -> int:
        """Tokens' worth read per step per KV head, averaged over layers."""
        S, L = self.skip_layers, self.num_layers
        return -(-(S * context + (L - S) * self.inner.read_tokens(context)) // L)

    def describe(self) -> dict:
        return {**self.inner.describe(), "skip_layers": self.skip_layers}


def skip_layers_plan(inner, skip_layers: int, num_layers: int, prompt_len: int,
                     max_new_tokens: int):
    """`inner` with its first `skip_layers` layers dense and unevicted (0: `inner`)."""
    if not 0 <= skip_layers < num_layers:  # also for a dense plan: it cannot fit the model
        raise MethodConfigError(
            f"skip_layers must be in 0..{num_layers - 1} for a {num_layers}-layer model "
            f"(at least one layer runs the method), got {skip_layers}"
        )
    if skip_layers == 0 or isinstance(inner, DensePlan):
        return inner
    L = prompt_len + max_new_tokens
    dense = DensePlan(inner.name, round_capacity(L), prompt_len, L)
    return SkipLayersPlan(inner, dense, skip_layers, num_layers)


def check_skip_layers(name: str, skip_layers: object) -> None:
    """Raise unless `skip_layers` is an int >= 0 (its upper bound, num_layers - 1, is
    checked at plan time, when the model is known)."""
    checks.skip_layers(skip_layers, f"{name}: skip_layers", MethodConfigError)


def with_skip_layers(cls):
    """Class decorator for a method with a `skip_layers` field: its `plan` returns the
    method's own plan wrapped by `skip_layers_plan` (one place for the five methods)."""
    method_plan = cls.plan

    @functools.wraps(method_plan)
    def plan(self, config, prompt_len: int, max_new_tokens: int):
        own = method_plan(self, config, prompt_len, max_new_tokens)
        return skip_layers_plan(own, self.skip_layers, config.num_layers, prompt_len,
                                max_new_tokens)

    cls.plan = plan
    return cls

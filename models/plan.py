"""The model's contract with a KV method: the plan protocol and the plan's layer groups.

The decoder (`llama.py`) never names a method. It takes a resolved, hashable plan and
calls three of its functions: `compress` once per layer after prefill, `append` and
`attend` per layer at every decode step. A plan may split the layers into groups that hold
caches of different shapes (`methods/skip_layers.py` keeps the first layers dense); the
model sees that only through the two generic entry points here:

    compress_layers(plan, k, v, q, lengths)   every layer's cache after prefill
    layer_groups(plan, num_layers)            (plan, cache field, layer range) per stack

An ordinary plan is one group, [0, L) over the whole cache. The methods live in
`rocketkv_jax/methods/` and import this module; this module imports none of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax


class KVPlan(Protocol):
    """What the model needs from a KV-cache method (a resolved, hashable plan)."""

    capacity: int
    query_window: int  # trailing queries per row that `compress` reads (0: none)

    def compress(self, k, v, q_obs, lengths):
        """k, v: [B, K, T, D]; q_obs: [B, H, query_window, D], the queries (RoPE applied)
        of each row's last query_window tokens (`window_queries`); lengths: [B] -> cache."""

    def append(self, cache, k, v, position, layer):
        """k, v: [B, K, D], position: [B] -> the stacked cache (leading layer axis) with the
        token written into layer `layer` (the layer loop's traced index, `loop_layers`;
        a static int is accepted too)."""

    def attend(self, q, cache, query_pos, sliding_window):
        """q: [B, H, D], query_pos: [B] -> attention output [B, H, D]."""

    # Optional: `attend_stacked(q, stack, layer, query_pos, sliding_window)`, attend on
    # layer `layer` of the stacked cache without slicing it out first (`attend_layer`).

    # Optional, for plans whose layers hold caches of different shapes: `layer_groups()`
    # -> the LayerGroups below, and `compress_layers(k, v, q, lengths)` over all layers.


class LayerGroup(NamedTuple):
    """Layers [start, stop) run `plan` on one stacked cache: `field` of the model's cache,
    or the whole cache when None (an ordinary plan)."""

    plan: Any
    field: str | None
    start: int
    stop: int

    def stack(self, cache):
        """This group's stacked cache (leading axis: its layers, from `start`)."""
        return cache if self.field is None else getattr(cache, self.field)

    def replace(self, cache, stack):
        """`cache` with this group's stack replaced by `stack`."""
        return stack if self.field is None else dataclasses.replace(cache, **{self.field: stack})


def layer_groups(plan, num_layers: int) -> tuple[LayerGroup, ...]:
    """The plan's layer groups in layer order; one group [0, num_layers) for most plans."""
    own = getattr(plan, "layer_groups", None)
    return own() if own is not None else (LayerGroup(plan, None, 0, num_layers),)


def attend_layer(plan, q, stack, layer, query_pos, sliding_window):
    """`plan.attend` on layer `layer` (traced or static) of a stacked cache. A plan with
    `attend_stacked` reads the layer where it lies; else the layer is sliced out, which
    XLA:CPU materialises as a copy of the layer's cache (one more read and write of it)."""
    own = getattr(plan, "attend_stacked", None)
    if own is not None:
        return own(q, stack, layer, query_pos, sliding_window)
    cache = jax.tree.map(lambda a: a[layer], stack)
    return plan.attend(q, cache, query_pos, sliding_window)


def compress_layers(plan, k: jax.Array, v: jax.Array, q: jax.Array, lengths: jax.Array):
    """Every layer's cache: k, v [L, B, K, T, D], q [L, B, H, W, D], lengths [B]."""
    own = getattr(plan, "compress_layers", None)
    if own is not None:
        return own(k, v, q, lengths)
    return jax.lax.map(lambda kvq: plan.compress(*kvq, lengths), (k, v, q))

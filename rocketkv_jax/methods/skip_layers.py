"""`skip_layers`: the first layers keep every token and attend densely, the others run the
method (the official RocketKV configs keep 2 for LongChat-7B and Llama-2-7B-32k; Quest's
own code keeps 2).

The layers then hold caches of different capacities, so one stacked cache (leading layer
axis) no longer fits. `SkipLayersPlan` keeps two stacks in a `LayeredCache`: `dense` for
layers [0, S) at full capacity and `sparse` for layers [S, L) at the method's capacity.
Its per-layer entry points take the (traced) layer index and route with `lax.cond`:

    compress_layers(k, v, q, lengths)                    every layer's cache after prefill
    append(cache, k, v, position, layer)                 as every plan's append
    attend_layer(q, cache, layer, query_pos, window)     this layer's attention

`compress_layers` and `attend_layer` are also free functions here that fall back to what
the model does today for an ordinary plan (`lax.map` of `compress`; slice the layer, then
`attend`), so the model can call them for every plan. NOTE: models/llama.py
(`forward_prefill`, `forward_decode`) and generate.py (`_from_prefill_program`) do not
call them yet, so `SkipLayersPlan` is not reachable from `make_method`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ..cache import KVCache
from .base import DensePlan, MethodConfigError, round_capacity


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayeredCache:
    """Two stacked caches: dense [S, B, K, C_full, D] for layers [0, S), sparse
    [L - S, B, K, C, D] for layers [S, L) (KVCache fields, leading layer axis)."""

    dense: KVCache
    sparse: Any  # the inner plan's stacked cache (a KVCache for every method here)


def compress_layers(plan, k: jax.Array, v: jax.Array, q: jax.Array, lengths: jax.Array):
    """Every layer's cache: k, v [L, B, K, T, D], q [L, B, H, W, D], lengths [B]."""
    own = getattr(plan, "compress_layers", None)
    if own is not None:
        return own(k, v, q, lengths)
    return jax.lax.map(lambda kvq: plan.compress(*kvq, lengths), (k, v, q))


def attend_layer(plan, q: jax.Array, cache, layer, query_pos: jax.Array, sliding_window):
    """Layer `layer`'s attention: q [B, H, D] -> [B, H, D] over the stacked cache."""
    own = getattr(plan, "attend_layer", None)
    if own is not None:
        return own(q, cache, layer, query_pos, sliding_window)
    layer_cache = jax.tree.map(lambda a: a[layer], cache)  # read where it lies
    return plan.attend(q, layer_cache, query_pos, sliding_window)


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

    def compress_layers(self, k, v, q, lengths) -> LayeredCache:
        """k, v [L, B, K, T, D]; q [L, B, H, W, D]; lengths [B] -> LayeredCache."""
        S = self.skip_layers
        dense = jax.lax.map(lambda kv: self.dense.compress(*kv, None, lengths), (k[:S], v[:S]))
        sparse = compress_layers(self.inner, k[S:], v[S:], q[S:], lengths)
        return LayeredCache(dense, sparse)

    def append(self, cache: LayeredCache, k, v, position, layer) -> LayeredCache:
        """k, v [B, K, D]; position [B]; layer: traced index over all L layers."""
        S = self.skip_layers
        layer = jnp.asarray(layer, jnp.int32)

        def to_dense(c: LayeredCache) -> LayeredCache:
            i = jnp.minimum(layer, S - 1)
            return LayeredCache(self.dense.append(c.dense, k, v, position, i), c.sparse)

        def to_sparse(c: LayeredCache) -> LayeredCache:
            i = jnp.maximum(layer - S, 0)
            return LayeredCache(c.dense, self.inner.append(c.sparse, k, v, position, i))

        return jax.lax.cond(layer < S, to_dense, to_sparse, cache)

    def attend_layer(self, q, cache: LayeredCache, layer, query_pos, sliding_window):
        """q [B, H, D] -> [B, H, D]: dense over every token below skip_layers, else inner."""
        S = self.skip_layers
        layer = jnp.asarray(layer, jnp.int32)

        def dense_attend(c: LayeredCache):
            lc = jax.tree.map(lambda a: a[jnp.minimum(layer, S - 1)], c.dense)
            return self.dense.attend(q, lc, query_pos, sliding_window)

        def inner_attend(c: LayeredCache):
            return attend_layer(self.inner, q, c.sparse, jnp.maximum(layer - S, 0), query_pos,
                                sliding_window)

        return jax.lax.cond(layer < S, dense_attend, inner_attend, cache)

    def read_tokens(self, context: int) -> int:
        """Tokens' worth read per step per KV head, averaged over layers."""
        S, L = self.skip_layers, self.num_layers
        return -(-(S * context + (L - S) * self.inner.read_tokens(context)) // L)

    def describe(self) -> dict:
        return {**self.inner.describe(), "skip_layers": self.skip_layers}


def skip_layers_plan(inner, skip_layers: int, num_layers: int, prompt_len: int,
                     max_new_tokens: int):
    """`inner` with its first `skip_layers` layers dense and unevicted (0: `inner`)."""
    if skip_layers == 0 or isinstance(inner, DensePlan):
        return inner
    L = prompt_len + max_new_tokens
    dense = DensePlan(inner.name, round_capacity(L), prompt_len, L)
    return SkipLayersPlan(inner, dense, skip_layers, num_layers)

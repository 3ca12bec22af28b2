"""Ops that tell jit's SPMD partitioner how they split: `top_k`, `write_rows`, `write_column`.

Each is a `jax.experimental.custom_partitioning` op whose single-device body is the plain
JAX op. Under a mesh, each device runs that body on its own rows (B) and KV heads (K),
where the partitioner on its own would all-gather the operand (docs/sharding.md). Without
a mesh they are the plain ops.

The partitioning rules are Python callbacks at compile time, so a program that uses them
misses JAX's persistent compilation cache in a new process unless
`jax_remove_custom_partitioning_ptr_from_cache_key` is set.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# ------------------------------------------------------------------------------ top-k
_lax_top_k = jax.lax.top_k  # bound now, so a test may patch jax.lax.top_k with `top_k`


@functools.partial(custom_partitioning, static_argnums=(1,))
def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis that stays local to each device's leading dims.

    XLA's SPMD partitioner (jaxlib 0.10.2, Shardy and GSPMD alike) replicates the HLO
    `topk` op: an operand sharded over B or K is all-gathered, every device selects for
    every row, and keeps its slice. Here the leading dims keep their sharding (only the
    last axis, if sharded, is gathered), so a KV head's selection runs on its device.
    Same results, values and indices, as `jax.lax.top_k` (it is called per shard).
    """
    return tuple(_lax_top_k(x, k))


def _top_k_sharding(arg):
    spec = tuple(arg.sharding.spec) + (None,) * (arg.ndim - len(arg.sharding.spec))
    return NamedSharding(arg.sharding.mesh, P(*spec[:-1], None))


def _top_k_partition(k, mesh, arg_shapes, result_shape):
    s = _top_k_sharding(arg_shapes[0])
    return mesh, lambda x: tuple(_lax_top_k(x, k)), (s, s), (s,)


def _top_k_infer(k, mesh, arg_shapes, result_shape):
    s = _top_k_sharding(arg_shapes[0])
    return (s, s)


top_k.def_partition(
    partition=_top_k_partition,
    infer_sharding_from_operands=_top_k_infer,
    sharding_rule="... n -> ... k, ... k",
    need_replication_factors=("n",),
)


# ------------------------------------------------------------------ in-place row writes
def _write_column(buf, x, layer, index, combine):
    at = buf.at[layer, jnp.arange(x.shape[0]), :, :, index]
    return getattr(at, combine)(x.astype(buf.dtype), mode="promise_in_bounds")


@functools.partial(custom_partitioning, static_argnums=(4,))
def write_column(
    buf: jax.Array, x: jax.Array, layer: jax.Array, index: jax.Array, combine: str = "set"
) -> jax.Array:
    """buf[layer, b, :, :, index[b]] = combine(that, x[b]) for every row b: channel-major
    page metadata buf [L, B, K, D, P], x [B, K, D]. In place as `write_rows` (a reshape to
    reuse it would cost XLA a copy of the buffer), and each device writes its own rows and
    heads under a mesh."""
    return _write_column(buf, x, layer, index, combine)


def _write_rows(buf, x, layer, index, combine):
    at = buf.at[layer, jnp.arange(x.shape[0]), :, index]
    return getattr(at, combine)(x, mode="promise_in_bounds")


@functools.partial(custom_partitioning, static_argnums=(4,))
def write_rows(
    buf: jax.Array, x: jax.Array, layer: jax.Array, index: jax.Array, combine: str = "set"
) -> jax.Array:
    """buf[layer, b, :, index[b]] = x[b] for every row b: buf [L, B, K, S, E], x [B, K, E]
    (`combine` "max" / "min": the element-wise max / min with what is there).

    A scatter that XLA's CPU and GPU backends perform in place when `buf` is a loop carry
    (a vmapped write becomes a scatter with batching dims, which XLA rewrites with a
    transpose of the whole buffer: a copy). Under a mesh, each device writes its own rows
    and heads (B and K keep their sharding; the partitioner would otherwise all-gather
    the cache, as it cannot see that the row indices are an iota).
    """
    return _write_rows(buf, x, layer, index, combine)


def _write_rows_shardings(mesh, buf_sharding):
    spec = tuple(buf_sharding.spec) + (None,) * (5 - len(buf_sharding.spec))
    b, k = spec[1], spec[2]
    return (NamedSharding(mesh, P(None, b, k, None, None)), NamedSharding(mesh, P(b, k, None)),
            NamedSharding(mesh, P()), NamedSharding(mesh, P(b)))


def _row_write_partition(lower, combine, mesh, arg_shapes, result_shape):
    """custom_partitioning rule of write_rows / write_column: every device writes its own
    rows and heads with the single-device `lower`."""
    shardings = _write_rows_shardings(mesh, arg_shapes[0].sharding)
    return mesh, functools.partial(lower, combine=combine), shardings[0], shardings


def _row_write_infer(combine, mesh, arg_shapes, result_shape):
    return _write_rows_shardings(mesh, arg_shapes[0].sharding)[0]


write_rows.def_partition(
    partition=lambda *a: _row_write_partition(_write_rows, *a),
    infer_sharding_from_operands=_row_write_infer,
    sharding_rule="l b k s e, b k e, , b -> l b k s e",
    need_replication_factors=("l", "s", "e"),
)


write_column.def_partition(
    partition=lambda *a: _row_write_partition(_write_column, *a),
    infer_sharding_from_operands=_row_write_infer,
    sharding_rule="l b k d p, b k d, , b -> l b k d p",
    need_replication_factors=("l", "d", "p"),
)


__all__ = ["top_k", "write_column", "write_rows"]

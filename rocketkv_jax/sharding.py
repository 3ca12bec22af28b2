"""Multi-device layout: a ("data", "model") mesh and the partition rules of params and cache.

`data` splits the batch; `model` is tensor parallelism over attention heads (query heads
and KV heads together), the MLP hidden dim F and the vocabulary. Each param and cache field
declares the logical axes of its dims where its shape is declared (`ModelConfig.param_infos`,
`KVCache`); `ShardingRules` below maps them to mesh axes. `jax.jit`'s SPMD partitioner
derives the per-device program and inserts the collectives (docs/sharding.md says where).

GQA groups stay on one device. Query head h reads KV head h // G, and `wq`'s H*D columns
are laid out head-major, so its i-th equal chunk over `model` holds heads
[i*H/m, (i+1)*H/m) = the groups of KV heads [i*K/m, (i+1)*K/m), exactly the i-th chunk of
`wk`/`wv`'s K*D columns, whenever m divides K (`check_mesh`). RocketKV's per-KV-head work
(stage-1 scores summed over the group, stage-2 channel and token top-k) then needs no other
device's data; `partitioned.top_k` keeps XLA from gathering it anyway (docs/sharding.md).

Multi-host: call `jax.distributed.initialize()` first; `make_mesh` then spans every
process's devices and `put_batch` builds global arrays from the (identical) host batch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .cache import KVCache
from .models.config import ModelConfig
from .models.params import flatten, unflatten

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


class MeshError(ValueError):
    """A mesh that cannot run this model or batch, or a malformed --mesh flag."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None: never split). Params name the logical axes of their
    dims in `ModelConfig.param_infos`, cache fields in `KVCache`'s field declarations."""

    batch: str | None = DATA
    layer: str | None = None  # the layer loop walks it
    embed: str | None = None
    # wq's H*D columns (wo's rows) and wk/wv's K*D, head-major: equal chunks over "model"
    # are whole heads, each query head with its KV head (`check_mesh`)
    q_heads: str | None = MODEL
    kv_heads: str | None = MODEL
    mlp: str | None = MODEL
    vocab: str | None = MODEL
    head_dim: str | None = None
    slots: str | None = None
    pages: str | None = None


RULES = ShardingRules()


def logical_spec(axes: Sequence[str], rules: ShardingRules = RULES) -> P:
    """The PartitionSpec of a dims' logical axes, e.g. ("layer", "embed", "q_heads") ->
    P(None, None, "model")."""
    try:
        return P(*(getattr(rules, name) for name in axes))
    except AttributeError:
        raise MeshError(f"no sharding rule for a logical axis of {tuple(axes)}; add it to "
                        "ShardingRules") from None


# ------------------------------------------------------------------------- the mesh
def make_mesh(data: int, model: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: every device of every process).

    data * model must equal the number of devices; to use fewer, pass
    `devices=jax.devices()[:n]` (or restrict CUDA_VISIBLE_DEVICES). Axes are
    `AxisType.Auto`: shardings steer jit's partitioner, they are not part of array types.
    """
    for name, size in ((DATA, data), (MODEL, model)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise MeshError(f"mesh axis {name!r} must be a positive int, got {size!r}")
    devs = list(jax.devices() if devices is None else devices)
    n = data * model
    if n > len(devs):
        raise MeshError(
            f"mesh data={data},model={model} needs {n} devices but only {len(devs)} "
            f"{'are' if len(devs) > 1 else 'is'} available ({devs[0].platform}); make "
            f"data * model = {len(devs)}, or on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting"
        )
    if n != len(devs):
        raise MeshError(
            f"mesh data={data},model={model} uses {n} devices but {len(devs)} are "
            f"available; make data * model = {len(devs)}, or pass devices=jax.devices()[:{n}] "
            "(or restrict CUDA_VISIBLE_DEVICES) to use a subset"
        )
    return jax.make_mesh(
        (data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devs
    )


def parse_mesh(spec: str) -> tuple[int, int]:
    """"data=2,model=2" -> (2, 2). An omitted axis is 1 ("model=4" -> (1, 4))."""
    sizes: dict[str, int] = {}
    hint = "expected e.g. --mesh data=2,model=2 (axes: data, model; positive ints)"
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise MeshError(f"bad mesh item {item!r} in {spec!r}: {hint}")
        if name not in AXES:
            raise MeshError(f"unknown mesh axis {name!r} in {spec!r}: {hint}")
        if name in sizes:
            raise MeshError(f"mesh axis {name!r} given twice in {spec!r}")
        try:
            size = int(value)
        except ValueError:
            raise MeshError(f"mesh axis {name}={value!r} is not an int: {hint}") from None
        if size < 1:
            raise MeshError(f"mesh axis {name}={size} must be >= 1: {hint}")
        sizes[name] = size
    if not sizes:
        raise MeshError(f"empty mesh spec {spec!r}: {hint}")
    return sizes.get(DATA, 1), sizes.get(MODEL, 1)


def mesh_from_flag(spec: str | None) -> Mesh | None:
    """The CLI's --mesh: None or "" -> None (single device), else `make_mesh(*parse_mesh)`."""
    if spec is None or not spec.strip():
        return None
    return make_mesh(*parse_mesh(spec))


def check_mesh(config: ModelConfig, mesh: Mesh, batch: int | None = None) -> None:
    """Raise MeshError unless `mesh` can run `config` (and a batch bucket of `batch` rows).

    The model axis must divide the KV heads (so every GQA group sits on one device) and
    the MLP hidden size; the data axis must divide the batch.
    """
    data, model = mesh.shape[DATA], mesh.shape[MODEL]
    K, F = config.num_kv_heads, config.intermediate_size
    fits = [m for m in range(1, K + 1) if K % m == 0 and F % m == 0]
    best = max(m for m in fits if mesh.size % m == 0)
    if K % model:
        raise MeshError(
            f"mesh model axis {model} does not divide the model's {K} KV heads: each device "
            f"must hold whole GQA groups. Use a model axis in {fits} and put the other "
            f"devices on the data axis, e.g. --mesh data={mesh.size // best},model={best}"
        )
    if F % model:
        raise MeshError(
            f"mesh model axis {model} does not divide the MLP hidden size {F}; use a model "
            f"axis in {fits}"
        )
    if batch is not None and batch % data:
        raise MeshError(
            f"mesh data axis {data} does not divide the batch of {batch} rows; pad the batch "
            f"to a multiple of {data} (generate_ids does this itself) or use a data axis that "
            f"divides {batch}"
        )


# ----------------------------------------------------------------------- shardings
def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Replicate dims a mesh axis does not divide (only the vocab can get here: heads and
    F are checked by `check_mesh`)."""
    dims = tuple(spec) + (None,) * (len(shape) - len(spec))
    return P(*(a if a is None or n % mesh.shape[a] == 0 else None for a, n in zip(
        dims, shape, strict=True)))


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """Pytree of NamedSharding matching the params of `config` (for `load_model`)."""
    check_mesh(config, mesh)
    return unflatten({
        path: NamedSharding(mesh, _fit(logical_spec(info.axes), info.shape, mesh))
        for path, info in config.param_infos().items()
    })


def place_params(params: dict[str, Any], config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """Move params onto `mesh` by the rules; leaves already laid out on `mesh` stay as
    they are (so restoring with `param_shardings` costs nothing here). With several
    processes each passes the same host values (`put_global`)."""
    flat, rules = flatten(params), flatten(param_shardings(config, mesh))

    def place(x, sharding):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        if jax.process_count() > 1:
            return put_global(np.asarray(x), sharding)
        return jax.device_put(x, sharding)

    return unflatten({k: place(x, rules[k]) for k, x in flat.items()})


def cache_shardings(cache: Any, mesh: Mesh, split_rows: bool = True) -> Any:
    """NamedShardings for `cache` (arrays or shape structs, any leading layer axes): "data"
    on B (unless not `split_rows`: a one-row cache every data group holds whole), "model"
    on K, for a KVCache or any pytree of them (skip_layers' two stacks)."""
    rules = RULES if split_rows else dataclasses.replace(RULES, batch=None)

    def one(c: KVCache) -> KVCache:
        def sharding(name, axes):  # a stacked cache has leading layer axes
            layers = ("layer",) * (getattr(c, name).ndim - len(axes))
            return NamedSharding(mesh, logical_spec(layers + axes, rules))

        return KVCache(**{name: sharding(name, axes)
                          for name, axes in KVCache.logical_axes().items()})

    return jax.tree.map(one, cache, is_leaf=lambda x: isinstance(x, KVCache))


def constrain_cache(cache: Any, mesh: Mesh | None) -> Any:
    """Inside jit: pin the cache to its sharding (identity when mesh is None)."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Inside jit: gather a (small) pytree onto every device (identity when mesh is None),
    e.g. before a host callback, which reads whole arrays on one device."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, replicated(mesh))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Rows over "data", the rest replicated: for tokens [B, T] (ndim 2) and lengths [B]."""
    return NamedSharding(mesh, P(DATA, *(None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host value (the same on every process) as a global array with `sharding`; unlike
    `jax.device_put` this also works when the mesh spans several processes."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])


def put_batch(x: Any, mesh: Mesh) -> jax.Array:
    """A host batch (tokens [B, T], lengths [B]) split over "data"."""
    return put_global(x, batch_sharding(mesh, np.ndim(x)))


def put_replicated(x: Any, mesh: Mesh) -> jax.Array:
    return put_global(x, replicated(mesh))


def round_batch(batch: int, mesh: Mesh | None) -> int:
    """Batch bucket rounded up to a multiple of the data axis."""
    if mesh is None:
        return batch
    data = mesh.shape[DATA]
    return -(-batch // data) * data


_COLLECTIVE = re.compile(
    r"= \S+ (all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)(?:-start)?\("
)


def collectives(hlo: str) -> list[tuple[str, str]]:
    """(kind, JAX op name) of every collective in a compiled module's HLO text
    (`jax.jit(f).lower(...).compile().as_text()`), in program order."""
    found = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            found.append((m.group(1), op.group(1) if op else "?"))
    return found


__all__ = [
    "AXES",
    "DATA",
    "MODEL",
    "RULES",
    "MeshError",
    "ShardingRules",
    "batch_sharding",
    "cache_shardings",
    "check_mesh",
    "collectives",
    "constrain_cache",
    "logical_spec",
    "make_mesh",
    "mesh_from_flag",
    "param_shardings",
    "parse_mesh",
    "place_params",
    "put_batch",
    "put_global",
    "put_replicated",
    "replicate",
    "replicated",
    "round_batch",
]

"""The params pytree: nesting flat "a/b" paths, and random initialisation for tests and
benchmarks (each param as declared by `ModelConfig.param_infos`)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"layers/wq": x, "embed": y} -> {"layers": {"wq": x}, "embed": y}."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of `unflatten`."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def random_params(
    config: ModelConfig, seed: int = 0, scale: float = 0.02, dtype=jnp.float32
) -> dict[str, Any]:
    """Normal(0, scale) weights, norms at 1 + small noise (`ArrayInfo.init`); built in
    numpy (fast, no jit)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, info in config.param_infos().items():
        if info.init == "near_one":
            x = 1.0 + 0.1 * rng.standard_normal(info.shape)
        else:
            x = scale * rng.standard_normal(info.shape)
        flat[path] = jnp.asarray(x.astype(np.float32), dtype=dtype)
    return unflatten(flat)


def device_random_params(
    config: ModelConfig, seed: int = 0, scale: float = 0.02, dtype=jnp.bfloat16
) -> dict[str, Any]:
    """`random_params`' distribution drawn by `jax.random` on the default device, directly
    in `dtype`: Llama-3.1-8B's 16 GB of bf16 weights in one compiled program, where the
    numpy draw takes minutes and twice that in host memory. (Not the same values as
    `random_params` for a seed.)"""
    infos = config.param_infos()

    def init():
        keys = jax.random.split(jax.random.key(seed), len(infos))
        flat = {}
        for key, (path, info) in zip(keys, infos.items(), strict=True):
            x = jax.random.normal(key, info.shape, dtype)
            flat[path] = 1.0 + 0.1 * x if info.init == "near_one" else scale * x
        return {p: x.astype(dtype) for p, x in flat.items()}

    return unflatten(jax.jit(init)())


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """params with "layers" as a tuple of per-layer dicts (each its own arrays) instead of
    one dict of stacked [L, ...] arrays; each matmul of the layer loop reads them in place
    (`models.llama.loop_layers`). The stacked arrays are not kept by this function."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    n = {x.shape[0] for x in jax.tree.leaves(layers)}
    if len(n) != 1:
        raise ValueError(f"stacked layer params disagree on the layer count: {sorted(n)}")
    per_layer = tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n.pop()))
    return {**params, "layers": per_layer}


# One layer's weight bytes from which `auto_layout` keeps weights per layer on CPU.
# Measured (docs/benchmarks.md, per-layer weights): per-layer decode steps are 1.2-4.9x
# faster for an 8B layer (872 MB in f32) and 1.5-2.0x for a Qwen2.5-0.5B layer (60 MB in
# f32, 30 MB in bf16: 1.15-3.1x there), but only 1.05-1.12x at batch 1 and up to 9% slower
# at batch 8 for a SmolLM2 layer (14 MB in f32); every per-layer matmul is a kernel of its
# own, which costs compile time and about 4.5x the memory mappings per program (a process
# may hold vm.max_map_count of them).
PER_LAYER_MIN_BYTES = 24 * 2**20


def layer_bytes(params: dict[str, Any]) -> int:
    """Bytes of one layer's weights (the mean over layers), in either layout."""
    layers = params["layers"]
    n = len(layers) if isinstance(layers, (tuple, list)) else {
        a.shape[0] for a in jax.tree.leaves(layers)}.pop()
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(layers)) // n


def auto_layout(params: dict[str, Any], backend: str) -> str:
    """The layout `--weight-layout auto` runs on one device: "per-layer" on CPU where a
    layer's weights reach PER_LAYER_MIN_BYTES (XLA:CPU copies a stacked layer's slice
    before each matmul), else "stacked" (on GPU, XLA fuses the slice into the matmul)."""
    if backend == "cpu" and layer_bytes(params) >= PER_LAYER_MIN_BYTES:
        return "per-layer"
    return "stacked"


def with_layout(params: dict[str, Any], layout: str, backend: str) -> tuple[dict, str]:
    """params in `layout` ("stacked", "per-layer" or "auto": `auto_layout` on `backend`),
    and the layout they are in."""
    if layout == "auto":
        layout = auto_layout(params, backend)
    return (unstack_layers(params) if layout == "per-layer" else params), layout


def layout_of(params: dict[str, Any]) -> str:
    """The layout `params` are in: "per-layer" or "stacked"."""
    return "per-layer" if isinstance(params["layers"], (tuple, list)) else "stacked"


def stack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `unstack_layers`."""
    layers = params["layers"]
    if not isinstance(layers, (tuple, list)):
        return params
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def cast_params(params: dict[str, Any], dtype) -> dict[str, Any]:
    """Every floating-point param in `dtype` (any layout; other leaves unchanged)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)

"""The params pytree: nesting flat "a/b" paths, and random initialisation for tests and
benchmarks (each param as declared by `ModelConfig.param_infos`)."""

from __future__ import annotations

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


def param_bytes(params) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))

"""How every compiled program of the engine is built and kept.

A program is a jitted function lowered and compiled ahead of time for abstract arguments
(`compile_program`), once per shape: the functions that build programs are cached with
`program_cache`, which registers each cache so that `clear_caches` forgets every compiled
program of the package (AOT-compiled executables, which `jax.clear_caches()` does not
reach). A long-lived process that keeps meeting new shapes (an eval grid, a server) drops
them all before it nears the kernel's limit on memory maps (`drop_programs_if_maps_high`).
No program holds a host callback, so JAX's persistent compilation cache
(`enable_compilation_cache`) keeps all of them across processes.

Cache keys must be hashable: params and states enter them as shape structs
(`params_struct`, `hashable`), never as arrays.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import time

import jax

from ..kernels.backend import triton_lowering

_PROGRAM_CACHES: list = []
logger = logging.getLogger(__name__)

# Linux's account of this process's memory maps and the most it may hold.
MAPS_FILE = "/proc/self/maps"
MAP_LIMIT_FILE = "/proc/sys/vm/max_map_count"
# Drop every compiled program once the process holds this fraction of its map limit.
MAPS_HIGH = 0.5


def program_cache(maxsize: int):
    """`functools.lru_cache(maxsize)` for a function that returns compiled programs,
    registered so that `clear_caches` forgets its programs with every other."""

    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _PROGRAM_CACHES.append(cached)
        return cached

    return wrap


def clear_caches() -> None:
    """Forget every compiled program of the package (tests that swap a function the
    programs call, or that must release the executables' memory)."""
    for cached in _PROGRAM_CACHES:
        cached.cache_clear()


def drop_compiled_programs() -> None:
    """Release every compiled XLA program this process holds: the package's
    (`clear_caches`) and jax.jit's (`jax.clear_caches`). Programs a caller still holds
    stay valid; the next request for a dropped one compiles it again (or loads it from
    JAX's persistent cache)."""
    clear_caches()
    jax.clear_caches()
    gc.collect()


def memory_maps() -> tuple[int, int] | None:
    """(memory maps this process holds, the most the kernel allows it: vm.max_map_count),
    or None where the system does not say (no /proc: not Linux)."""
    try:
        with open(MAPS_FILE, "rb") as f:
            held = f.read().count(b"\n")
        with open(MAP_LIMIT_FILE) as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    return held, limit


def drop_programs_if_maps_high(high: float | None = None) -> bool:
    """`drop_compiled_programs` when this process holds more than `high` (default
    MAPS_HIGH) of its memory-map limit; returns whether it did.

    XLA:CPU maps each executable's machine code into regions of its own (tens to hundreds
    per program), and the program caches are bounded by count, not by maps: a grid or a
    server that keeps meeting new shapes reaches vm.max_map_count (65,530 by default),
    after which the next compile fails in LLVM ("Cannot allocate memory") and jaxlib
    crashes while raising it, with most of the RAM free."""
    maps = memory_maps()
    high = MAPS_HIGH if high is None else high
    if maps is None or maps[0] <= high * maps[1]:
        return False
    drop_compiled_programs()
    logger.info("dropped the compiled programs: the process held %d of its %d memory maps "
                "(vm.max_map_count); %d after", maps[0], maps[1], (memory_maps() or maps)[0])
    return True


def compile_program(name: str, fn, args, *, out_shardings=None, donate_argnums=()):
    """jit + lower + compile `fn` for abstract `args`: (compiled, seconds). Every program
    of the engine is compiled here (the sharding tests wrap it to read each one's HLO),
    after dropping the compiled programs if the process's memory maps run high
    (`drop_programs_if_maps_high`)."""
    drop_programs_if_maps_high()
    fn.__name__ = name
    t0 = time.perf_counter()
    with triton_lowering():
        compiled = jax.jit(fn, out_shardings=out_shardings,
                           donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - t0


# ------------------------------------------------------------------ abstract arguments
def struct(x, sharding=None) -> jax.ShapeDtypeStruct:
    """The shape struct of an array (or of another struct), with `sharding` if given."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def structs(tree, shardings=None):
    """Shape structs of `tree` carrying `shardings` (a matching tree, or None for all)."""
    if shardings is None:
        return jax.tree.map(struct, tree)
    return jax.tree.map(struct, tree, shardings)


def hashable(tree) -> tuple:
    """(treedef, leaves) of a pytree of shape structs: a program cache key."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def hashable_structs(tree) -> tuple:
    """`hashable` of the shape structs of a pytree of arrays."""
    return hashable(jax.tree.map(struct, tree))


def unflatten(key: tuple):
    """The pytree of shape structs a `hashable` key stands for."""
    return jax.tree.unflatten(*key)


def params_struct(params) -> tuple:
    """A hashable stand-in for the params' shapes, dtypes and shardings."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple(struct(x, getattr(x, "sharding", None)) for x in leaves)


def params_dtype(params_s) -> jax.typing.DTypeLike:
    """The dtype of the params a `params_struct` stands for (their embedding's)."""
    return unflatten(params_s)["embed"].dtype


# ------------------------------------------------------------------ persistent cache
def enable_compilation_cache(single_device: bool = True) -> str | None:
    """Turn on JAX's persistent compilation cache in a user cache directory
    ($ROCKETKV_JAX_COMPILE_CACHE, "off" disables it). Returns the directory or None.

    single_device: the programs will not be partitioned over a mesh. Their cache keys then
    leave out the Python pointer of the `custom_partitioning` ops (partitioned.py), which
    differs in every process and would make each run miss the cache; those ops' partition
    rules only run when a program is split over several devices."""
    where = os.environ.get("ROCKETKV_JAX_COMPILE_CACHE", "")
    if where.lower() in ("off", "0", "none", "false"):
        return None
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        where = os.path.join(base, "rocketkv-jax", "jax-compile")
    try:
        os.makedirs(where, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache disabled ({where}: {e.strerror})", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", where)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if single_device:
        jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)
    return where

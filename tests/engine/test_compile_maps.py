"""The engine drops its compiled programs before the process's memory maps reach the
kernel's limit (vm.max_map_count), which XLA:CPU's executables otherwise exhaust in a long
grid: measured in the process's own /proc/self/maps."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.engine import compile as comp

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="memory maps are read from Linux's /proc")


def _lines(path: str) -> int:
    with open(path) as f:
        return len(f.readlines())


def _fn(x):
    for _ in range(4):
        x = jnp.tanh(x @ x.T @ x) + jnp.sort(x, axis=-1)
    return jnp.cumsum(x, axis=0)


def _numpy_fn(x: np.ndarray) -> np.ndarray:
    """`_fn` in float64 numpy: the reference a compiled program must match."""
    x = x.astype(np.float64)
    for _ in range(4):
        x = np.tanh(x @ x.T @ x) + np.sort(x, axis=-1)
    return np.cumsum(x, axis=0)


def _random(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).normal(scale=0.2, size=(rows, 16)).astype(np.float32)


@comp.program_cache(maxsize=64)
def _program(rows: int):
    args = (jax.ShapeDtypeStruct((rows, 16), jnp.float32),)
    return comp.compile_program("maps_probe", _fn, args)[0]


def test_memory_maps_reads_the_kernels_account():
    held, limit = comp.memory_maps()
    assert abs(held - _lines("/proc/self/maps")) < 50  # the two reads are moments apart
    with open("/proc/sys/vm/max_map_count") as f:
        assert limit == int(f.read())


def test_compiled_programs_hold_maps_that_dropping_releases():
    comp.drop_compiled_programs()
    before = comp.memory_maps()[0]
    for rows in range(8, 28):
        _program(rows)
    grown = comp.memory_maps()[0] - before
    assert grown > 100, grown  # 20 executables: several maps each
    assert _program.cache_info().currsize == 20
    assert not comp.drop_programs_if_maps_high(high=1.0)  # far below the limit: kept
    assert _program.cache_info().currsize == 20
    assert comp.drop_programs_if_maps_high(high=0.0)
    assert _program.cache_info().currsize == 0
    assert comp.memory_maps()[0] - before < grown / 4, "the executables' maps were not released"


def test_compile_program_drops_the_programs_when_maps_run_high(monkeypatch):
    comp.drop_compiled_programs()
    _program(8), _program(9)
    assert _program.cache_info().currsize == 2
    monkeypatch.setattr(comp, "MAPS_HIGH", 0.0)  # every compile now finds the maps high
    kept = _program(8)  # cached: nothing compiles, nothing is dropped
    assert _program.cache_info().currsize == 2
    new = _program(10)  # compiles: the two cached programs are dropped first
    assert _program.cache_info().currsize == 1
    np.testing.assert_allclose(new(_random(10)), _numpy_fn(_random(10)), rtol=1e-4, atol=1e-4)
    # a program still held (dropped from the cache) still runs
    np.testing.assert_allclose(kept(_random(8)), _numpy_fn(_random(8)), rtol=1e-4, atol=1e-4)


def test_without_proc_nothing_is_dropped(monkeypatch, tmp_path):
    monkeypatch.setattr(comp, "MAPS_FILE", str(tmp_path / "absent"))
    assert comp.memory_maps() is None
    _program(8)
    assert not comp.drop_programs_if_maps_high(high=0.0)
    assert _program.cache_info().currsize >= 1

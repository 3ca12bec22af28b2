"""The engine drops its compiled programs before the process's memory maps reach the
kernel's limit (vm.max_map_count), which XLA:CPU's executables otherwise exhaust in a long
grid: measured in the process's own /proc/self/maps."""

import sys

import jax
import jax.numpy as jnp
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


@comp.program_cache(maxsize=64)
def _program(rows: int):
    args = (jax.ShapeDtypeStruct((rows, 16), jnp.float32),)
    return comp.compile_program("maps_probe", _fn, args)[0]


def test_memory_maps_reads_the_kernels_account():
    held, limit = comp.memory_maps()
    assert abs(held - _lines("/proc/self/maps")) < 50  # the two reads are moments apart
    assert limit == int(open("/proc/sys/vm/max_map_count").read())


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
    x = jnp.ones((10, 16))
    assert jnp.allclose(new(x), _fn(x), atol=1e-5)
    assert kept(jnp.ones((8, 16))).shape == (8, 16)  # a program still held still runs


def test_without_proc_nothing_is_dropped(monkeypatch, tmp_path):
    monkeypatch.setattr(comp, "MAPS_FILE", str(tmp_path / "absent"))
    assert comp.memory_maps() is None
    _program(8)
    assert not comp.drop_programs_if_maps_high(high=0.0)
    assert _program.cache_info().currsize >= 1

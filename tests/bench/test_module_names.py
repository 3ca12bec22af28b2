"""A script of benchmarks/ runs with benchmarks/ first on sys.path (`python
benchmarks/<script>.py`), and tests/ is on sys.path in the test process. A module there
named like an installed package shadows it for everything in the process: transformers
5.25 imports the `kernels` package, and once found `benchmarks/kernels.py` instead."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _our_top_level_modules() -> dict[str, Path]:
    files = [*sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]
    return {f.stem: f for f in files if f.stem not in ("conftest", "__init__")}


def _clashes(modules: dict[str, Path]) -> dict[str, str]:
    installed = set(importlib.metadata.packages_distributions())
    return {
        name: str(path)
        for name, path in modules.items()
        if name in installed or name in sys.stdlib_module_names
    }


def test_no_benchmark_or_test_module_shadows_an_installed_or_stdlib_module():
    ours = _our_top_level_modules()
    assert "bench_kernels" in ours and "tiny_decoder" in ours  # the scan sees both folders
    assert not _clashes(ours), "rename these modules, they shadow installed ones"


def test_the_check_catches_a_stdlib_and_an_installed_name():
    fake = ROOT / "benchmarks" / "x.py"
    assert set(_clashes({"json": fake, "numpy": fake, "bench_kernels": fake})) == {"json", "numpy"}

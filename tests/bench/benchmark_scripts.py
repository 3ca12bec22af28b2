"""The scripts of benchmarks/, loaded by their path for the tests that call their functions.

benchmarks/ is on no import path: its scripts import the library and never each other, and
a script named like an installed package cannot shadow it in the test process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    """benchmarks/<name>.py as a module (once per test process)."""
    key = f"benchmark_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before it runs: its dataclasses look themselves up
        spec.loader.exec_module(module)
    return sys.modules[key]

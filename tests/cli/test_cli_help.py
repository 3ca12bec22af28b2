"""`rocketkv --help`: quick (no JAX import until a command runs), every default shown,
prose wrapped to the terminal."""

import os
import re
import subprocess
import sys
import time

import pytest


def _run(*code_or_args, columns=80):
    env = dict(os.environ, COLUMNS=str(columns))
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_building_the_parser_imports_no_jax():
    r = _run("-c", "import sys; from rocketkv_jax.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('jax', 'jaxlib', 'orbax', 'flax') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_help_returns_quickly():
    t0 = time.perf_counter()
    r = _run("-m", "rocketkv_jax.cli", "generate", "--help")
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0 and "usage: rocketkv generate" in r.stdout
    # ~0.3 s idle; JAX's import alone took 2-4 s here. Loose: the test machine is shared.
    assert elapsed < 2.0, elapsed


@pytest.fixture(scope="module")
def generate_help():
    r = _run("-m", "rocketkv_jax.cli", "generate", "--help")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("flag, default", [
    ("--max-new-tokens", "128"), ("--batch-size", "8"), ("--seed", "0"),
    ("--temperature", "0.0"), ("--top-k", "0"), ("--top-p", "1.0"), ("--method", "rocketkv"),
    ("--token-budget", "256"), ("--kernels", "auto"), ("--prefill-chunk", "4096"),
    ("--model", "smollm2"),
])
def test_generate_help_shows_every_default(generate_help, flag, default):
    options = generate_help.split("\noptions:\n", 1)[1]
    entry = re.search(rf"\n  {re.escape(flag)}\b(.*?)(?=\n  -|\n\n)", options, re.S)
    assert entry, flag
    assert f"(default: {default})" in " ".join(entry.group(1).split()), entry.group(1)


def test_help_wraps_prose_to_the_terminal(generate_help):
    description = generate_help.split("\n\n", 1)[1].split("\noptions:\n")[0]
    assert max(map(len, description.splitlines())) <= 80, description
    r = _run("-m", "rocketkv_jax.cli", "models", "--help", columns=60)
    assert r.returncode == 0 and max(map(len, r.stdout.splitlines())) <= 60, r.stdout


def test_cli_method_names_are_the_registry_names():
    from rocketkv_jax.methods.registry import METHOD_CLASSES
    from rocketkv_jax.names import METHOD_NAMES  # what the CLI lists

    assert tuple(cls.name for cls in METHOD_CLASSES) == METHOD_NAMES

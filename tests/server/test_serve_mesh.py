"""`rocketkv serve --mesh`'s engine on 4 simulated CPU devices (serve_mesh_checks.py, one
subprocess): the same tokens as on one device for every mesh (heads over "model", pool
rows over "data"), a prefix hit included, with the pools' caches really split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
MESH_IDS = ["1x4", "2x2", "4x1"]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HERE / "serve_mesh_checks.py")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_single_device_baseline(report):
    assert report["devices"] == 4
    single = report["single"]
    assert all(t[-1] == "done" and len(t) == 9 for t in single["tokens"])
    assert single["prefix_hits"] == 2  # the sampled repeat of a prompt, and the extension


@pytest.mark.parametrize("mesh", MESH_IDS)
def test_mesh_engine_equals_single_device(report, mesh):
    assert report[mesh]["tokens"] == report["single"]["tokens"]
    assert report[mesh]["prefix_hits"] == 2


@pytest.mark.parametrize("mesh", MESH_IDS)
def test_pool_caches_are_split(report, mesh):
    data, model = map(int, mesh.split("x"))
    assert all(rows % data == 0 for rows in report[mesh]["pool_rows"])
    specs = " ".join(report[mesh]["cache_specs"])
    if data > 1:
        assert "'data'" in specs
    if model > 1:
        assert "'model'" in specs

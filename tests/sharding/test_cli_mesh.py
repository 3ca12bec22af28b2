"""`rocketkv generate --mesh` on SmolLM2 over 2 simulated CPU devices (subprocesses, since
the device count is fixed when JAX starts)."""

import os
import subprocess
import sys

import pytest


def _generate(ckpt, *extra, devices=2):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run(
        [sys.executable, "-m", "rocketkv_jax.cli", "generate", "--model", str(ckpt), "--chat",
         "--prompt", "Name the largest planet of the solar system.", "--method", "rocketkv",
         "--token-budget", "32", "--max-new-tokens", "12", "--no-stream", *extra],
        capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_cli_mesh_data2_equals_single_device(smollm2_checkpoint):
    single = _generate(smollm2_checkpoint)
    sharded = _generate(smollm2_checkpoint, "--mesh", "data=2")
    assert single.returncode == 0 and sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == single.stdout and single.stdout.strip()


def test_cli_mesh_that_does_not_divide_kv_heads_is_a_clear_error(smollm2_checkpoint):
    r = _generate(smollm2_checkpoint, "--mesh", "model=2")
    assert r.returncode == 2
    assert "does not divide the model's 3 KV heads" in r.stderr
    assert "Traceback" not in r.stderr

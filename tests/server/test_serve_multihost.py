"""`rocketkv serve` over two processes of a `jax.distributed` run (multihost_checks.py,
one subprocess per process on this host, 2 CPU devices each, a 2x2 mesh over all 4): the
leader's tokens equal a one-device engine's for the same requests, a cancellation reaches
both processes, and the follower ran exactly the leader's turns (the same counters)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "sharding"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("multihost")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_checks.py"), str(i),
                               str(port), str(out / f"{i}.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 0)]
    try:
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    return [json.loads((out / f"{i}.json").read_text()) for i in (0, 1)]


def test_two_processes_share_one_mesh(reports):
    for i, r in enumerate(reports):
        assert (r["process"], r["processes"], r["devices"]) == (i, 2, 4)


def test_leader_tokens_equal_one_device(reports):
    from serve_mesh_checks import requests, run
    from sharded_checks import CFG

    from rocketkv_jax.models.params import random_params

    single = run(random_params(CFG, seed=0, scale=0.3), None)
    leader = reports[0]
    assert len(leader["tokens"]) == len(requests()[0]) + 1
    assert leader["tokens"] == single["tokens"]
    assert leader["drained"]


def test_a_cancellation_reaches_every_process(reports):
    got = reports[0]["cancelled"]
    assert got[-1] == "cancelled" and len(got) < 64
    assert [r["stats"]["cancelled"] for r in reports] == [1, 1]


def test_the_follower_ran_the_leaders_turns(reports):
    keys = ("submitted", "finished", "cancelled", "failed", "prefill_chunks", "prefix_hits",
            "prefix_hit_tokens", "programs", "pools", "pool_rows", "kv_bytes", "running")
    leader, follower = ({k: r["stats"][k] for k in keys} for r in reports)
    assert leader == follower
    assert leader["submitted"] == 7 and leader["running"] == 0


def test_serve_cli_on_two_processes_answers_like_generate_and_stops_on_sigterm(tmp_path,
                                                                                capsys):
    """Two `rocketkv serve --distributed ... --mesh data=2,model=2` processes, as a user
    starts one per host: process 0 answers HTTP with `rocketkv generate`'s greedy tokens,
    and on SIGTERM it drains, the follower stops with it, and both exit 0."""
    import http.client
    import signal
    import time

    from tiny_checkpoint import make_tiny_checkpoint

    from rocketkv_jax.cli import main as cli_main

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    coordinator, port = free_port(), free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "ROCKETKV_JAX_COMPILE_CACHE": "off"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "rocketkv_jax.cli", "serve", "--model", str(ckpt),
         "--mesh", "data=2,model=2", "--distributed", f"127.0.0.1:{coordinator},2,{i}",
         "--port", str(port + i), "--prefill-chunk", "16", "--method", "full"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 0)]
    follower, leader = procs
    try:
        def post(body):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read())

        deadline = time.monotonic() + 300
        while True:
            assert leader.poll() is None and follower.poll() is None, (
                leader.stderr.read() if leader.poll() is not None else follower.stderr.read())
            try:
                status, _ = post({"model": "ckpt", "prompt": "w1", "max_tokens": 1})
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the leader did not come up"
            time.sleep(1)
        status, body = post({"model": "ckpt", "prompt": "w1 w2 w3 w4", "max_tokens": 5,
                             "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        assert cli_main(["generate", "--model", str(ckpt), "--method", "full",
                         "--max-new-tokens", "5", "--prompt", "w1 w2 w3 w4"]) == 0
        assert body["choices"][0]["text"].strip() == capsys.readouterr().out.strip()
        leader.send_signal(signal.SIGTERM)
        errs = []
        for p in (leader, follower):
            errs.append(p.communicate(timeout=120)[1])
            assert p.returncode == 0, errs[-1][-4000:]
        assert "process 1 of 2 follows process 0's turns" in errs[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

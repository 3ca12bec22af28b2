"""The serving engine over two processes of a `jax.distributed` run on this host, run by
test_serve_multihost.py: `python multihost_checks.py PROCESS_ID PORT OUT_JSON`, once per
process (2 forced CPU devices each, gloo collectives; XLA_FLAGS before JAX starts).

Both build the same random model and an engine on a data=2 x model=2 mesh over the 4
devices. Process 0 (the leader) submits serve_mesh_checks' requests, one more that it
cancels after its first token, then one that extends an earlier prompt, and drains.
Process 1 (a follower) runs the turns it reads until the leader stops. Each writes its
tokens (the leader's) and its engine's counters as JSON to OUT_JSON.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sharding"))
    sys.path.insert(0, os.path.dirname(__file__))

import json  # noqa: E402
import threading  # noqa: E402

import jax  # noqa: E402


def main(process: int, port: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
    from serve_mesh_checks import requests, serve
    from sharded_checks import CFG

    from rocketkv_jax import sharding as shd
    from rocketkv_jax.engine.scheduler import Engine
    from rocketkv_jax.engine.turns import TurnLink
    from rocketkv_jax.models.params import random_params

    params = random_params(CFG, seed=0, scale=0.3)
    engine = Engine(params, CFG, slots=4, prefill_chunk=64, mesh=shd.make_mesh(2, 2),
                    link=TurnLink.from_runtime())
    report = {"process": jax.process_index(), "processes": jax.process_count(),
              "devices": jax.device_count()}
    if process == 0:
        reqs, extend = requests()
        report["tokens"] = serve(engine, reqs)
        report["cancelled"] = cancel_after_first_token(engine, reqs[0])
        report["tokens"] += serve(engine, [extend])
        report["drained"] = engine.drain(timeout=600)
    else:
        engine.wait()
    report["stats"] = engine.stats()
    with open(out, "w") as f:
        json.dump(report, f)


def cancel_after_first_token(engine, req) -> list:
    """req with room for 64 tokens, cancelled from its listener at its first token."""
    from rocketkv_jax.engine.serving_api import ServeRequest

    got, ended, submitted, box = [], threading.Event(), threading.Event(), {}
    req = ServeRequest(req.prompt, 64, method=req.method, token_budget=req.token_budget,
                       stop_ids=())

    def on_event(ev):
        got.append(ev.token if ev.kind == "token" else ev.finish_reason)
        if ev.kind == "token" and len(got) == 1:
            submitted.wait(60)
            engine.cancel(box["handle"].id)
        elif ev.kind != "token":
            ended.set()

    box["handle"] = engine.submit(req, on_event)
    submitted.set()
    assert ended.wait(600)
    return got


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

"""The serving engine on 4 forced host devices, run by test_serve_mesh.py in ONE subprocess
(XLA_FLAGS must be set before JAX starts). Prints one JSON report on the last line.

For each mesh of sharded_checks.MESHES, the same requests (rocketkv and full KV, mixed
lengths, one sampled, one extending an earlier prompt) through an engine on the mesh and
through one on a single device; the report holds every request's tokens per engine.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "sharding"))

import json  # noqa: E402
import threading  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sharded_checks import CFG, MESHES  # noqa: E402

from rocketkv_jax import sharding as shd  # noqa: E402
from rocketkv_jax.engine.scheduler import Engine  # noqa: E402
from rocketkv_jax.engine.serving_api import ServeRequest  # noqa: E402
from rocketkv_jax.models.params import random_params  # noqa: E402
from rocketkv_jax.sampling import Sampling  # noqa: E402


def requests():
    rng = np.random.default_rng(1)
    ps = [rng.integers(3, CFG.vocab_size, n).tolist() for n in (200, 150, 181, 97)]
    out = [ServeRequest(tuple(p), 8, method=m, token_budget=b, stop_ids=())
           for p, (m, b) in zip(ps, [("rocketkv", 64), ("full", None)] * 2, strict=True)]
    out.append(ServeRequest(tuple(ps[1]), 8, sampling=Sampling(0.9, top_p=0.9), seed=3,
                            token_budget=64, stop_ids=()))
    return out, ServeRequest(tuple(ps[0] + ps[3][:60]), 8, token_budget=64, stop_ids=())


def serve(engine, reqs):
    got = [[] for _ in reqs]
    ended = threading.Semaphore(0)

    def listener(i):
        def on_event(ev):
            if ev.kind == "token":
                got[i].append(ev.token)
            else:
                got[i].append(ev.kind)
                ended.release()
        return on_event

    for i, r in enumerate(reqs):
        engine.submit(r, listener(i))
    for _ in reqs:
        assert ended.acquire(timeout=600)
    return got


def run(params, mesh):
    engine = Engine(params, CFG, slots=4, prefill_chunk=64, mesh=mesh)
    try:
        reqs, extend = requests()
        tokens = serve(engine, reqs)
        tokens += serve(engine, [extend])  # extends the first prompt: a prefix hit
        s = engine.stats()
        rows = [len(p.rows) for p in engine._pools.values()]
        specs = sorted({str(getattr(x.sharding, "spec", "")) for p in engine._pools.values()
                        for x in jax.tree.leaves(p.cache) if x.ndim >= 4})
        return {"tokens": tokens, "prefix_hits": s["prefix_hits"], "pool_rows": rows,
                "cache_specs": specs}
    finally:
        engine.close()


def main(ckpt_seed: int = 0) -> None:
    params = random_params(CFG, seed=ckpt_seed, scale=0.3)
    report = {"devices": jax.device_count(), "single": run(params, None)}
    for data, model in MESHES:
        report[f"{data}x{model}"] = run(params, shd.make_mesh(data, model))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

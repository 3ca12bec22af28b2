"""`rocketkv bench --calibrate`: measure the dense-fallback cost model's constants
(`methods.cost_file.CostConstants`) on the device at hand, for every kernel backend that runs
here (the jnp references everywhere, the Triton kernels on a GPU), and write them where the
cost model finds them (`methods/cost_file.py`).

Each constant is a sparse path's measured time converted into bytes at the dense path's
own rate, as the model counts them (a KV token is 2D * 2 bytes):
  rate             = bytes of K and V of S slots / time of dense decode attention over them
  gather_factor    = (sparse_decode_attention of k slots - k * 4 index bytes) / (k * 2D * 2)
  metadata_factor  = (approx_scores on channel-major pages - its f32 scores) / (P * R * 2)
  key_channel_factor = the same over the key rows themselves (page 1, row-major)
  score_bytes, rank_bytes: the rest of `hybrid_select` (temperature, softmax, group mean,
    top-k) per slot, measured at two group sizes G1 < G2: cost(G) = G * score + rank.
A derived constant that comes out at or below zero (the operation's time is lost in the
dense path's noise: a shape too small) is raised to MIN_CONSTANT and listed under "floored".
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels as kernel_lib
from ..cache import KVCache
from ..kernels.backend import triton_runs_here
from ..methods import cost_file
from ..methods.cost import INDEX_BYTES, KV_ELEMENT_BYTES
from ..methods.cost_file import CostConstants
from ..methods.dense import dense_decode_attention
from ..methods.stage2 import hybrid_select

MIN_CONSTANT = 0.05


@dataclasses.dataclass(frozen=True)
class CalibrationShape:
    """The decode shapes the calibration times: batch, KV heads, the two query groups per
    KV head (G1 < G2), head dim, cached slots, page size, channels, exact tokens."""

    batch: int
    kv_heads: int
    groups: tuple[int, int]
    head_dim: int
    slots: int
    page_size: int
    top_r: int
    k_top: int
    iters: int  # timed calls per repeat (median of 3 repeats)


SHAPES = {
    # Llama-3.1-8B attention (8 KV heads, G = 4, D = 128) at 64k slots, batch 4: dense reads
    # 1 GiB per call (~0.4 ms at H100 bandwidth), so launch overheads stay small.
    "gpu": CalibrationShape(4, 8, (1, 4), 128, 65536, 16, 32, 4096, iters=20),
    # the same heads at 16k slots, batch 1 (~10-30 ms per dense call on a 2-core CPU)
    "cpu": CalibrationShape(1, 8, (1, 4), 128, 16384, 16, 32, 1024, iters=5),
    # seconds, for tests and the GPU check's CPU smoke (numbers are noise)
    "tiny": CalibrationShape(1, 2, (1, 2), 64, 1024, 8, 8, 64, iters=2),
}


def time_call(f, *args, iters: int, repeats: int = 3) -> float:
    """Median seconds per call of a jitted `f` (compiled and warmed up first): `iters`
    calls dispatched asynchronously, then one sync, per repeat."""
    jax.block_until_ready(f(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def measured_backends() -> tuple[str, ...]:
    """The backends the calibration measures here (interpret is never timed)."""
    return ("reference", "triton") if triton_runs_here() else ("reference",)


def _operands(shape: CalibrationShape, G: int, seed: int = 0):
    B, K, D, S = shape.batch, shape.kv_heads, shape.head_dim, shape.slots
    dt = jnp.bfloat16  # the cost model counts bf16 caches (KV_ELEMENT_BYTES)
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, K * G, D), dt)  # [B, H, D]
    k = jax.random.normal(keys[1], (B, K, S, D), dt)  # [B, K, S, D]
    v = jax.random.normal(keys[2], (B, K, S, D), dt)  # [B, K, S, D]
    P = S // shape.page_size
    pages = k.reshape(B, K, P, shape.page_size, D)
    page_max = jnp.swapaxes(pages.max(axis=3), 2, 3)  # [B, K, D, P] channel-major
    page_min = jnp.swapaxes(pages.min(axis=3), 2, 3)  # [B, K, D, P]
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, K, S))
    empty = jnp.zeros((B, K, 0, D), dt)
    cache = KVCache(k, v, pos, jnp.full((B,), S, jnp.int32), empty, empty)
    rng = np.random.default_rng(seed)
    idx = np.stack([np.stack([rng.permutation(S)[: shape.k_top] for _ in range(K)])
                    for _ in range(B)]).astype(np.int32)  # [B, K, k] distinct slots
    channels = np.stack([np.stack([rng.permutation(D)[: shape.top_r] for _ in range(K)])
                         for _ in range(B)]).astype(np.int32)  # [B, K, R]
    visible = jnp.ones((B, K, S), bool)
    return q, cache, page_max, page_min, jnp.asarray(idx), jnp.asarray(channels), visible


def _times(shape: CalibrationShape, backends, G: int) -> dict:
    """Seconds per call of each timed operation at group size G."""
    q, cache, page_max, page_min, idx, channels, visible = _operands(shape, G)
    B, K, D = shape.batch, shape.kv_heads, shape.head_dim
    qg = q.reshape(B, K, G, D)  # [B, K, G, D]
    lengths = cache.length
    out = {"dense": time_call(jax.jit(dense_decode_attention), q, cache, visible,
                              iters=shape.iters)}
    for b in backends:
        def keys(qg, k, ch, n, b=b):
            return kernel_lib.approx_scores(qg, k, k, ch, n, page_size=1, kernels=b)

        def select(q, cache, visible, b=b):
            return hybrid_select(q, cache, visible, page_size=1, top_r=shape.top_r,
                                 k_top=shape.k_top, kernels=b, channel_major=False)[0]

        t = {"key_channels": time_call(jax.jit(keys), qg, cache.k, channels, lengths,
                                       iters=shape.iters),
             "hybrid_select": time_call(jax.jit(select), q, cache, visible, iters=shape.iters)}
        if G == shape.groups[1]:
            def gather(qg, k, v, i, b=b):
                return kernel_lib.sparse_decode_attention(qg, k, v, i, kernels=b)

            def pages(qg, mx, mn, ch, n, b=b):
                return kernel_lib.approx_scores(qg, mx, mn, ch, n, page_size=shape.page_size,
                                                kernels=b, channel_major=True)

            t["gather"] = time_call(jax.jit(gather), qg, cache.k, cache.v, idx,
                                    iters=shape.iters)
            t["page_bounds"] = time_call(jax.jit(pages), qg, page_max, page_min, channels,
                                         lengths, iters=shape.iters)
        out[b] = t
    return out


def derive(shape: CalibrationShape, times: dict[int, dict], backend: str):
    """(CostConstants, names of the floored constants) from `_times` at both group sizes."""
    e, D, S, R, k = KV_ELEMENT_BYTES, shape.head_dim, shape.slots, shape.top_r, shape.k_top
    G1, G2 = shape.groups
    heads = shape.batch * shape.kv_heads
    P = S // shape.page_size
    dense_s = statistics.median([times[G1]["dense"], times[G2]["dense"]])
    rate = heads * S * 2 * D * e / dense_s  # bytes per second at the dense path's rate

    def per_head(seconds: float) -> float:
        return seconds * rate / heads

    t1, t2 = times[G1][backend], times[G2][backend]
    raw = {
        "gather_factor": (per_head(t2["gather"]) - k * INDEX_BYTES) / (k * 2 * D * e),
        "metadata_factor": (per_head(t2["page_bounds"]) - G2 * P * 4) / (P * R * e),
        "key_channel_factor": (per_head(t2["key_channels"]) - G2 * S * 4) / (S * R * e),
    }
    # the selection after the key-channel scores, per slot, at each group size
    y1 = per_head(t1["hybrid_select"] - t1["key_channels"]) / S
    y2 = per_head(t2["hybrid_select"] - t2["key_channels"]) / S
    raw["score_bytes"] = (y2 - y1) / (G2 - G1)
    raw["rank_bytes"] = y1 - raw["score_bytes"] * G1
    floored = sorted(n for n, x in raw.items() if not x > MIN_CONSTANT)
    values = {n: max(x, MIN_CONSTANT) for n, x in raw.items()}
    return CostConstants(**values), floored, {"raw": raw, "dense_rate_GBps": rate / 1e9}


def calibrate(shape: CalibrationShape, backends=None) -> dict:
    """Measure every backend of `backends` (default: those that run here). Returns
    {"backends": {name: CostConstants}, "measurements": {...}} (JSON-able but the first)."""
    backends = tuple(backends or measured_backends())
    times = {G: _times(shape, backends, G) for G in shape.groups}
    consts, details = {}, {}
    for b in backends:
        consts[b], floored, extra = derive(shape, times, b)
        details[b] = {"floored": floored, **extra}
    return {"backends": consts,
            "measurements": {"shape": dataclasses.asdict(shape),
                             "seconds": {str(G): t for G, t in times.items()}, **details}}


def run(shape_name: str = "auto", path: Path | None = None, out=None) -> Path:
    """Calibrate, write the file (default: this device's in the user cache), print what
    was measured and where it went (to `out`, default stdout). Returns the path."""
    out = out or sys.stdout
    if shape_name == "auto":
        shape_name = "gpu" if jax.default_backend() == "gpu" else "cpu"
    shape = SHAPES[shape_name]
    ident = cost_file.device_identity()
    t0 = time.perf_counter()
    result = calibrate(shape)
    target = Path(path) if path is not None else cost_file.default_path(ident)
    cost_file.write(target, result["backends"], ident, jax=jax.__version__,
                    created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    seconds=round(time.perf_counter() - t0, 2),
                    measurements=result["measurements"])
    print(f"cost-model calibration on {cost_file.describe_device(ident)}, jax "
          f"{jax.__version__}, shape '{shape_name}' ({time.perf_counter() - t0:.1f} s)",
          file=out)
    names = list(CostConstants.__dataclass_fields__)
    print("  backend    " + "  ".join(f"{n:>18}" for n in names), file=out)
    for b, c in result["backends"].items():
        floored = result["measurements"][b]["floored"]
        print(f"  {b:<10} " + "  ".join(f"{getattr(c, n):>18.3g}" for n in names)
              + (f"   (floored: {', '.join(floored)})" if floored else ""), file=out)
    print(f"written to {target}", file=out)
    default = cost_file.default_path(ident)
    env = cost_file.COST_FILE_ENV
    if target.absolute() != default.absolute():
        print(f"plans use it with {env}={target}", file=out)
    else:
        print(f"plans on this device use it from now on ({env}=off: the built-ins)", file=out)
    return target

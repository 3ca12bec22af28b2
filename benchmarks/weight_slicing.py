"""What a decode step pays on XLA:CPU to read one layer's weights out of the stacked
[layers, ...] parameters, measured in one run.

    python benchmarks/weight_slicing.py [--layers 2] [--hidden 4096] [--ffn 14336]
                                        [--batch 8[,1,...]] [--dtype float32|bfloat16]
                                        [--iters 9] [--quick]

The decoders keep each weight as one array over all layers and loop over the layers with
`lax.fori_loop`, indexing `w[i]` (models/llama.py). XLA:CPU cannot hand a slice at a
traced offset to its matmul: it copies the slice into a fresh buffer first (a
`dynamic-slice` loop fusion before the dot), so the weights cross memory three times
(read, write, read) instead of once. This script times `x @ w[i]` over the layers five
ways on the same weights, [batch, hidden] @ [hidden, ffn] (Llama-3.1-8B's MLP shape by
default, float32 or `--dtype bfloat16`). Every way multiplies with `models.layers.linear`
as the decoders do (bf16 operands, f32 accumulation and result):

  traced index  lax.fori_loop over the stacked array, as the decoders do
  static index  a Python loop over w[0], w[1], ... of the stacked array
  separate      a Python loop over one array per layer (no slicing at all)

  switch        lax.fori_loop over one array per layer, each matmul in a lax.switch
                with a branch per layer: the form models.llama.loop_layers runs
                per-layer weights in (no slicing, and no unrolling)
  numpy         numpy's matmul (its BLAS) on one array per layer: whether another
                library's matmul reads these weights faster at this batch (float32
                only: numpy has no bf16 matmul of its own)

and counts the weight-sized copy fusions in each compiled program (none for numpy). Each
row prints the median step time, the weight bytes / time (GB/s, weights read once) and
the ratio to the "separate" row, for each batch size given. The same run measures this CPU's memory
bandwidth (as benchmarks/decode_batched.py does) and prints what share of it the
"separate" matmul reaches: the ceiling a decode step's weight reads can get to with
XLA:CPU's matmul, whatever the layout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rocketkv_jax.bench.grid import machine_line
from rocketkv_jax.bench.measure import measure_bandwidth
from rocketkv_jax.bench.xla_stats import copy_fusions
from rocketkv_jax.models import layers


def _traced(w, x):
    def body(i, h):
        return h + layers.linear(x, w[i])[:, : h.shape[1]]

    return jax.lax.fori_loop(0, w.shape[0], body, jnp.zeros((x.shape[0], x.shape[1])))


def _static(w, x):
    h = jnp.zeros((x.shape[0], x.shape[1]))
    for i in range(w.shape[0]):
        h = h + layers.linear(x, w[i])[:, : h.shape[1]]
    return h


def _separate(ws, x):
    h = jnp.zeros((x.shape[0], x.shape[1]))
    for w in ws:
        h = h + layers.linear(x, w)[:, : h.shape[1]]
    return h


def _switch(ws, x):
    def body(i, h):
        return h + layers.linear(x, layers.LayerWeight(tuple(ws), i))[:, : h.shape[1]]

    return jax.lax.fori_loop(0, len(ws), body, jnp.zeros((x.shape[0], x.shape[1])))


def _numpy(ws, x):
    h = np.zeros((x.shape[0], x.shape[1]), np.float32)
    for w in ws:
        h = h + (x @ w)[:, : h.shape[1]]
    return h


def _time(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(layers: int, hidden: int, ffn: int, batch: int, iters: int,
            dtype: str = "float32") -> list[dict]:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((layers, hidden, ffn), dtype=np.float32) * 0.01,
                    dtype)
    ws = [jnp.asarray(np.asarray(w[i])) for i in range(layers)]  # own buffers
    x = jnp.ones((batch, hidden), dtype)
    weight_bytes = w.size * w.dtype.itemsize
    rows = []
    for name, fn, arg in (("traced index", _traced, w), ("static index", _static, w),
                          ("switch", _switch, ws), ("separate", _separate, ws)):
        compiled = jax.jit(fn).lower(arg, x).compile()
        med = _time(lambda c=compiled, a=arg: c(a, x).block_until_ready(), iters)
        rows.append({"way": name, "median_s": med, "GBps": weight_bytes / med / 1e9,
                     "copies": copy_fusions(compiled.as_text(), (hidden, ffn), dtype)})
    base = rows[-1]["median_s"]
    if dtype == "float32":
        w_np, x_np = [np.asarray(a) for a in ws], np.asarray(x)
        med = _time(lambda: _numpy(w_np, x_np), iters)
        rows.append({"way": "numpy", "median_s": med, "GBps": weight_bytes / med / 1e9,
                     "copies": 0})
    for r in rows:
        r["vs_separate"] = r["median_s"] / base
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--batch", default="8", help="comma list of batch sizes (default: 8)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the weights' and inputs' dtype (default: float32)")
    p.add_argument("--bandwidth-mb", type=int, default=1024,
                   help="bandwidth benchmark buffer in MiB (default: 1024)")
    p.add_argument("--iters", type=int, default=9, help="timed calls after one warm-up")
    p.add_argument("--quick", action="store_true", help="hidden 256, ffn 512, 3 iters")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.ffn, a.iters, a.bandwidth_mb = 256, 512, 3, 16
    try:
        batches = [int(x) for x in a.batch.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        p.error(f"--batch takes a comma list of batch sizes >= 1, got {a.batch!r}")
    for k in ("layers", "hidden", "ffn", "iters", "bandwidth_mb"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    print(machine_line())
    bw = measure_bandwidth(a.bandwidth_mb * 2**20, 3)["best_GBps"]
    print(f"memory bandwidth: {bw:.1f} GB/s (best of a numpy copy and a jitted sum over "
          f"{a.bandwidth_mb} MiB, as benchmarks/decode_batched.py measures it)")
    for batch in batches:
        print(f"\nx [{batch}, {a.hidden}] @ w[i] [{a.hidden}, {a.ffn}] over {a.layers} layers, "
              f"{a.dtype}, median of {a.iters} calls")
        print(f"{'way':<14} {'ms':>9} {'GB/s':>7} {'copies':>7} {'x separate':>11}")
        rows = measure(a.layers, a.hidden, a.ffn, batch, a.iters, a.dtype)
        for r in rows:
            print(f"{r['way']:<14} {r['median_s'] * 1e3:9.1f} {r['GBps']:7.2f} "
                  f"{r['copies']:7d} {r['vs_separate']:11.2f}")
        sep = next(r["GBps"] for r in rows if r["way"] == "separate")
        print(f"one array per layer reads at {sep / bw:.0%} of the memory bandwidth: a step "
              f"whose bytes are these weights runs at >= {bw / sep:.2f}x its byte roofline")
    return 0


if __name__ == "__main__":
    sys.exit(main())

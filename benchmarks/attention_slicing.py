"""What dense decode attention costs on XLA:CPU, against the bytes it must read, four ways
in one run.

    python benchmarks/attention_slicing.py [--shape llama8b|smollm2] [--batch 8[,1,...]]
                                           [--context 8192[,...]] [--blocks 256,1024,...]
                                           [--iters 7] [--quick]

Full KV's decode step, and every dense fallback, attends one query per head over the
whole cache of each layer. The decoders keep the cache as one [layers, B, K, S, D] array
per key and value and loop over the layers with `lax.fori_loop`; `models.layers.
decode_attention` reads the layer's keys and values in blocks with an online softmax.
This script times that attention over every layer four ways, on the same numbers:

  blockwise, stacked   lax.fori_loop over the stacked cache, `decode_attention(...,
                       layer=i)`: what full KV's step runs today
  whole, stacked       lax.fori_loop over the stacked cache, the layer's scores [B, K, S, G]
                       from one dot on k[i], a softmax and one dot on v[i]
  blockwise, separate  a Python loop over one cache array per layer (no slicing)
  whole, separate      the same two dots on one cache array per layer (no slicing): what
                       a per-layer cache would let a step run

Each row prints the median time, the cache bytes / time (GB/s; keys and values read
once), that time against the byte roofline at the memory bandwidth measured in the same
run, the loop fusions in the compiled program that copy a block of one layer's cache
before a dot (XLA:CPU cannot hand a slice at a traced offset to its dot), and the largest
difference from the first row's output.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rocketkv_jax import checks
from rocketkv_jax.bench.grid import machine_line
from rocketkv_jax.bench.measure import measure_bandwidth
from rocketkv_jax.models.layers import NEG_INF, decode_attention, decode_block_size

# (layers, KV heads, query heads per KV head, head_dim): the models' attention shapes; the
# Llama-3.1-8B shape keeps 2 of its 32 layers, as benchmarks/decode_batched.py does
SHAPES = {"llama8b": (2, 8, 4, 128), "smollm2": (30, 3, 3, 64)}


def whole(q, k, v, visible):
    """Dense attention of q [B, H, D] over k, v [B, K, S, D] (visible [B, K, S]) as two
    dots over the whole cache: scores [B, K, S, G], so that neither dot transposes it."""
    B, H, D = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K, D) * (1.0 / math.sqrt(D))
    s = jnp.einsum("bkgd,bksd->bksg", qg, k)
    s = jnp.where(visible[..., None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=2)
    return jnp.einsum("bksg,bksd->bkgd", p, v).reshape(B, H, D)


def _stacked(attend):
    def run(q, k, v, visible):
        def body(i, h):  # each layer's query depends on the last one's output
            return h + attend(q + h, k, v, visible, i)

        return jax.lax.fori_loop(0, k.shape[0], body, jnp.zeros_like(q))

    return run


def _separate(attend):
    def run(q, ks, vs, visible):
        h = jnp.zeros_like(q)
        for k, v in zip(ks, vs, strict=True):
            h = h + attend(q + h, k, v, visible)
        return h

    return run


WAYS = {
    "blockwise, stacked": (_stacked(lambda q, k, v, m, i: decode_attention(q, k, v, m,
                                                                            layer=i)), True),
    "whole, stacked": (_stacked(lambda q, k, v, m, i: whole(q, k[i], v[i], m)), True),
    "blockwise, separate": (_separate(decode_attention), False),
    "whole, separate": (_separate(whole), False),
}


def block_copies(hlo: str, B: int, K: int, D: int) -> int:
    """Loop fusions in optimized HLO text that write a [B, K, s, D] block sliced out of a
    cache (a fused computation holding a dynamic-slice), for any s."""
    bodies = re.split(r"\n(?=%|ENTRY)", hlo)
    slicing = {b.split(" ", 1)[0][1:] for b in bodies if " dynamic-slice(" in b}
    rows = f"(?:{B},)?" if B == 1 else f"{B},"  # XLA drops a batch of 1 from the shape
    shape = re.compile(rf"= f32\[{rows}{K},\d+,{D}\]\{{[\d,]*\}} fusion\(.*calls=%([\w.-]+)")
    return sum(1 for line in hlo.splitlines()
               if "kind=kLoop" in line and (m := shape.search(line)) and m[1] in slicing)


def ways(blocks: Sequence[int] = ()) -> dict:
    """WAYS, and "blockwise, stacked" at each of `blocks` slots per block."""
    extra = {f"blockwise, stacked, {b}": (_stacked(
        lambda q, k, v, m, i, b=b: decode_attention(q, k, v, m, block=b, layer=i)), True)
        for b in blocks}
    return {**WAYS, **extra}


def measure(shape: tuple[int, int, int, int], batch: int, context: int, iters: int,
            bandwidth: float, blocks: Sequence[int] = ()) -> list[dict]:
    L, K, G, D = shape
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((L, batch, K, context, D), dtype=np.float32))
    v = jnp.asarray(rng.standard_normal((L, batch, K, context, D), dtype=np.float32))
    q = jnp.asarray(rng.standard_normal((batch, K * G, D), dtype=np.float32))
    visible = jnp.ones((batch, K, context), bool).at[:, :, context - 7:].set(False)
    ks, vs = [k[i] for i in range(L)], [v[i] for i in range(L)]  # own buffers
    cache_bytes = 2 * k.size * 4
    rows, first = [], None
    for name, (fn, stacked) in ways(blocks).items():
        args = (q, k, v, visible) if stacked else (q, ks, vs, visible)
        compiled = jax.jit(fn).lower(*args).compile()
        out = np.asarray(compiled(*args))
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            compiled(*args).block_until_ready()
            times.append(time.perf_counter() - t0)
        first = out if first is None else first
        med = statistics.median(times)
        rows.append({"way": name, "median_s": med, "GBps": cache_bytes / med / 1e9,
                     "roofline": med / (cache_bytes / bandwidth / 1e9),
                     "copies": block_copies(compiled.as_text(), batch, K, D),
                     "max_diff": float(np.abs(out - first).max())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="llama8b",
                   help="attention shape: llama8b (2 of 32 layers, 8 KV heads, groups of "
                   "4, head_dim 128) or smollm2 (30 layers, 3 KV heads, groups of 3, "
                   "head_dim 64) (default: llama8b)")
    p.add_argument("--batch", default="8", help="comma list of batch sizes (default: 8)")
    p.add_argument("--context", default="8192",
                   help="comma list of cache lengths S, e.g. 8k,32k (default: 8192)")
    p.add_argument("--blocks", default="",
                   help="comma list of block sizes (slots): one more blockwise, stacked row "
                   "per size (default: none; the first row uses decode_block_size's)")
    p.add_argument("--iters", type=int, default=7, help="timed calls after one warm-up")
    p.add_argument("--bandwidth-mb", type=int, default=1024,
                   help="bandwidth benchmark buffer in MiB (default: 1024)")
    p.add_argument("--quick", action="store_true",
                   help="smollm2 shape with 2 layers, context 256, 3 iters")
    a = p.parse_args(argv)
    try:
        batches = checks.token_counts(a.batch, "--batch")
        contexts = checks.token_counts(a.context, "--context")
        blocks = checks.token_counts(a.blocks, "--blocks") if a.blocks else ()
    except ValueError as e:
        p.error(str(e))
    if a.iters < 1 or a.bandwidth_mb < 1:
        p.error("--iters and --bandwidth-mb must be >= 1")
    shape = SHAPES[a.shape]
    if a.quick:
        a.shape, contexts, a.iters, a.bandwidth_mb = "smollm2", [256], 3, 16
        shape = (2, *SHAPES["smollm2"][1:])
    L, K, G, D = shape
    print(machine_line())
    bw = measure_bandwidth(a.bandwidth_mb * 2**20, 3)["best_GBps"]
    print(f"memory bandwidth: {bw:.1f} GB/s (best of a numpy copy and a jitted sum over "
          f"{a.bandwidth_mb} MiB, as benchmarks/decode_batched.py measures it)")
    for batch in batches:
        for S in contexts:
            print(f"\n{a.shape} shape: {L} layers, q [{batch}, {K * G}, {D}] over k, v "
                  f"[{batch}, {K}, {S}, {D}] per layer, float32, median of {a.iters} calls")
            print(f"{'way':<26} {'ms':>9} {'GB/s':>7} {'x roofline':>11} {'copies':>7} "
                  f"{'max diff':>9}  (block {decode_block_size(batch, K, D)} slots)")
            for r in measure(shape, batch, S, a.iters, bw, blocks):
                print(f"{r['way']:<26} {r['median_s'] * 1e3:9.1f} {r['GBps']:7.2f} "
                      f"{r['roofline']:11.2f} {r['copies']:7d} {r['max_diff']:9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bytes and time of one decode step: dense attention vs RocketKV's sparse stage-2 path.

The sparse path is what RocketKV runs per layer and decode step after stage 1:
`approx_scores` (Pallas) -> XLA top-k of pages -> `sparse_decode_attention` (Pallas), over the
cache stage 1 kept (capacity, page size and channel count from the budget split).

On a GPU it times dense attention (XLA, and JAX's own Pallas `decode_attention.gqa`) and the
sparse path (Triton kernels and the XLA reference), and prints achieved bandwidth as a fraction
of a measured device-to-device copy. On a CPU it prints the bytes each path moves per step
counted from shapes, XLA's `cost_analysis()` bytes for the reference paths, and the
Llama-3.1-8B roofline (weights + KV bytes per step, H100 HBM) with the bound on speedup.

    python benchmarks/bench_kernels.py --quick        # CI smoke, seconds
    python benchmarks/bench_kernels.py                # full tables (32k and 128k)
"""

from __future__ import annotations

import argparse
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from rocketkv_jax.bench.calibrate import time_call
from rocketkv_jax.bench.measure import make_operands

# byte accounting shared with `rocketkv bench`
from rocketkv_jax.bench.roofline import (
    LLAMA_8B,
    cpu_name,
    dense_layer_bytes,
    print_roofline,
    sparse_layer_bytes,
)
from rocketkv_jax.bench.tables import fmt_bytes, print_table
from rocketkv_jax.bench.xla_stats import bytes_accessed
from rocketkv_jax.kernels import approx_scores, sparse_decode_attention
from rocketkv_jax.methods.budget import rocketkv_split


# ------------------------------------------------------------------- the two decode paths
def dense_decode_attention(q, k, v, lengths):
    """XLA dense decode attention: q [B, K, G, D], k/v [B, K, S, D], lengths [B]."""
    d = q.shape[-1]
    logits = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(d)  # [B, K, G, S]
    valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [B, S]
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", p, v, preferred_element_type=jnp.float32).astype(
        q.dtype
    )


def sparse_decode_step(q, k, v, page_max, page_min, lengths, *, page_size, top_r, k_top,
                       kernels):
    """RocketKV stage 2: channels -> approx page scores -> top pages -> exact attention.

    Page-granular top-k (top ceil(k_top / page) pages, then their tokens) selects the same
    tokens as token-level top-k over page scores repeated `page` times, up to ties.
    """
    b, kv, _, d = q.shape
    _, channels = jax.lax.top_k(jnp.abs(q.astype(jnp.float32)).mean(axis=2), top_r)  # [B,K,R]
    scores = approx_scores(q, page_max, page_min, channels.astype(jnp.int32), lengths,
                           page_size=page_size, kernels=kernels)  # [B, K, G, P]
    q_abs = jnp.abs(q.astype(jnp.float32))
    q_sel = jnp.take_along_axis(q_abs, channels[:, :, None, :], axis=-1)  # [B, K, G, R]
    scale = jnp.sqrt(d * q_sel.sum(-1) / q_abs.sum(-1))[..., None]  # [B, K, G, 1] SparQ
    page_prob = jax.nn.softmax(scores / scale, axis=-1).mean(axis=2)  # [B, K, P]
    n_pages = min(page_prob.shape[-1], -(-k_top // page_size))
    _, pages = jax.lax.top_k(page_prob, n_pages)  # [B, K, n]
    slots = pages[..., None] * page_size + jnp.arange(page_size)  # [B, K, n, page]
    slots = slots.reshape(b, kv, -1)[..., :k_top]  # [B, K, M/2]
    slots = jnp.where(slots < lengths[:, None, None], slots, -1).astype(jnp.int32)
    return sparse_decode_attention(q, k, v, slots, kernels=kernels)


def xla_bytes_accessed(f, *shapes) -> float | None:
    """XLA's cost-model bytes for a jitted function, or None where unavailable."""
    return bytes_accessed(jax.jit(f).lower(*shapes).compile())


# ------------------------------------------------------------------------------ timing
def copy_bandwidth(n_bytes: int, iters: int) -> float:
    """Device-to-device bytes/s of an elementwise read + write of an n_bytes f32 array."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    return 2 * x.size * 4 / time_call(f, x, iters=iters)


def bytes_table(args, dtype) -> None:
    """Per-layer bytes from shapes, and XLA's cost analysis of the reference paths."""
    e = jnp.dtype(dtype).itemsize
    kv, g, d = LLAMA_8B["kv_heads"], LLAMA_8B["heads"] // LLAMA_8B["kv_heads"], 128
    rows = []
    for context in args.contexts:
        seq = context + args.new_tokens
        dense = dense_layer_bytes(seq, kv, d, e)
        dense_xla = None
        if args.cost_analysis:
            cache = jax.ShapeDtypeStruct((1, kv, seq, d), dtype)
            dense_xla = xla_bytes_accessed(
                dense_decode_attention, jax.ShapeDtypeStruct((1, kv, g, d), dtype), cache, cache,
                jax.ShapeDtypeStruct((1,), jnp.int32),
            )
        for budget in args.budgets:
            plan = rocketkv_split(budget, seq, args.new_tokens, d)
            ideal = sparse_layer_bytes(plan, kv, g, d, e, "ideal")
            rowmajor = sparse_layer_bytes(plan, kv, g, d, e, "row-major")
            sparse_xla = None
            if args.cost_analysis:
                pages = -(-plan.capacity // plan.page_size)
                step = functools.partial(
                    sparse_decode_step, page_size=plan.page_size, top_r=plan.top_r,
                    k_top=plan.k_top, kernels="reference",
                )
                sparse_xla = xla_bytes_accessed(
                    step,
                    jax.ShapeDtypeStruct((1, kv, g, d), dtype),
                    *[jax.ShapeDtypeStruct((1, kv, plan.capacity, d), dtype)] * 2,
                    *[jax.ShapeDtypeStruct((1, kv, pages, d), dtype)] * 2,
                    jax.ShapeDtypeStruct((1,), jnp.int32),
                )
            rows.append([
                f"{context // 1024}k", str(budget), str(plan.capacity), str(plan.page_size),
                str(plan.top_r), str(plan.k_top), fmt_bytes(dense), fmt_bytes(ideal["total"]),
                fmt_bytes(rowmajor["total"]), f"{dense / ideal['total']:.0f}x",
                fmt_bytes(dense_xla), fmt_bytes(sparse_xla),
            ])
    print_table(
        f"Bytes per layer and decode step, batch 1, K={kv} G={g} D={d} "
        f"{jnp.dtype(dtype).name}, {args.new_tokens} new tokens (shapes; XLA cost model)",
        ["ctx", "M", "cap", "page", "r", "k_top", "dense", "sparse", "sparse-rowmaj",
         "ratio", "XLA dense", "XLA sparse(ref)"],
        rows,
    )
    print("  sparse = selected channels of one of max/min per page (what the kernel requests; "
          "exact with\n  channel-major metadata) + approx scores + k_top K/V rows. "
          "sparse-rowmaj = DRAM sectors\n  fetched from row-major [P, D] metadata "
          "(random-channel model). XLA's cost model charges a\n  gather its whole operand, "
          "so 'XLA sparse(ref)' over-states the reference path's real traffic.")


def timing_table(args, dtype, on_gpu: bool) -> None:
    """Measured time per layer-step: dense vs sparse path, and bandwidth vs a copy."""
    iters = 2 if args.quick else args.iters
    bw = copy_bandwidth(args.copy_mib << 20, iters=iters)
    kv, g, d = LLAMA_8B["kv_heads"], LLAMA_8B["heads"] // LLAMA_8B["kv_heads"], 128
    e = jnp.dtype(dtype).itemsize
    sparse_backend = "triton" if on_gpu else "reference"
    rows = []
    for context in args.contexts:
        seq = context + args.new_tokens
        # Capacity a multiple of 16 splits x 128 (upstream gqa's tiling); `seq` tokens valid.
        capacity = -(-seq // 2048) * 2048
        q, k, v, _, _, _ = make_operands(1, kv, g, d, capacity, 16, dtype)
        lengths = jnp.full((1,), seq, jnp.int32)
        dense_bytes = dense_layer_bytes(seq, kv, d, e)
        paths = {"dense xla": (jax.jit(dense_decode_attention), (q, k, v, lengths))}
        if on_gpu:
            from jax.experimental.pallas.ops.gpu import decode_attention

            k_t, v_t = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, S, K, D]
            q_h = q.reshape(1, kv * g, d)  # [B, H, D]
            paths["dense pallas"] = (
                functools.partial(decode_attention.gqa, kv_seq_len=lengths), (q_h, k_t, v_t)
            )
        dense_times = {}
        for name, (f, fargs) in paths.items():
            t = time_call(f, *fargs, iters=iters)
            dense_times[name] = t
            rows.append([f"{context // 1024}k", name, "-", f"{t * 1e6:.1f}",
                         fmt_bytes(dense_bytes), f"{dense_bytes / t / bw:.2f}", "1.00x"])
        base = min(dense_times.values())
        for budget in args.budgets:
            plan = rocketkv_split(budget, seq, args.new_tokens, d)
            ops = make_operands(1, kv, g, d, plan.capacity, plan.page_size, dtype, seed=1)
            sparse_bytes = sparse_layer_bytes(plan, kv, g, d, e, "row-major")["total"]
            backends = [sparse_backend] + (["reference"] if on_gpu else [])
            for backend in backends:
                step = jax.jit(functools.partial(
                    sparse_decode_step, page_size=plan.page_size, top_r=plan.top_r,
                    k_top=plan.k_top, kernels=backend,
                ))
                t = time_call(step, *ops, iters=iters)
                rows.append([f"{context // 1024}k", f"sparse {backend}", str(budget),
                             f"{t * 1e6:.1f}", fmt_bytes(sparse_bytes),
                             f"{sparse_bytes / t / bw:.2f}", f"{base / t:.2f}x"])
    print_table(
        f"Measured per layer-step on {jax.devices()[0].device_kind} ({jnp.dtype(dtype).name}, "
        f"batch 1); copy bandwidth {bw / 1e9:.1f} GB/s",
        ["ctx", "path", "M", "us", "bytes (shapes)", "BW / copy BW", "speedup"],
        rows,
    )



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: 32k bytes/roofline tables, a tiny timing run; seconds")
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072],
                   help="context lengths (prompt tokens) for the kernel tables")
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                   help="token budgets M")
    p.add_argument("--new-tokens", type=int, default=256,
                   help="N, generated tokens (enters RocketKV's split through L = T + N)")
    p.add_argument("--roofline-context", type=int, default=32768)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                   help="batch sizes for the roofline (8 x 32k full KV fits an 80 GB H100)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--time", action="store_true",
                   help="also time on a CPU (XLA reference paths; always on with a GPU)")
    p.add_argument("--no-cost-analysis", dest="cost_analysis", action="store_false",
                   help="skip compiling the reference paths for XLA's cost analysis")
    p.add_argument("--iters", type=int, default=50, help="timed calls per repeat")
    p.add_argument("--copy-mib", type=int, default=1024,
                   help="size of the device-to-device copy that calibrates bandwidth")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.budgets = [32768], [256, 4096]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {jax.device_count()} x "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}); jax {jax.__version__}, "
          f"numpy {np.__version__}")
    bytes_table(args, dtype)
    print_roofline(args.roofline_context, args.new_tokens, args.batches, args.budgets)
    if on_gpu or args.time:
        timing_table(args, dtype, on_gpu)
    elif args.quick:  # exercise the timing code path on a tiny shape
        tiny = argparse.Namespace(**{**vars(args), "contexts": [2048], "budgets": [256],
                                     "copy_mib": 16})
        timing_table(tiny, dtype, on_gpu)


if __name__ == "__main__":
    main()

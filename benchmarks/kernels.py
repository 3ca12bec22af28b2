"""Bytes and time of one decode step: dense attention vs RocketKV's sparse stage-2 path.

The sparse path is what RocketKV runs per layer and decode step after stage 1:
`approx_scores` (Pallas) -> XLA top-k of pages -> `sparse_decode_attention` (Pallas), over the
cache stage 1 kept (capacity, page size and channel count from the budget split).

On a GPU it times dense attention (XLA, and JAX's own Pallas `decode_attention.gqa`) and the
sparse path (Triton kernels and the XLA reference), and prints achieved bandwidth as a fraction
of a measured device-to-device copy. On a CPU it prints the bytes each path moves per step
counted from shapes, XLA's `cost_analysis()` bytes for the reference paths, and the
Llama-3.1-8B roofline (weights + KV bytes per step, H100 HBM) with the bound on speedup.

    python benchmarks/kernels.py --quick        # CI smoke, seconds
    python benchmarks/kernels.py                # full tables (32k and 128k)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rocketkv_jax.kernels import approx_scores, sparse_decode_attention

H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 HBM3 peak
SECTOR_BYTES = 32  # DRAM -> L2 transfer granularity on NVIDIA GPUs

# Llama-3.1-8B (HF config.json)
LLAMA_8B = dict(
    layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
    vocab=128256, tied_embeddings=False,
)


# ------------------------------------------------------------------------- budget split
@dataclasses.dataclass(frozen=True)
class Stage2Plan:
    """What RocketKV's stage 2 reads per KV head at budget M (see ALGORITHM.md)."""

    budget: int
    capacity: int  # tokens kept by stage 1 (prompt + new)
    page_size: int
    top_r: int
    k_top: int


def rocketkv_plan(budget: int, context: int, new_tokens: int, head_dim: int) -> Stage2Plan:
    """ALGORITHM.md's budget split, via the method layer's `rocketkv_split` when present."""
    try:
        from rocketkv_jax.methods.budget import rocketkv_split
    except ImportError:
        rocketkv_split = None
    seq = context + new_tokens
    if rocketkv_split is not None:
        s = rocketkv_split(budget, seq, new_tokens, head_dim)
        return Stage2Plan(s.token_budget, s.capacity, s.page_size, s.top_r, s.k_top)
    m = min(budget, seq)
    c = max(1.0, seq / m)
    a = min(0.2 + 0.06 * math.log2(c), 0.8)
    capacity = max(int(seq / c**a), min(2 * new_tokens, seq))
    c2 = max(1.0, capacity / m)
    page = math.ceil(math.sqrt(c2))
    page = page if page <= c2 else 1
    r = min(max(int(head_dim * page / c2), 1), head_dim)
    return Stage2Plan(m, capacity, page, r, m // 2)


# ------------------------------------------------------------------- bytes from shapes
def sector_fraction(head_dim: int, top_r: int, elem_bytes: int) -> float:
    """Expected fraction of a [D]-row's DRAM sectors fetched from ONE of page_max/page_min.

    Row-major [P, D] metadata: a sector holds 32 / elem_bytes channels; it is fetched when any
    of the R selected channels in it reads that array (sign + reads max, - reads min, taken as
    a fair coin). Channels are taken as uniformly random (top-|q| is not, so this is a model).
    """
    per_sector = max(1, SECTOR_BYTES // elem_bytes)
    d, r = head_dim, top_r
    untouched = sum(
        math.comb(per_sector, j) * math.comb(d - per_sector, r - j) / math.comb(d, r) * 0.5**j
        for j in range(0, min(per_sector, r) + 1)
    )
    return 1.0 - untouched


def dense_layer_bytes(context: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
    """K and V of every cached token, one layer, batch 1."""
    return 2 * context * kv_heads * head_dim * elem_bytes


def sparse_layer_bytes(
    plan: Stage2Plan, kv_heads: int, group: int, head_dim: int, elem_bytes: int,
    layout: str = "ideal",
) -> dict[str, float]:
    """Bytes of RocketKV's stage 2 for one layer, batch 1, cache of `plan.capacity` tokens.

    layout: "ideal" = only the R selected elements of one of max/min per page (what the
    kernel requests; achieved by channel-major [B, K, D, P] metadata), "row-major" = DRAM
    sectors fetched from [B, K, P, D] metadata (`sector_fraction`).
    """
    pages = math.ceil(plan.capacity / plan.page_size)
    if layout == "ideal":
        meta = pages * plan.top_r * elem_bytes
    else:
        meta = 2 * pages * head_dim * elem_bytes * sector_fraction(
            head_dim, plan.top_r, elem_bytes
        )
    scores = 2 * group * pages * 4  # approx [G, P] f32 written by the kernel, read by top-k
    n_sel = plan.k_top
    attn = n_sel * 2 * head_dim * elem_bytes + 2 * n_sel * 4  # K/V rows + indices (w + r)
    parts = {"metadata": meta, "scores": scores, "attention": attn}
    parts = {k: v * kv_heads for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def llama_weight_bytes(cfg: dict, elem_bytes: int) -> int:
    """Weights read per decode step: all matrices, but one embedding row (a lookup)."""
    h, kvh, hd = cfg["hidden"], cfg["kv_heads"], cfg["head_dim"]
    attn = h * cfg["heads"] * hd * 2 + h * kvh * hd * 2  # q, o + k, v
    mlp = 3 * h * cfg["intermediate"]
    per_layer = attn + mlp + 2 * h  # + two RMSNorm vectors
    lm_head = cfg["vocab"] * h
    return (cfg["layers"] * per_layer + lm_head + h + h) * elem_bytes  # + final norm + 1 row


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
                       backend):
    """RocketKV stage 2: channels -> approx page scores -> top pages -> exact attention.

    Page-granular top-k (top ceil(k_top / page) pages, then their tokens) selects the same
    tokens as token-level top-k over page scores repeated `page` times, up to ties.
    """
    b, kv, _, d = q.shape
    _, channels = jax.lax.top_k(jnp.abs(q.astype(jnp.float32)).mean(axis=2), top_r)  # [B,K,R]
    scores = approx_scores(q, page_max, page_min, channels.astype(jnp.int32), lengths,
                           page_size=page_size, backend=backend)  # [B, K, G, P]
    q_abs = jnp.abs(q.astype(jnp.float32))
    q_sel = jnp.take_along_axis(q_abs, channels[:, :, None, :], axis=-1)  # [B, K, G, R]
    scale = jnp.sqrt(d * q_sel.sum(-1) / q_abs.sum(-1))[..., None]  # [B, K, G, 1] SparQ
    page_prob = jax.nn.softmax(scores / scale, axis=-1).mean(axis=2)  # [B, K, P]
    n_pages = min(page_prob.shape[-1], -(-k_top // page_size))
    _, pages = jax.lax.top_k(page_prob, n_pages)  # [B, K, n]
    slots = pages[..., None] * page_size + jnp.arange(page_size)  # [B, K, n, page]
    slots = slots.reshape(b, kv, -1)[..., :k_top]  # [B, K, M/2]
    slots = jnp.where(slots < lengths[:, None, None], slots, -1).astype(jnp.int32)
    return sparse_decode_attention(q, k, v, slots, backend=backend)


def make_operands(b, kv, g, d, cache, page_size, dtype, seed=0):
    """Random decode operands for one layer: q, k, v, page_max, page_min, lengths."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, kv, g, d), dtype)
    k = jax.random.normal(keys[1], (b, kv, cache, d), dtype)
    v = jax.random.normal(keys[2], (b, kv, cache, d), dtype)
    pages = -(-cache // page_size)
    pad = pages * page_size - cache
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=jnp.nan)
    kp = kp.reshape(b, kv, pages, page_size, d)
    page_max = jnp.nanmax(kp, axis=3)  # [B, K, P, D]
    page_min = jnp.nanmin(kp, axis=3)
    lengths = jnp.full((b,), cache, jnp.int32)
    return q, k, v, page_max, page_min, lengths


def shapes_of(*arrays):
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]


def xla_bytes_accessed(f, *shapes) -> float | None:
    """XLA's cost-model bytes for a jitted function, or None where unavailable."""
    try:
        cost = jax.jit(f).lower(*shapes).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - cost analysis is best effort per platform
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return None if not cost else cost.get("bytes accessed")


# ------------------------------------------------------------------------------ timing
def time_call(f, *args, iters: int, repeats: int = 3) -> float:
    """Median seconds per call (async dispatch of `iters` calls, then one sync)."""
    jax.block_until_ready(f(*args))  # compile + warm up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def copy_bandwidth(n_bytes: int, iters: int) -> float:
    """Device-to-device bytes/s of an elementwise read + write of an n_bytes f32 array."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    return 2 * x.size * 4 / time_call(f, x, iters=iters)


# ------------------------------------------------------------------------------ tables
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


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
            plan = rocketkv_plan(budget, context, args.new_tokens, d)
            ideal = sparse_layer_bytes(plan, kv, g, d, e, "ideal")
            rowmajor = sparse_layer_bytes(plan, kv, g, d, e, "row-major")
            sparse_xla = None
            if args.cost_analysis:
                pages = -(-plan.capacity // plan.page_size)
                step = functools.partial(
                    sparse_decode_step, page_size=plan.page_size, top_r=plan.top_r,
                    k_top=plan.k_top, backend="reference",
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


def roofline_table(args) -> None:
    """Llama-3.1-8B per-step bytes (weights + KV) and the H100 bound on decode speedup."""
    cfg, e = LLAMA_8B, 2
    kv, g, d = cfg["kv_heads"], cfg["heads"] // cfg["kv_heads"], cfg["head_dim"]
    weights = llama_weight_bytes(cfg, e)
    context = args.roofline_context
    seq = context + args.new_tokens
    full_kv = cfg["layers"] * dense_layer_bytes(seq, kv, d, e)
    rows = []
    for batch in args.batches:
        full = weights + batch * full_kv
        rows.append([str(batch), "full", "-", fmt_bytes(batch * full_kv), fmt_bytes(full),
                     f"{full / H100_HBM_BYTES_PER_S * 1e3:.2f}", "1.00x", "1.00x"])
        for budget in args.budgets:
            plan = rocketkv_plan(budget, context, args.new_tokens, d)
            ideal = batch * cfg["layers"] * sparse_layer_bytes(plan, kv, g, d, e)["total"]
            rowm = batch * cfg["layers"] * sparse_layer_bytes(plan, kv, g, d, e,
                                                              "row-major")["total"]
            rows.append([
                str(batch), "rocketkv", str(budget), fmt_bytes(ideal), fmt_bytes(weights + ideal),
                f"{(weights + ideal) / H100_HBM_BYTES_PER_S * 1e3:.2f}",
                f"{full / (weights + ideal):.2f}x", f"{full / (weights + rowm):.2f}x",
            ])
    print_table(
        f"Llama-3.1-8B roofline at {context // 1024}k context (+{args.new_tokens} new), "
        f"bf16, H100 HBM {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s; weights read per step "
        f"{fmt_bytes(weights)}",
        ["batch", "method", "M", "KV bytes", "total bytes", "ms/step", "speedup bound",
         "bound (row-major meta)"],
        rows,
    )
    print("  KV bytes = 32 layers x (full: K+V of every token; rocketkv: stage-2 reads of the "
          "stage-1 cache).\n  Bound = full bytes / rocketkv bytes, i.e. a memory-bound step "
          "with perfect kernels.")


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
            plan = rocketkv_plan(budget, context, args.new_tokens, d)
            ops = make_operands(1, kv, g, d, plan.capacity, plan.page_size, dtype, seed=1)
            sparse_bytes = sparse_layer_bytes(plan, kv, g, d, e, "row-major")["total"]
            backends = [sparse_backend] + (["reference"] if on_gpu else [])
            for backend in backends:
                step = jax.jit(functools.partial(
                    sparse_decode_step, page_size=plan.page_size, top_r=plan.top_r,
                    k_top=plan.k_top, backend=backend,
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    roofline_table(args)
    if on_gpu or args.time:
        timing_table(args, dtype, on_gpu)
    elif args.quick:  # exercise the timing code path on a tiny shape
        tiny = argparse.Namespace(**{**vars(args), "contexts": [2048], "budgets": [256],
                                     "copy_mib": 16})
        timing_table(tiny, dtype, on_gpu)


if __name__ == "__main__":
    main()

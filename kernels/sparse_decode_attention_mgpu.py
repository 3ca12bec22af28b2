"""Sparse decode attention (stage 2 of RocketKV) as a Mosaic GPU kernel for Hopper.

Same contract as `sparse_decode_attention.py` (the Pallas-Triton kernel) and pinned to the
same reference, `sparse_decode_attention_reference`:

    out[b, k, g] = softmax(q[b, k, g] @ k[b, k, idx]^T * sm_scale) @ v[b, k, idx]

with idx = indices[b, k] (M token slots shared by the G query heads of KV head k; -1 = none).

Design (docs/kernels.md, "Mosaic GPU kernels", says why):
  - Grid (B * K, splits), flash-decoding as in the Triton kernel: each program runs an
    online softmax over its chunk of the M selected slots in blocks of `block_k` tokens and
    writes an unnormalised partial (o, max, sum); XLA combines the splits
    (`combine_splits`). The grid is 2-D so a vmap adds one axis.
  - Two warpgroups: a producer that fetches the selected K/V rows and a consumer that does
    the math, with a ring of `num_stages` SMEM slots between them (barriers both ways).
  - The gather: Hopper has no TMA gather (`ref.at[index_vector]` is sm_100 only), so the
    producer issues one TMA copy per selected row (a contiguous D-wide row of K and of V)
    into an untiled staging slot; all 2 * block_k copies of a block arrive on one barrier.
    Invalid slots (-1) fetch row 0 and are masked in the logits (a TMA copy has no mask,
    and a predicated copy would not arrive on the barrier).
  - The math is wgmma: a row TMA cannot land in the 8-row tiles wgmma reads, so the
    consumer copies each staged block into tiled, swizzled SMEM (a register round trip).
    wgmma needs M = 64 rows; decode has G <= 8 query heads per KV head, so q is padded to
    64 rows: the wasted FLOPs are free because decode is memory-bound (64 rows x 2 matmuls
    is 32 FLOP per K/V byte at bf16, under the H100's ~295 FLOP/byte ridge).
  - 16-bit caches (bf16, f16) feed wgmma directly (p is cast to the cache dtype for P @ V,
    as the Triton kernel does). f32 has no wgmma of its own that fits: tf32 keeps 10
    mantissa bits and needs both operands K-major, which V (token-major rows) is not for
    P @ V. So f32 operands are split x = hi + lo into two bf16 parts and each product is
    3 wgmmas (hi*hi + hi*lo + lo*hi, "bf16x3"): about 2^-16 relative error per product,
    f32-grade for attention; bf16 products are exact in the f32 accumulator, so the
    interpreter computes exactly what the tensor cores do.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backend as backend_lib
from .decode_shared import check_attention_args, combine_splits

# wgmma's M: the query rows of a tile (G query heads, zero padded).
_ROWS = 64
# Finite running-max start (see sparse_decode_attention._M_INIT): a block whose logits are all
# masked gives exp(-inf - m) = 0 and a correction of exp(0) = 1, never NaN.
_M_INIT = float(jnp.finfo(jnp.float32).min)
# 227 KiB of dynamic shared memory per H100 block, less room for what Mosaic adds (barriers,
# reduction scratch).
_SMEM_LIMIT = 220 * 1024


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shapes of one kernel launch."""

    batch: int
    kv_heads: int
    g_out: int  # query rows written back per split (G rounded up to 8)
    head_dim: int
    capacity: int
    block_k: int
    splits: int
    blocks: int  # blocks per split
    stages: int
    parts: int  # 1: 16-bit operands; 2: f32 split into bf16 hi + lo
    kv_dtype: jnp.dtype
    mma_dtype: jnp.dtype
    sm_scale: float

    @property
    def chunk(self) -> int:
        return self.blocks * self.block_k

    def smem_bytes(self) -> int:
        d, bk, mma = self.head_dim, self.block_k, jnp.dtype(self.mma_dtype).itemsize
        staging = self.stages * 2 * bk * d * jnp.dtype(self.kv_dtype).itemsize
        tiles = self.parts * (2 * bk * d + _ROWS * d + _ROWS * bk) * mma
        return staging + tiles + _ROWS * d * 4 + 2 * _ROWS * 4 + self.chunk * 4


def _tiled(dtype, minor: int):
    """Transforms of a wgmma operand in SMEM: 8-row tiles, swizzled by the row's bytes."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = min(128, minor * jnp.dtype(dtype).itemsize)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (f32) = hi + lo to about 2^-17 relative, both bf16."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _kernel(q_ref, idx_ref, k_ref, v_ref, o_ref, ml_ref,
            q_smem, idx_smem, k_stage, v_stage, k_tile, v_tile, p_tile, o_smem, ml_smem,
            setup_bar, loaded, consumed, *, plan: _Plan):
    """One (b, k, split) program.

    q_ref [B, K, parts, 64, D] (mma dtype, zero padded rows), idx_ref [B, K, S * chunk] int32
    (-1 padded), k_ref/v_ref [B, K, C, D]; o_ref [B, K, S, g_out, D] f32 unnormalised,
    ml_ref [B, K, S, 2, 64] f32 (running max, softmax sum).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bk_index = lax.axis_index("bk")
    b = bk_index // plan.kv_heads
    head = lax.rem(bk_index, plan.kv_heads)
    split = lax.axis_index("split")
    wg = lax.axis_index("wg")
    bk, stages = plan.block_k, plan.stages

    @pl.when(wg == 1)
    def _producer():
        plgpu.copy_gmem_to_smem(idx_ref.at[b, head, pl.ds(split * plan.chunk, plan.chunk)],
                                idx_smem, setup_bar)
        for part in range(plan.parts):
            plgpu.copy_gmem_to_smem(q_ref.at[b, head, part], q_smem.at[part], setup_bar)
        plgpu.barrier_wait(setup_bar)

        def fetch(block, slot):
            def row(t, carry):
                token = idx_smem[block * bk + t]
                token = jnp.where((token >= 0) & (token < plan.capacity), token, 0)
                plgpu.copy_gmem_to_smem(k_ref.at[b, head, pl.ds(token, 1)],
                                        k_stage.at[slot, pl.ds(t, 1)], loaded.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[b, head, pl.ds(token, 1)],
                                        v_stage.at[slot, pl.ds(t, 1)], loaded.at[slot])
                return carry

            lax.fori_loop(0, bk, row, None)

        for block in range(stages):
            fetch(block, block)

        @pl.loop(stages, plan.blocks)
        def _refill(block):
            slot = lax.rem(block, stages)
            plgpu.barrier_wait(consumed.at[slot])
            fetch(block, slot)

    @pl.when(wg == 0)
    def _consumer():
        plgpu.barrier_wait(setup_bar)
        col = plgpu.Layout.WGMMA.reduce(0)

        def step(block, carry):
            acc, m_prev, l_prev = carry
            slot = lax.rem(block, stages)
            plgpu.barrier_wait(loaded.at[slot])
            slots = plgpu.load(idx_smem.at[pl.ds(block * bk, bk)], layout=col)  # [bk]
            keys = plgpu.load(k_stage.at[slot], layout=plgpu.Layout.WGMMA)  # [bk, D]
            values = plgpu.load(v_stage.at[slot], layout=plgpu.Layout.WGMMA)
            if plan.parts == 1:
                k_tile[0] = keys
                v_tile[0] = values
            else:
                k_tile[0], k_tile[1] = _split_bf16(keys.astype(jnp.float32))
                v_tile[0], v_tile[1] = _split_bf16(values.astype(jnp.float32))
            # The fence orders this warpgroup's SMEM accesses before the async proxy's: the
            # tiles for wgmma, and the staged rows' reads before the TMA refills the slot.
            plgpu.commit_smem()

            @pl.when(block + stages < plan.blocks)  # the producer refills this slot
            def _free():
                plgpu.barrier_arrive(consumed.at[slot])

            def qk(acc_ref):  # [64, bk] = q [64, D] @ keys^T
                for qp, kp in _products(plan.parts):
                    plgpu.wgmma(acc_ref, q_smem.at[qp], k_tile.at[kp].T)
                return acc_ref[...]

            logits = pl.run_scoped(qk, plgpu.ACC((_ROWS, bk), jnp.float32)) * plan.sm_scale
            ok = (slots >= 0) & (slots < plan.capacity)
            logits = jnp.where(lax.broadcast_in_dim(ok, logits.shape, [1]), logits, -jnp.inf)
            m_next = jnp.maximum(m_prev, logits.max(axis=1))  # [64]
            correction = jnp.exp(m_prev - m_next)
            p = jnp.exp(logits - lax.broadcast_in_dim(m_next, logits.shape, [0]))
            l_next = correction * l_prev + p.sum(axis=1)
            if plan.parts == 1:
                p_tile[0] = p.astype(plan.mma_dtype)
            else:
                p_tile[0], p_tile[1] = _split_bf16(p)
            plgpu.commit_smem()

            def pv(acc_ref):  # [64, D] = p [64, bk] @ values [bk, D]
                for pp, vp in _products(plan.parts):
                    plgpu.wgmma(acc_ref, p_tile.at[pp], v_tile.at[vp])
                return acc_ref[...]

            update = pl.run_scoped(pv, plgpu.ACC((_ROWS, plan.head_dim), jnp.float32))
            acc = lax.broadcast_in_dim(correction, acc.shape, [0]) * acc + update
            return acc, m_next, l_next

        wgmma = plgpu.Layout.WGMMA
        init = (
            plgpu.layout_cast(jnp.zeros((_ROWS, plan.head_dim), jnp.float32), wgmma),
            plgpu.layout_cast(jnp.full((_ROWS,), _M_INIT, jnp.float32), wgmma.reduce(1)),
            plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), wgmma.reduce(1)),
        )
        acc, row_max, denom = lax.fori_loop(0, plan.blocks, step, init)
        o_smem[...] = acc
        ml_smem[0] = row_max
        ml_smem[1] = denom
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, plan.g_out)], o_ref.at[b, head, split])
        plgpu.copy_smem_to_gmem(ml_smem, ml_ref.at[b, head, split])
        plgpu.wait_smem_to_gmem(0)


def _products(parts: int) -> tuple[tuple[int, int], ...]:
    """(lhs part, rhs part) pairs of one product: a*b, or hi*hi + hi*lo + lo*hi."""
    return ((0, 0),) if parts == 1 else ((0, 0), (0, 1), (1, 0))


def _call(q_parts, indices_pad, k, v, *, plan: _Plan, interpret):
    """The Mosaic GPU kernel on padded operands -> (o [B, K, S, g_out, D], ml [B, K, S, 2,
    64]) f32 partials."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    d, bk, mma = plan.head_dim, plan.block_k, plan.mma_dtype
    out_type = (
        jax.ShapeDtypeStruct((plan.batch, plan.kv_heads, plan.splits, plan.g_out, d),
                             jnp.float32),
        jax.ShapeDtypeStruct((plan.batch, plan.kv_heads, plan.splits, 2, _ROWS), jnp.float32),
    )
    scratch = (
        plgpu.SMEM((plan.parts, _ROWS, d), mma, transforms=_tiled(mma, d)),  # q
        plgpu.SMEM((plan.chunk,), jnp.int32),  # this split's slots
        plgpu.SMEM((plan.stages, bk, d), plan.kv_dtype),  # staged K rows
        plgpu.SMEM((plan.stages, bk, d), plan.kv_dtype),  # staged V rows
        plgpu.SMEM((plan.parts, bk, d), mma, transforms=_tiled(mma, d)),  # K tile
        # wgmma wants one swizzle for both operands: V's is P's (from block_k)
        plgpu.SMEM((plan.parts, bk, d), mma, transforms=_tiled(mma, bk)),  # V tile
        plgpu.SMEM((plan.parts, _ROWS, bk), mma, transforms=_tiled(mma, bk)),  # P tile
        plgpu.SMEM((_ROWS, d), jnp.float32),  # o
        plgpu.SMEM((2, _ROWS), jnp.float32),  # running max, sum
        plgpu.Barrier(num_arrivals=1 + plan.parts),  # q and slots arrived
        plgpu.Barrier(num_arrivals=2 * bk, num_barriers=plan.stages),  # rows arrived
        plgpu.Barrier(num_arrivals=1, num_barriers=plan.stages),  # slot free again
    )
    kernel = plgpu.kernel(
        functools.partial(_kernel, plan=plan),
        out_type=out_type,
        scratch_types=scratch,
        grid=(plan.batch * plan.kv_heads, plan.splits),
        grid_names=("bk", "split"),
        num_threads=2,
        thread_name="wg",
        interpret=backend_lib.mosaic_interpret_params(interpret),
        kernel_name="rocketkv_sparse_decode_attention",
    )
    return kernel(q_parts, indices_pad, k, v)


def make_plan(q, k, indices, *, sm_scale, block_k, num_splits, num_stages) -> _Plan:
    """The static launch plan; raises ValueError for shapes the kernel cannot take.
    num_stages None: the most SMEM slots (up to 3) that fit an H100 block."""
    b, kv, g, d = q.shape
    compute = jnp.promote_types(q.dtype, k.dtype)
    if compute not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"sparse_decode_attention_mosaic: unsupported dtypes {q.dtype}, "
                         f"{k.dtype} (bf16, f16 or f32)")
    if g > _ROWS:
        raise ValueError(f"sparse_decode_attention_mosaic: G = {g} query heads per KV head; "
                         f"at most {_ROWS} fit one wgmma tile")
    if d % 64:
        raise ValueError(f"sparse_decode_attention_mosaic: head dim {d} must be a multiple of "
                         "64 (one 128-byte swizzled row tile)")
    if block_k < 64 or block_k % 64:
        raise ValueError(f"block_k must be a multiple of 64 (wgmma's rows), got {block_k}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    parts = 1 if compute != jnp.float32 else 2
    blocks_total = max(1, pl.cdiv(indices.shape[-1], block_k))
    per_split = pl.cdiv(blocks_total, min(num_splits, blocks_total))
    plan = _Plan(
        batch=b, kv_heads=kv, g_out=-(-g // 8) * 8, head_dim=d, capacity=k.shape[2],
        block_k=block_k, splits=pl.cdiv(blocks_total, per_split), blocks=per_split,
        stages=min(num_stages or 3, per_split), parts=parts, kv_dtype=jnp.dtype(k.dtype),
        mma_dtype=jnp.dtype(jnp.bfloat16 if parts == 2 else compute),
        sm_scale=1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale),
    )
    while num_stages is None and plan.stages > 1 and plan.smem_bytes() > _SMEM_LIMIT:
        plan = dataclasses.replace(plan, stages=plan.stages - 1)
    if plan.smem_bytes() > _SMEM_LIMIT:
        raise ValueError(
            f"sparse_decode_attention_mosaic: block_k={block_k}, {plan.stages} stages and "
            f"head dim {d} ({jnp.dtype(k.dtype).name}) need {plan.smem_bytes()} bytes of "
            f"shared memory, over the {_SMEM_LIMIT} of an H100 block; use a smaller block_k "
            "or num_stages")
    return plan


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "block_k", "num_splits", "num_stages", "interpret"))
def sparse_decode_attention_mosaic(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    *,
    sm_scale: float | None = None,
    block_k: int = 64,
    num_splits: int = 16,
    num_stages: int | None = None,
    interpret=False,
) -> jax.Array:
    """Exact softmax attention of each KV head's G query heads over its selected tokens
    (Mosaic GPU, Hopper). Same arguments and result as `sparse_decode_attention_pallas`.

    Args:
      q: [B, K, G, D] decode queries; k, v: [B, K, C, D] cache; G <= 64, D a multiple of 64;
        bf16/f16 (tensor cores as they are) or f32 (bf16x3, see the module docstring).
      indices: [B, K, M] int32 slots; entries < 0 or >= C mean "no token"; valid entries
        must be distinct.
      sm_scale: logit scale (static), default 1/sqrt(D).
      block_k: selected tokens per pipeline step, a multiple of 64 (wgmma's rows).
      num_splits: flash-decoding splits of the M tokens per KV head (grid B*K x splits).
      num_stages: SMEM slots between the row-fetching and the computing warpgroup; None:
        the most (up to 3) that fit an H100 block (f32 rows at D = 128 leave room for 1).
      interpret: False compiles for the GPU; True (or a
        `plgpu.InterpretGPUParams`) runs the Mosaic GPU interpreter on any device, with
        race detection when True.

    Returns:
      [B, K, G, D] in q's dtype; rows with no valid index are 0.
    """
    check_attention_args(q, k, v, indices)
    if k.dtype != v.dtype:
        raise ValueError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
    plan = make_plan(q, k, indices, sm_scale=sm_scale, block_k=block_k,
                     num_splits=num_splits, num_stages=num_stages)
    _, _, g, d = q.shape
    q_rows = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, _ROWS - g), (0, 0)))
    if plan.parts == 1:
        q_parts = q_rows.astype(plan.mma_dtype)[:, :, None]  # [B, K, 1, 64, D]
    else:
        q_parts = jnp.stack(_split_bf16(q_rows), axis=2)  # [B, K, 2, 64, D]
    m = indices.shape[-1]
    indices_pad = jnp.pad(indices.astype(jnp.int32),
                          ((0, 0), (0, 0), (0, plan.splits * plan.chunk - m)),
                          constant_values=-1)  # [B, K, S * chunk]
    o, ml = _call(q_parts, indices_pad, k, v, plan=plan, interpret=interpret)
    rows = ml[..., : plan.g_out]  # [B, K, S, 2, g_out]
    out = combine_splits(o, rows[:, :, :, 0], rows[:, :, :, 1])  # [B, K, g_out, D]
    return out[:, :, :g, :d].astype(q.dtype)

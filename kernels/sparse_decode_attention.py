"""Exact decode attention over a selected subset of cached tokens (stage 2 of RocketKV).

    out[b, k, g] = softmax(q[b, k, g] @ k[b, k, idx]^T * sm_scale) @ v[b, k, idx]

with idx = indices[b, k] (M token slots shared by the G query heads of KV head k; -1 = none).

Design:
  - Gather: Pallas-Triton has no gather primitive, but indexing a ref with integer arrays,
    `k_ref[rows[:, None], cols[None, :]]`, lowers to pointer arithmetic and one masked
    `tt.load` of a [block_k, D] pointer tensor (JAX's own `ops/gpu/paged_attention.py`
    gathers pages the same way, `k_pages_ref[block_tables]`). Each selected token's D-wide
    row is one contiguous (coalesced) read, invalid slots are masked so they issue no memory
    traffic, and all block_k rows are in flight together. A per-row loop of dynamic `pl.ds`
    loads would serialize block_k small loads and build the tile row by row before `tl.dot`;
    a page-granular variant would read whole pages for one selected token, which
    token-level top-k does not need.
  - Top-k runs in XLA between `approx_scores` and this kernel because Pallas-Triton has no
    sort / top_k primitive (and a block-local top-k would not be the global one).
  - Flash-decoding: the M selected tokens are split over `num_splits` programs per KV head,
    each running an online softmax over blocks of `block_k` tokens; the partial (o, max,
    sum) are combined with a log-sum-exp in XLA, so long budgets still fill the GPU at batch 1.
  - GQA: the G query heads of a KV head are the rows of one [Gp, D] tile, Gp = G padded to a
    power of 2 >= 16 (tl.dot's minimum), so each selected K/V row is read once per group.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backend as backend_lib
from .backend import pallas_triton as plgpu  # None where this JAX has no Pallas Triton
from .decode_shared import check_attention_args, combine_splits
from .sparse_decode_attention_mgpu import sparse_decode_attention_mosaic

_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16.
# Running-max start value: finite so that a block with only masked (-inf) logits gives
# exp(-inf - m) = 0 and a correction of exp(0) = 1, never exp(-inf + inf) = NaN.
_M_INIT = float(jnp.finfo(jnp.float32).min)


def sparse_decode_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    *,
    sm_scale: float | None = None,
) -> jax.Array:
    """Pure-jnp sparse decode attention, the contract `sparse_decode_attention_pallas` is
    pinned to.

    Args:
      q: [B, K, G, D] decode queries; k, v: [B, K, C, D] cache (any float dtype).
      indices: [B, K, M] int32 token slots; entries outside [0, C) mean "no token".
      sm_scale: logit scale, default 1/sqrt(D).

    Returns:
      [B, K, G, D] in q's dtype; rows with no valid index are 0.
    """
    check_attention_args(q, k, v, indices)
    capacity, head_dim = k.shape[2], k.shape[3]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    ok = (indices >= 0) & (indices < capacity)  # [B, K, M]
    rows = jnp.where(ok, indices, 0)[..., None]  # [B, K, M, 1]
    k_sel = jnp.take_along_axis(k, rows, axis=2).astype(jnp.float32)  # [B, K, M, D]
    v_sel = jnp.take_along_axis(v, rows, axis=2).astype(jnp.float32)  # [B, K, M, D]
    logits = jnp.einsum(
        "bkgd,bkmd->bkgm", q.astype(jnp.float32), k_sel, precision=lax.Precision.HIGHEST
    ) * sm_scale  # [B, K, G, M]
    logits = jnp.where(ok[:, :, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)  # [B, K, G, 1]
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))  # [B, K, G, M], 0 where masked
    denom = p.sum(axis=-1, keepdims=True)  # [B, K, G, 1]
    out = jnp.einsum("bkgm,bkmd->bkgd", p, v_sel, precision=lax.Precision.HIGHEST)
    out = out / jnp.where(denom > 0, denom, 1.0)  # [B, K, G, D], 0 for empty rows
    return out.astype(q.dtype)


def _sparse_attention_kernel(
    q_ref,  # [Gp, Dp] queries of one KV head's group (zero padded)
    indices_ref,  # [chunk] this split's token slots, -1 = none
    k_ref,  # [C, D] this KV head's keys (gathered inside)
    v_ref,  # [C, D] this KV head's values
    *rest,  # (optional aliased output inits,) o [Gp, Dp], m [Gp], l [Gp]
    sm_scale: float,
    block_k: int,
    num_blocks: int,
    capacity: int,
    head_dim: int,
    precision,
):
    o_ref, m_ref, l_ref = rest[-3:]
    q = q_ref[...]  # [Gp, Dp]
    g_pad, d_pad = q.shape
    dims = jnp.arange(d_pad)  # [Dp]
    dim_ok = dims < head_dim  # [Dp], all true unless D is not a power of 2
    cols = jnp.minimum(dims, head_dim - 1)[None, :]  # [1, Dp]

    def body(j, carry):
        o_prev, m_prev, l_prev = carry
        slots = indices_ref[pl.ds(j * block_k, block_k)]  # [bk]
        ok = (slots >= 0) & (slots < capacity)  # [bk]
        rows = jnp.where(ok, slots, 0)[:, None]  # [bk, 1]
        mask = ok[:, None] & dim_ok[None, :]  # [bk, Dp]
        keys = plgpu.load(k_ref.at[rows, cols], mask=mask, other=0).astype(q.dtype)  # [bk, Dp]
        logits = plgpu.dot(q, keys, trans_b=True, precision=precision) * sm_scale  # [Gp, bk]
        logits = jnp.where(ok[None, :], logits, -jnp.inf)
        m_next = jnp.maximum(m_prev, logits.max(axis=-1))  # [Gp]
        correction = jnp.exp(m_prev - m_next)  # [Gp]
        p = jnp.exp(logits - m_next[:, None])  # [Gp, bk]
        l_next = correction * l_prev + p.sum(axis=-1)  # [Gp]
        values = plgpu.load(v_ref.at[rows, cols], mask=mask, other=0).astype(q.dtype)
        o_next = correction[:, None] * o_prev + plgpu.dot(
            p.astype(values.dtype), values, precision=precision
        )  # [Gp, Dp]
        return o_next, m_next, l_next

    init = (
        jnp.zeros((g_pad, d_pad), jnp.float32),
        jnp.full((g_pad,), _M_INIT, jnp.float32),
        jnp.zeros((g_pad,), jnp.float32),
    )
    acc, row_max, denom = lax.fori_loop(0, num_blocks, body, init)
    o_ref[...] = acc
    m_ref[...] = row_max
    l_ref[...] = denom


def _sparse_attention_call(
    q_pad: jax.Array,
    indices_pad: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sm_scale: float,
    block_k: int,
    num_splits: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    out_init: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs the Pallas kernel on padded operands (grid and BlockSpecs) and returns the
    per-split partials.

    Args:
      q_pad: [B, K, Gp, Dp] queries in the compute dtype, zero padded.
      indices_pad: [B, K, S * chunk] int32, -1 padded, chunk a multiple of block_k.
      k, v: [B, K, C, D].
      out_init: optional (o [B, K, S, Gp, Dp], m [B, K, S, Gp], l [B, K, S, Gp]) f32 buffers
        aliased to the outputs (tests poison them with NaN to prove every element is written).

    Returns:
      o: [B, K, S, Gp, Dp] f32 unnormalized partial outputs, m: [B, K, S, Gp] f32 running
      max, l: [B, K, S, Gp] f32 softmax denominators, per split S.
    """
    b, kv, g_pad, d_pad = q_pad.shape
    capacity, head_dim = k.shape[2], k.shape[3]
    chunk = indices_pad.shape[-1] // num_splits
    out_shape = (
        jax.ShapeDtypeStruct((b, kv, num_splits, g_pad, d_pad), jnp.float32),
        jax.ShapeDtypeStruct((b, kv, num_splits, g_pad), jnp.float32),
        jax.ShapeDtypeStruct((b, kv, num_splits, g_pad), jnp.float32),
    )

    # Grid (B * K, splits): 2-D so a vmap can still add a third Triton grid axis.
    def bk(i):
        return i // kv, i % kv

    in_specs = [
        pl.BlockSpec((None, None, g_pad, d_pad), lambda i, s: (*bk(i), 0, 0)),
        pl.BlockSpec((None, None, chunk), lambda i, s: (*bk(i), s)),
        pl.BlockSpec((None, None, capacity, head_dim), lambda i, s: (*bk(i), 0, 0)),
        pl.BlockSpec((None, None, capacity, head_dim), lambda i, s: (*bk(i), 0, 0)),
    ]
    out_specs = (
        pl.BlockSpec((None, None, None, g_pad, d_pad), lambda i, s: (*bk(i), s, 0, 0)),
        pl.BlockSpec((None, None, None, g_pad), lambda i, s: (*bk(i), s, 0)),
        pl.BlockSpec((None, None, None, g_pad), lambda i, s: (*bk(i), s, 0)),
    )
    args = [q_pad, indices_pad, k, v]
    aliases = None
    if out_init is not None:
        for init, shape in zip(out_init, out_shape, strict=True):
            if init.shape != shape.shape or init.dtype != shape.dtype:
                raise ValueError(f"out_init must match {out_shape}, got {init.shape}")
        in_specs.extend(out_specs)
        aliases = {len(args) + i: i for i in range(3)}
        args.extend(out_init)
    precision = lax.Precision.HIGHEST if q_pad.dtype == jnp.float32 else None
    kernel = functools.partial(
        _sparse_attention_kernel,
        sm_scale=sm_scale,
        block_k=block_k,
        num_blocks=chunk // block_k,
        capacity=capacity,
        head_dim=head_dim,
        precision=precision,
    )
    return backend_lib.pallas_call(
        kernel,
        interpret=interpret,
        out_shape=out_shape,
        grid=(b * kv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        num_warps=num_warps,
        num_stages=num_stages,
        name="rocketkv_sparse_decode_attention",
        input_output_aliases=aliases,
    )(*args)


def split_plan(num_selected: int, block_k: int, num_splits: int) -> tuple[int, int, int]:
    """How the M selected tokens are tiled: returns (block_k, splits, blocks per split).

    block_k shrinks (not below 16) for tiny budgets; splits never exceed the number of blocks,
    and the last split is never empty.
    """
    block_k = min(block_k, max(_MIN_DOT, backend_lib.next_power_of_2(num_selected)))
    num_blocks = max(1, pl.cdiv(num_selected, block_k))
    blocks_per_split = pl.cdiv(num_blocks, max(1, min(num_splits, num_blocks)))
    return block_k, pl.cdiv(num_blocks, blocks_per_split), blocks_per_split


def prepare_attention_operands(
    q: jax.Array, k: jax.Array, indices: jax.Array, *, block_k: int, num_splits: int
) -> tuple[jax.Array, jax.Array, int, int]:
    """Pads q to [B, K, Gp, Dp] (compute dtype) and indices to [B, K, S * chunk] with -1.

    Returns (q_pad, indices_pad, block_k, splits) with the effective block_k and splits.
    """
    _, _, g, d = q.shape
    m = indices.shape[-1]
    block_k, splits, blocks_per_split = split_plan(m, block_k, num_splits)
    g_pad = max(_MIN_DOT, backend_lib.next_power_of_2(g))
    d_pad = max(_MIN_DOT, backend_lib.next_power_of_2(d))
    compute_dtype = jnp.promote_types(q.dtype, k.dtype)
    q_pad = jnp.pad(q.astype(compute_dtype), ((0, 0), (0, 0), (0, g_pad - g), (0, d_pad - d)))
    m_pad = splits * blocks_per_split * block_k
    indices_pad = jnp.pad(
        indices.astype(jnp.int32), ((0, 0), (0, 0), (0, m_pad - m)), constant_values=-1
    )  # [B, K, S * chunk]
    return q_pad, indices_pad, block_k, splits


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_k", "num_splits", "num_warps", "num_stages", "interpret"),
)
def sparse_decode_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    *,
    sm_scale: float | None = None,
    block_k: int = 64,
    num_splits: int = 16,
    num_warps: int = 8,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Exact softmax attention of each KV head's G query heads over its selected tokens.

    Args:
      q: [B, K, G, D] decode queries (RoPE applied), any float dtype.
      k, v: [B, K, C, D] cache (keys RoPE'd).
      indices: [B, K, M] int32 token slots per KV head, shared by its G query heads; entries
        < 0 (or >= C) mean "no token". Valid entries must be distinct. M is arbitrary.
      sm_scale: logit scale (static), default 1/sqrt(D).
      block_k: selected tokens per inner step (power of 2 >= 16; shrunk for tiny M).
      num_splits: flash-decoding splits of the M tokens per KV head. The H100 defaults
        (64 x 16) give B * K * 16 programs, 128 for Llama-3.1-8B at batch 1.
      num_warps, num_stages: Triton launch parameters. 8 warps: the [block_k, D] pointer
        tensors of the gathers cost registers; with 4 warps Triton 3.9 for sm_90 needs 216
        registers per thread (bf16) and spills (f32), with 8 warps 138 / 122 and no spills.
      interpret: run in the Pallas interpreter (any device) instead of lowering to Triton.

    Returns:
      [B, K, G, D] in q's dtype (softmax and accumulation in f32); rows with no valid index
      are 0.
    """
    check_attention_args(q, k, v, indices)
    if block_k < _MIN_DOT or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of 2 >= {_MIN_DOT}, got {block_k}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    _, _, g, d = q.shape
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    q_pad, indices_pad, block_k, splits = prepare_attention_operands(
        q, k, indices, block_k=block_k, num_splits=num_splits
    )
    partials = _sparse_attention_call(
        q_pad, indices_pad, k, v, sm_scale=sm_scale, block_k=block_k, num_splits=splits,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret,
    )  # acc [B, K, S, Gp, Dp], row_max [B, K, S, Gp], denom [B, K, S, Gp]
    return combine_splits(*partials)[:, :, :g, :d].astype(q.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_k", "num_splits", "num_warps", "num_stages", "kernels"),
)
def sparse_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    indices: jax.Array,
    *,
    sm_scale: float | None = None,
    block_k: int = 64,
    num_splits: int = 16,
    num_warps: int = 8,
    num_stages: int = 2,
    kernels: str = "auto",
) -> jax.Array:
    """`sparse_decode_attention_pallas`, `sparse_decode_attention_mosaic` or
    `sparse_decode_attention_reference`, whichever `kernels` names (`backend.choose`); the
    tiling and launch parameters go to the Triton kernel only (num_splits to both)."""
    kernel = functools.partial(
        sparse_decode_attention_pallas, block_k=block_k, num_splits=num_splits,
        num_warps=num_warps, num_stages=num_stages,
    )
    mosaic = functools.partial(sparse_decode_attention_mosaic, num_splits=num_splits)
    run = backend_lib.choose(kernels, pallas=kernel, reference=sparse_decode_attention_reference,
                             mosaic=mosaic)
    return run(q, k, v, indices, sm_scale=sm_scale)

"""Stage-2 approximate page scores of RocketKV as a Mosaic GPU kernel for Hopper.

Same contract as `approx_scores.py` (the Pallas-Triton kernel), pinned to the same reference,
`approx_scores_reference`:

    approx[b, k, g, p] = sum_r Qh[g, r] * Kh[p, r]     (f32; pages with no valid token -inf)

with Qh the group's queries on the R selected channels, sign-flipped by sign(sum_g q), and
Kh the page max (sign > 0) or -min (otherwise) on those channels.

Design (docs/kernels.md, "Mosaic GPU kernels"):
  - Grid (B * K, page blocks of `block_p`), one warpgroup.
  - Sign folding in XLA: Qe[g, r] = Qh[g, r] * (+1 if max else -1), so the kernel sums
    Qe[g, r] * bound[r, p] with bound the page max or min row as stored, never negating K.
  - Channel-major metadata [B, K, D, P] (the plans' layout for pages > 1): each selected
    channel's bound is a contiguous run of pages, fetched with one TMA copy per channel
    from whichever of page_max / page_min the sign picks, R copies per block on one
    barrier: the bytes read are the bytes used. The copies address a flat view of the
    metadata (`[B*K*D*P]`), so P needs no TMA stride alignment; pages past P in a block
    read the next channel's (or zeros at the end) and are masked.
  - Row-major metadata [B, K, P, D] (page size 1 scores the keys themselves): a page's R
    channels are 2-byte elements scattered over its row, below TMA's 16-byte granule, so
    whole [block_p, D] tiles of max and min are fetched and the unselected channels get a
    zero query weight. This reads 2 * D elements per page instead of R (DRAM moves
    32-byte sectors anyway, so scattered channels cost most of the row regardless).
  - The math is plain vector math in f32 on the CUDA cores: G * R multiply-adds per page
    against R bound elements read, G/2 FMA per byte at bf16 (G <= 8), well under what the
    SM can do per byte of HBM; wgmma would need G padded to 64 rows for no gain.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backend as backend_lib
from .decode_shared import channel_signs, check_scores_args

# Channels padded to a multiple of this, so the small per-head operands are whole
# 128-byte TMA transfers (int32 / f32).
_CHANNEL_MULTIPLE = 32


def _page_mask(p0, block_p: int, page_size: int, num_pages: int, length, layout):
    """[block_p] bool: pages p0.. hold at least one valid token."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    pages = p0 + plgpu.broadcasted_iota(jnp.int32, (block_p,), 0, layout=layout)
    return (pages < num_pages) & (pages * page_size < length)


def _channel_major_kernel(lengths_ref, q_ref, chan_ref, use_max_ref, max_ref, min_ref, o_ref,
                          q_smem, chan_smem, use_max_smem, rows, o_smem, setup_bar, rows_bar, *,
                          kv_heads, head_dim, num_pages, num_channels, page_size, block_p):
    """lengths_ref [B]; q_ref [B, K, G, Rp] f32 sign-folded weights; chan_ref, use_max_ref
    [B, K, Rp] int32; max_ref, min_ref flat [B * K * D * P]; o_ref [B, K, G, P_pad] f32."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bk_index = lax.axis_index("bk")
    b = bk_index // kv_heads
    head = lax.rem(bk_index, kv_heads)
    p0 = lax.axis_index("pages") * block_p
    plgpu.copy_gmem_to_smem(q_ref.at[b, head], q_smem, setup_bar)
    plgpu.copy_gmem_to_smem(chan_ref.at[b, head], chan_smem, setup_bar)
    plgpu.copy_gmem_to_smem(use_max_ref.at[b, head], use_max_smem, setup_bar)
    plgpu.barrier_wait(setup_bar)
    head_start = bk_index * head_dim  # row of channel 0 of this (b, k) in [B * K * D, P]

    def fetch(r, carry):
        start = (head_start + chan_smem[r]) * num_pages + p0

        @pl.when(use_max_smem[r] != 0)
        def _():
            plgpu.copy_gmem_to_smem(max_ref.at[pl.ds(start, block_p)], rows.at[r], rows_bar)

        @pl.when(use_max_smem[r] == 0)
        def _():
            plgpu.copy_gmem_to_smem(min_ref.at[pl.ds(start, block_p)], rows.at[r], rows_bar)

        return carry

    lax.fori_loop(0, num_channels, fetch, None)
    plgpu.barrier_wait(rows_bar)
    strided = plgpu.Layout.WG_STRIDED((block_p,), 1)
    groups = q_smem.shape[0]

    def accumulate(r, acc):
        row = plgpu.load(rows.at[r], layout=strided).astype(jnp.float32)  # [block_p]
        return tuple(a + q_smem[g, r] * row for g, a in enumerate(acc))

    zeros = plgpu.layout_cast(jnp.zeros((block_p,), jnp.float32), strided)
    acc = lax.fori_loop(0, num_channels, accumulate, (zeros,) * groups)
    ok = _page_mask(p0, block_p, page_size, num_pages, lengths_ref[b], strided)
    for g in range(groups):
        # Masked, not multiplied through: empty pages' +-inf never reach the output.
        o_smem[g] = jnp.where(ok, acc[g], -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, head, :, pl.ds(p0, block_p)])
    plgpu.wait_smem_to_gmem(0)


def _row_major_kernel(lengths_ref, q_ref, use_max_ref, max_ref, min_ref, o_ref,
                      q_smem, use_max_smem, max_tile, min_tile, o_smem, bar, *,
                      kv_heads, num_pages, page_size, block_p):
    """lengths_ref [B]; q_ref [B, K, G, D] f32 weights (0 off the selected channels);
    use_max_ref [B, K, D] int32; max_ref, min_ref [B, K, P, D]; o_ref [B, K, G, P_pad]."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bk_index = lax.axis_index("bk")
    b = bk_index // kv_heads
    head = lax.rem(bk_index, kv_heads)
    p0 = lax.axis_index("pages") * block_p
    plgpu.copy_gmem_to_smem(q_ref.at[b, head], q_smem, bar)
    plgpu.copy_gmem_to_smem(use_max_ref.at[b, head], use_max_smem, bar)
    plgpu.copy_gmem_to_smem(max_ref.at[b, head, pl.ds(p0, block_p)], max_tile, bar)
    plgpu.copy_gmem_to_smem(min_ref.at[b, head, pl.ds(p0, block_p)], min_tile, bar)
    plgpu.barrier_wait(bar)
    wgmma = plgpu.Layout.WGMMA
    use_max = plgpu.load(use_max_smem, layout=wgmma.reduce(0)) != 0  # [D]
    bound = jnp.where(lax.broadcast_in_dim(use_max, max_tile.shape, [1]),
                      plgpu.load(max_tile, layout=wgmma).astype(jnp.float32),
                      plgpu.load(min_tile, layout=wgmma).astype(jnp.float32))  # [bp, D]
    ok = _page_mask(p0, block_p, page_size, num_pages, lengths_ref[b], wgmma.reduce(1))
    for g in range(q_smem.shape[0]):
        weight = plgpu.load(q_smem.at[g], layout=wgmma.reduce(0))  # [D]
        score = (bound * lax.broadcast_in_dim(weight, bound.shape, [1])).sum(axis=1)
        o_smem[g] = jnp.where(ok, score, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, head, :, pl.ds(p0, block_p)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(
    jax.jit, static_argnames=("page_size", "block_p", "interpret", "channel_major"))
def approx_scores_mosaic(
    q: jax.Array,
    page_max: jax.Array,
    page_min: jax.Array,
    channels: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    block_p: int | None = None,
    interpret=False,
    channel_major: bool = False,
) -> jax.Array:
    """Approximate (upper-bound) page scores of stage 2 (Mosaic GPU, Hopper). Same arguments
    and result as `approx_scores_pallas`.

    Args:
      q: [B, K, G, D] decode queries grouped by KV head (bf16, f16 or f32).
      page_max, page_min: [B, K, P, D] page key max/min ([B, K, D, P] if `channel_major`),
        in one dtype; D a multiple of 8.
      channels: [B, K, R] int32 selected channels (in [0, D)).
      lengths: [B] int32 valid tokens per row.
      page_size: tokens per page (static).
      block_p: pages per program: 128 (channel-major, a multiple of 128 up to 256) or 64
        (row-major, a multiple of 64) by default.
      interpret: False compiles for the GPU; True (or a `plgpu.InterpretGPUParams`) runs the
        Mosaic GPU interpreter, with race detection when True.
      channel_major: metadata is stored [B, K, D, P].

    Returns:
      [B, K, G, P] float32; pages with no valid token are exactly -inf.
    """
    check_scores_args(q, page_max, page_min, channels, lengths, page_size, channel_major)
    if page_max.dtype != page_min.dtype:
        raise ValueError(f"page_max and page_min must share a dtype, got {page_max.dtype} "
                         f"and {page_min.dtype}")
    b, kv, g, d = q.shape
    num_pages = page_max.shape[3] if channel_major else page_max.shape[2]
    if block_p is None:
        block_p = 128 if channel_major else 64
    if channel_major and (block_p % 128 or not 128 <= block_p <= 256):
        raise ValueError(f"block_p must be 128 or 256 for channel-major metadata (one TMA "
                         f"box of at most 256 pages, 128 lanes), got {block_p}")
    if not channel_major and (block_p % 64 or block_p < 64):
        raise ValueError(f"block_p must be a multiple of 64 for row-major metadata (wgmma "
                         f"layout rows), got {block_p}")
    if d % 32:
        raise ValueError(f"approx_scores_mosaic: head dim {d} must be a multiple of 32 (whole "
                         "128-byte copies of a head's per-channel int32/f32 rows)")
    if channel_major and page_max.size >= 2**31:
        raise ValueError(f"approx_scores_mosaic: {page_max.size} metadata elements; the "
                         "kernel addresses them with int32 offsets (< 2**31)")
    channels = channels.astype(jnp.int32)
    q_hat, use_max = channel_signs(q, channels)  # [B, K, G, R] f32, [B, K, R] bool
    lengths = lengths.astype(jnp.int32)
    num_blocks = pl.cdiv(num_pages, block_p)
    out_type = jax.ShapeDtypeStruct((b, kv, g, num_blocks * block_p), jnp.float32)
    grid = dict(grid=(b * kv, num_blocks), grid_names=("bk", "pages"),
                interpret=backend_lib.mosaic_interpret_params(interpret))
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if channel_major:
        r = channels.shape[-1]
        r_pad = -(-r // _CHANNEL_MULTIPLE) * _CHANNEL_MULTIPLE
        pad = ((0, 0), (0, 0), (0, r_pad - r))
        weights = jnp.where(use_max[:, :, None, :], q_hat, -q_hat)  # sign folded
        weights = jnp.pad(weights, ((0, 0), (0, 0), (0, 0), (0, r_pad - r)))
        kernel = functools.partial(
            _channel_major_kernel, kv_heads=kv, head_dim=d, num_pages=num_pages,
            num_channels=r, page_size=page_size, block_p=block_p)
        out = plgpu.kernel(
            kernel, out_type=out_type, kernel_name="rocketkv_approx_scores",
            scratch_types=(
                plgpu.SMEM((g, r_pad), jnp.float32),
                plgpu.SMEM((r_pad,), jnp.int32),
                plgpu.SMEM((r_pad,), jnp.int32),
                plgpu.SMEM((r, block_p), page_max.dtype),
                plgpu.SMEM((g, block_p), jnp.float32),
                plgpu.Barrier(num_arrivals=3),
                plgpu.Barrier(num_arrivals=r),  # one copy per selected channel
            ),
            **grid,
        )(lengths, weights, jnp.pad(channels, pad), jnp.pad(use_max.astype(jnp.int32), pad),
          page_max.reshape(-1), page_min.reshape(-1))
    else:
        # Dense weights over D: Qh on the selected channels (bound by max or min by the
        # sign), 0 elsewhere.
        rows = jnp.arange(b)[:, None, None]
        heads = jnp.arange(kv)[None, :, None]
        dense_max = jnp.zeros((b, kv, d), jnp.int32).at[rows, heads, channels].set(
            use_max.astype(jnp.int32))
        weights = jnp.zeros((b, kv, g, d), jnp.float32).at[
            rows[..., None], heads[..., None], jnp.arange(g)[None, None, :, None],
            channels[:, :, None, :]].set(jnp.where(use_max[:, :, None, :], q_hat, -q_hat))
        kernel = functools.partial(
            _row_major_kernel, kv_heads=kv, num_pages=num_pages, page_size=page_size,
            block_p=block_p)
        out = plgpu.kernel(
            kernel, out_type=out_type, kernel_name="rocketkv_approx_scores_rows",
            scratch_types=(
                plgpu.SMEM((g, d), jnp.float32),
                plgpu.SMEM((d,), jnp.int32),
                plgpu.SMEM((block_p, d), page_max.dtype),
                plgpu.SMEM((block_p, d), page_max.dtype),
                plgpu.SMEM((g, block_p), jnp.float32),
                plgpu.Barrier(num_arrivals=4),
            ),
            **grid,
        )(lengths, weights, dense_max, page_max, page_min)
    return out[..., :num_pages]

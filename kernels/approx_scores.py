"""Stage-2 approximate page scores of RocketKV (hybrid SparQ x Quest upper bound).

For each KV head the G query heads of its group score every page of the cache with an upper
bound of q.k built from the page's element-wise key max/min, using only R of the D channels:

    s      = sign(sum_g q)                                  # [B, K, D]
    Qh     = (q * s)[..., channels]                         # [B, K, G, R]
    Kh     = where(s > 0, page_max, -page_min)[..., channels]  # [B, K, P, R]
    approx = Qh @ Kh^T                                      # [B, K, G, P] f32, empty pages -inf

The kernel exists for bandwidth: per page it reads R channels and, per channel, only one of
max/min (the sign decides which one bounds q*k from above), i.e. R elements instead of 2 * D.
It loads them with a pointer gather (`ref[rows, cols]` with integer-array indices, lowered by
Pallas-Triton to a masked `tt.load` of a pointer tensor): Triton has no gather primitive, but
integer-array indexing of a ref is plain pointer arithmetic. Two masked loads (max where s > 0,
min elsewhere) make every selected element come from exactly one of the two arrays; masked
lanes issue no memory traffic.

Memory layout note: with the row-major `[B, K, P, D]` metadata a page's R selected channels are
scattered over its D-wide row, so DRAM sectors (32 B = 16 bf16 channels) are still fetched for
most of the row. `channel_major=True` takes `[B, K, D, P]` metadata instead, where each selected
channel is a contiguous run of pages and the bytes fetched equal the bytes used. See
docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import backend as backend_lib
from .approx_scores_mgpu import approx_scores_mosaic
from .backend import pallas_triton as plgpu  # None where this JAX has no Pallas Triton
from .decode_shared import channel_signs, check_scores_args

_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16.


def approx_scores_reference(
    q: jax.Array,
    page_max: jax.Array,
    page_min: jax.Array,
    channels: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    channel_major: bool = False,
) -> jax.Array:
    """Pure-jnp approximate page scores, the contract `approx_scores_pallas` is pinned to.

    Args:
      q: [B, K, G, D] decode queries of each KV head's group, any float dtype.
      page_max, page_min: [B, K, P, D] ([B, K, D, P] if `channel_major`) page key max/min.
      channels: [B, K, R] int32 selected channels (in [0, D)).
      lengths: [B] int32 valid tokens per row.
      page_size: tokens per page.
      channel_major: page_max/page_min are stored [B, K, D, P].

    Returns:
      [B, K, G, P] float32 upper-bound scores; -inf for pages with no valid token.
    """
    check_scores_args(q, page_max, page_min, channels, lengths, page_size, channel_major)
    q_hat, use_max = channel_signs(q, channels)  # [B, K, G, R], [B, K, R]
    if channel_major:  # read only the R selected rows of [D, P], then [P, R] as below
        rows = channels[:, :, :, None]  # [B, K, R, 1]
        kmax = jnp.swapaxes(jnp.take_along_axis(page_max, rows, axis=2), 2, 3)  # [B, K, P, R]
        kmin = jnp.swapaxes(jnp.take_along_axis(page_min, rows, axis=2), 2, 3)  # [B, K, P, R]
    else:
        idx = channels[:, :, None, :]  # [B, K, 1, R]
        kmax = jnp.take_along_axis(page_max, idx, axis=-1)  # [B, K, P, R]
        kmin = jnp.take_along_axis(page_min, idx, axis=-1)  # [B, K, P, R]
    kmax, kmin = kmax.astype(jnp.float32), kmin.astype(jnp.float32)
    k_hat = jnp.where(use_max[:, :, None, :], kmax, -kmin)  # [B, K, P, R]
    num_pages = k_hat.shape[2]
    valid = jnp.arange(num_pages)[None, :] * page_size < lengths[:, None]  # [B, P]
    # Empty pages hold +-inf, so mask before the product can matter: zero them, then -inf.
    k_hat = jnp.where(valid[:, None, :, None], k_hat, 0.0)
    approx = jnp.einsum("bkgr,bkpr->bkgp", q_hat, k_hat, precision=lax.Precision.HIGHEST)
    return jnp.where(valid[:, None, None, :], approx, -jnp.inf)  # [B, K, G, P]


def _approx_scores_kernel(
    lengths_ref,  # [] this row's valid tokens
    q_hat_ref,  # [Gp, Rp] sign-flipped selected query channels, 0 in padding
    channels_ref,  # [Rp] selected channels, -1 in padding
    use_max_ref,  # [Rp] 1 where sign(sum_g q) > 0 (read page_max), else 0 (read -page_min)
    page_max_ref,  # [P, D] or [D, P] if channel_major
    page_min_ref,  # same as page_max_ref
    *rest,  # (optional aliased output init,) out [Gp, block_p]
    page_size: int,
    block_p: int,
    num_pages: int,
    head_dim: int,
    channel_major: bool,
    precision,
):
    out_ref = rest[-1]
    pages = pl.program_id(1) * block_p + jnp.arange(block_p)  # [bp]
    page_ok = (pages < num_pages) & (pages * page_size < lengths_ref[()])  # [bp]
    channels = channels_ref[...]  # [Rp]
    # -1 pads R; the upper bound keeps a bad channel from becoming an out-of-bounds GPU read.
    channel_ok = (channels >= 0) & (channels < head_dim)  # [Rp]
    use_max = use_max_ref[...] != 0  # [Rp]

    rows = jnp.where(page_ok, pages, 0)[:, None]  # [bp, 1]
    cols = jnp.where(channel_ok, channels, 0)[None, :]  # [1, Rp]
    index = (cols, rows) if channel_major else (rows, cols)
    ok = page_ok[:, None] & channel_ok[None, :]  # [bp, Rp]
    # Two masked gathers: each (page, channel) element is read from exactly one array.
    kmax = plgpu.load(page_max_ref.at[index], mask=ok & use_max[None, :], other=0)  # [bp, Rp]
    kmin = plgpu.load(page_min_ref.at[index], mask=ok & ~use_max[None, :], other=0)  # [bp, Rp]
    q_hat = q_hat_ref[...]  # [Gp, Rp]
    k_hat = jnp.where(use_max[None, :], kmax, -kmin).astype(q_hat.dtype)  # [bp, Rp]
    approx = plgpu.dot(q_hat, k_hat, trans_b=True, precision=precision)  # [Gp, bp] f32
    # Masked, not multiplied through: the padded -inf/+inf of empty pages never reach the dot.
    out_ref[...] = jnp.where(page_ok[None, :], approx, -jnp.inf)


def _approx_scores_call(
    q_hat: jax.Array,
    use_max: jax.Array,
    channels: jax.Array,
    page_max: jax.Array,
    page_min: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    block_p: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    channel_major: bool,
    out_init: jax.Array | None = None,
) -> jax.Array:
    """Runs the Pallas kernel on padded operands (grid and BlockSpecs).

    Args:
      q_hat: [B, K, Gp, Rp] compute-dtype sign-flipped query channels (0 in padding).
      use_max: [B, K, Rp] int32; channels: [B, K, Rp] int32 (-1 in padding).
      page_max, page_min: [B, K, P, D] (or [B, K, D, P]); lengths: [B] int32.
      out_init: optional [B, K, Gp, P_pad] f32 buffer aliased to the output (tests poison it
        with NaN to prove every element is written).

    Returns:
      [B, K, Gp, P_pad] float32 with P_pad = P rounded up to a multiple of block_p.
    """
    b, kv, g_pad, r_pad = q_hat.shape
    num_pages = page_max.shape[3] if channel_major else page_max.shape[2]
    num_blocks = pl.cdiv(num_pages, block_p)
    out_shape = jax.ShapeDtypeStruct((b, kv, g_pad, num_blocks * block_p), jnp.float32)
    meta_block = page_max.shape[2:]  # (P, D) or (D, P): whole per-head metadata, gathered inside

    # Grid (B * K, page blocks): 2-D so a vmap can still add a third Triton grid axis.
    def bk(i):
        return i // kv, i % kv

    in_specs = [
        pl.BlockSpec((None,), lambda i, j: (i // kv,)),
        pl.BlockSpec((None, None, g_pad, r_pad), lambda i, j: (*bk(i), 0, 0)),
        pl.BlockSpec((None, None, r_pad), lambda i, j: (*bk(i), 0)),
        pl.BlockSpec((None, None, r_pad), lambda i, j: (*bk(i), 0)),
        pl.BlockSpec((None, None, *meta_block), lambda i, j: (*bk(i), 0, 0)),
        pl.BlockSpec((None, None, *meta_block), lambda i, j: (*bk(i), 0, 0)),
    ]
    out_spec = pl.BlockSpec((None, None, g_pad, block_p), lambda i, j: (*bk(i), 0, j))
    args = [lengths, q_hat, channels, use_max, page_max, page_min]
    aliases = None
    if out_init is not None:
        if out_init.shape != out_shape.shape or out_init.dtype != out_shape.dtype:
            raise ValueError(f"out_init must be {out_shape}, got {out_init.shape}")
        in_specs.append(out_spec)
        aliases = {len(args): 0}
        args.append(out_init)
    precision = lax.Precision.HIGHEST if q_hat.dtype == jnp.float32 else None
    kernel = functools.partial(
        _approx_scores_kernel,
        page_size=page_size,
        block_p=block_p,
        num_pages=num_pages,
        head_dim=page_max.shape[2] if channel_major else page_max.shape[3],
        channel_major=channel_major,
        precision=precision,
    )
    return backend_lib.pallas_call(
        kernel,
        interpret=interpret,
        out_shape=out_shape,
        grid=(b * kv, num_blocks),
        in_specs=in_specs,
        out_specs=out_spec,
        num_warps=num_warps,
        num_stages=num_stages,
        name="rocketkv_approx_scores",
        input_output_aliases=aliases,
    )(*args)


def prepare_approx_operands(
    q: jax.Array, page_max: jax.Array, channels: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pads the XLA-side operands to Triton-friendly powers of 2.

    Returns (q_hat [B, K, Gp, Rp] in the compute dtype, use_max [B, K, Rp] int32,
    channels [B, K, Rp] int32 with -1 padding), Gp, Rp = powers of 2 >= 16.
    """
    _, _, g, _ = q.shape
    r = channels.shape[-1]
    g_pad = max(_MIN_DOT, backend_lib.next_power_of_2(g))
    r_pad = max(_MIN_DOT, backend_lib.next_power_of_2(r))
    compute_dtype = jnp.promote_types(q.dtype, page_max.dtype)
    channels = channels.astype(jnp.int32)
    q_hat, use_max = channel_signs(q, channels)  # [B, K, G, R], [B, K, R]
    q_hat = jnp.pad(q_hat, ((0, 0), (0, 0), (0, g_pad - g), (0, r_pad - r)))  # [B, K, Gp, Rp]
    use_max = jnp.pad(use_max.astype(jnp.int32), ((0, 0), (0, 0), (0, r_pad - r)))
    channels = jnp.pad(channels, ((0, 0), (0, 0), (0, r_pad - r)), constant_values=-1)
    return q_hat.astype(compute_dtype), use_max, channels


@functools.partial(
    jax.jit,
    static_argnames=(
        "page_size", "block_p", "num_warps", "num_stages", "interpret", "channel_major"
    ),
)
def approx_scores_pallas(
    q: jax.Array,
    page_max: jax.Array,
    page_min: jax.Array,
    channels: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    block_p: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
    channel_major: bool = False,
) -> jax.Array:
    """Approximate (upper-bound) page scores of stage 2, reading only the selected channels.

    Args:
      q: [B, K, G, D] decode queries grouped by KV head, any float dtype.
      page_max, page_min: [B, K, P, D] element-wise key max/min per page (partial pages padded
        with -inf/+inf; empty pages all -inf/+inf). [B, K, D, P] if `channel_major`.
      channels: [B, K, R] int32 reduced channel set (top-r of mean_g |q|, chosen by the caller).
      lengths: [B] int32 valid tokens per row; valid pages = ceil(lengths / page_size).
      page_size: tokens per page (static).
      block_p: pages per program (power of 2 >= 16; clipped for small P). The H100 default
        gives B * K * P / 128 programs, e.g. 128 for one row of Llama-3.1-8B at 32k, page 16.
      num_warps, num_stages: Triton launch parameters.
      interpret: run in the Pallas interpreter (any device) instead of lowering to Triton.
      channel_major: metadata is stored [B, K, D, P] (contiguous per channel).

    Returns:
      [B, K, G, P] float32; pages with no valid token are exactly -inf.
    """
    check_scores_args(q, page_max, page_min, channels, lengths, page_size, channel_major)
    if block_p < _MIN_DOT or block_p & (block_p - 1):
        raise ValueError(f"block_p must be a power of 2 >= {_MIN_DOT}, got {block_p}")
    _, _, g, _ = q.shape
    num_pages = page_max.shape[3] if channel_major else page_max.shape[2]
    block_p = min(block_p, max(_MIN_DOT, backend_lib.next_power_of_2(num_pages)))
    q_hat, use_max, channels_pad = prepare_approx_operands(q, page_max, channels)
    out = _approx_scores_call(
        q_hat, use_max, channels_pad, page_max, page_min, lengths.astype(jnp.int32),
        page_size=page_size, block_p=block_p, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret, channel_major=channel_major,
    )  # [B, K, Gp, P_pad]
    return out[:, :, :g, :num_pages]


@functools.partial(
    jax.jit,
    static_argnames=(
        "page_size", "block_p", "num_warps", "num_stages", "kernels", "channel_major"
    ),
)
def approx_scores(
    q: jax.Array,
    page_max: jax.Array,
    page_min: jax.Array,
    channels: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    block_p: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    kernels: str = "auto",
    channel_major: bool = False,
) -> jax.Array:
    """`approx_scores_pallas`, `approx_scores_mosaic` or `approx_scores_reference`, whichever
    `kernels` names (`backend.choose`); block_p and the launch parameters go to the Triton
    kernel only."""
    kernel = functools.partial(
        approx_scores_pallas, block_p=block_p, num_warps=num_warps, num_stages=num_stages
    )
    run = backend_lib.choose(kernels, pallas=kernel, reference=approx_scores_reference,
                             mosaic=approx_scores_mosaic)
    return run(q, page_max, page_min, channels, lengths, page_size=page_size,
               channel_major=channel_major)

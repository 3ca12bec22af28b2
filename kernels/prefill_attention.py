"""Causal prefill attention over a KV buffer, flash-style: memory O(T * block), never [T, T].

    out[b, h, t] = softmax_s(q[b, h, t] . k[b, h // G, s] / sqrt(D)) @ v[b, h // G, s]
    over keys s with  s <= q_start + t,  s < lengths[b],  q_start + t - s < sliding_window

Queries sit at positions q_start .. q_start + T - 1 and keys at 0 .. S - 1 (the buffer index
is the position, as in a right-padded prompt), so the same call serves a one-shot prefill
(q_start 0, S = T) and a chunk of a chunked prefill (the chunk's queries over the buffer
built so far; slots past the chunk are never read).

`prefill_attention_reference` is the pure-jnp version: the CPU path and the reference of
the Pallas kernel. Each block of `block_q` queries runs an online softmax over key blocks
of `block_k` and visits only the key blocks it can see: from the sliding window's lower
edge (Mistral) to the causal diagonal, and none past the longest row. Only the blocks on
the diagonal, the window's edge or a row's end build and apply a mask; the interior blocks,
which every query of the block sees whole, skip it (on CPU the masking costs as much as a
matmul). GQA folds the G query heads of a KV head into the rows of one matmul, so K and V
are never repeated.

`prefill_attention_pallas(..., interpret=False)` is the Pallas kernel (Triton lowering,
like the stage-2 kernels); `prefill_attention(..., kernels=...)` runs whichever of the two
a backend name picks (`backend.choose`). The kernel's design:
  - GQA folded into rows: the wrapper lays q out as [B, K, T * G, D] with row t * G + g
    (query t, head g), so one tile of `block_q` rows holds block_q / G consecutive query
    positions of all G heads of a KV head, and each K/V tile is loaded once for all of
    them. Rows are a power of 2 >= 16 (tl.dot's minimum) for any G, with no padded heads
    (G = 3 would waste a quarter of a [4 * bq] tile); only the last tile has dead rows.
  - Grid (query-row tiles, B * K): 2-D so a vmap can add Triton's third and last grid
    axis. Tiles run heaviest-first (the last query tile, with the most causal key blocks,
    gets program 0) so the causal triangle does not leave a straggler at the end.
  - Online softmax (f32, exp2) over key tiles of `block_k`, visiting only the key blocks
    `key_block_range` allows for the tile's positions: from the sliding window's lower
    edge to the causal diagonal, and none at or past this row's length. lengths [B] and
    q_start [1] are read from small refs (Triton has no scalar prefetch), so a chunk with
    a traced q_start is one program.
  - K/V are not padded or copied: the kernel reads [S, D] per (b, k) in place with masked
    loads (keys past S and head-dim padding issue no memory traffic), so a 128k buffer is
    never re-materialised. Only q (transposed anyway) and the output are padded.
  - Rows that see no key return 0 (the running max starts finite, p is masked, l = 0).
    bf16 inputs multiply in bf16 with f32 accumulation (P is cast to V's dtype for the
    second matmul, as in FlashAttention); f32 inputs use f32 (HIGHEST) dots.
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

DEFAULT_BLOCK_Q = 256  # from a sweep at T=4096, 9/3 heads, D 64 on the 2-core dev CPU
DEFAULT_BLOCK_K = 512
# Running-max start: finite, so a block whose logits are all masked gives exp(m - m) with
# p forced to 0 and a correction of 1, never exp(-inf + inf) = NaN.
_M_INIT = float(jnp.finfo(jnp.float32).min)


def _check_args(q, k, v, lengths, block_q, block_k, layer=None):
    if layer is not None:  # [Ly, B, K, S, D] and the layer to read
        if k.ndim != 5 or k.shape != v.shape:
            raise ValueError(f"with a layer index k, v must be [Ly, B, K, S, D]; got "
                             f"{k.shape}, {v.shape}")
        k, v = k[0], v[0]
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"q must be [B, H, T, D] and k, v [B, K, S, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(
            f"k/v {k.shape} do not fit q {q.shape}: need the same B and D and H a multiple "
            "of the KV heads"
        )
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be [B] = [{B}], got {lengths.shape}")
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def key_block_range(q_lo, q_hi, max_length, *, block_k: int, num_blocks: int,
                    sliding_window: int | None):
    """Key blocks [lo, hi) that queries at positions [q_lo, q_hi) can attend to, given that
    no key at or past `max_length` is real. Blocks outside are fully masked and skipped."""
    hi = jnp.minimum(jnp.minimum(q_hi, max_length) + block_k - 1, num_blocks * block_k)
    hi = hi // block_k
    lo = jnp.int32(0)
    if sliding_window is not None:
        lo = jnp.maximum(q_lo - sliding_window + 1, 0) // block_k
    return lo, jnp.maximum(hi, lo)


def unmasked_key_block_range(q_lo, q_hi, min_length, lo, hi, *, block_k: int,
                             sliding_window: int | None):
    """The key blocks [full_lo, full_hi), inside [lo, hi), that every query at positions
    [q_lo, q_hi) of every row sees whole: at or before q_lo (causal), before the shortest
    row's length, and inside the window of the last query. Those need no mask."""
    full_hi = jnp.minimum(q_lo + 1, min_length) // block_k
    full_lo = lo
    if sliding_window is not None:
        first = q_hi - sliding_window  # the earliest key the last query still sees
        full_lo = jnp.maximum(lo, (first + block_k - 1) // block_k)
    full_lo = jnp.clip(full_lo, lo, hi)
    return full_lo, jnp.clip(full_hi, full_lo, hi)


def prefill_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    q_start: jax.Array | int = 0,
    *,
    sliding_window: int | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """Blockwise causal GQA attention (pure jnp, float32 softmax). The two matmuls take
    their operands in K's and V's dtype (the scaled queries and the probabilities rounded
    to it, as in the kernel) and accumulate in float32.

    q: [B, H, T, D] at positions q_start + (0 .. T-1); k, v: [B, K, S, D] at positions
    0 .. S-1, H = K * G; lengths: [B] int32, keys at or past lengths[b] are padding;
    q_start: int32 scalar (traced is fine). Static: sliding_window, block sizes (clamped to
    T and S). Returns [B, H, T, D] in q's dtype. A query that sees no key (a fully masked
    row) returns zeros; query rows past their row's length are padding, their values are
    unspecified.

    layer: with k, v every layer's buffers [Ly, B, K, S, D], the layer to attend over
    (traced is fine). Each key block is then read straight from the stack: slicing the
    layer out first would copy all S of its positions, however few the queries see.
    """
    _check_args(q, k, v, lengths, block_q, block_k, layer)
    B, H, T, D = q.shape
    K, S = k.shape[-3], k.shape[-2]
    G = H // K
    bq, bk = min(block_q, T), min(block_k, S)
    nq, nk = -(-T // bq), -(-S // bk)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, nq * bq - T), (0, 0)))
    if layer is not None and S % bk:  # a partial last block: pad one layer, not the stack
        k, v = (lax.dynamic_index_in_dim(a, layer, keepdims=False) for a in (k, v))
        layer = None
    if layer is None:
        k = jnp.pad(k, ((0, 0), (0, 0), (0, nk * bk - S), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, nk * bk - S), (0, 0)))

    def key_block_of(a, j):  # [B, K, bk, D], keys j * bk ..
        if layer is None:
            return lax.dynamic_slice_in_dim(a, j * bk, bk, axis=2)
        return lax.dynamic_slice(a, (layer, 0, 0, j * bk, 0), (1, B, K, bk, D))[0]
    # [nq, B, K, G * bq, D]: one query block, the group's heads folded into its rows
    qb = q.reshape(B, K, G, nq, bq, D).transpose(3, 0, 1, 2, 4, 5).reshape(nq, B, K, G * bq, D)
    q_start = jnp.asarray(q_start, jnp.int32)
    lengths = lengths.astype(jnp.int32)
    max_length, min_length = jnp.max(lengths), jnp.min(lengths)
    scale = 1.0 / jnp.sqrt(jnp.float32(D))

    def query_block(args):
        i, qi = args  # qi [B, K, G * bq, D]
        # scaled in f32, then multiplied in K's dtype with f32 accumulation (as the kernel
        # does): XLA:CPU runs a bf16 dot with an f32 result as a bf16 GEMM, where f32
        # operands would run at f32 speed
        qi = (qi.astype(jnp.float32) * scale).astype(k.dtype)
        q_pos = q_start + i * bq + jnp.arange(bq, dtype=jnp.int32)  # [bq]
        row_pos = jnp.tile(q_pos, G)  # [G * bq], row g * bq + t is head g, query t
        lo, hi = key_block_range(q_pos[0], q_pos[-1] + 1, max_length, block_k=bk,
                                 num_blocks=nk, sliding_window=sliding_window)
        full_lo, full_hi = unmasked_key_block_range(q_pos[0], q_pos[-1] + 1, min_length,
                                                    lo, hi, block_k=bk,
                                                    sliding_window=sliding_window)

        def key_block(j, carry, masked: bool):
            m, denom, acc = carry  # [B, K, G*bq], [B, K, G*bq], [B, K, G*bq, D]
            kj, vj = key_block_of(k, j), key_block_of(v, j)
            s = jnp.einsum("bkrd,bksd->bkrs", qi, kj,
                           preferred_element_type=jnp.float32)  # [B, K, G*bq, bk]
            if masked:  # the diagonal, the window's edge and the row ends
                k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)  # [bk]
                mask = k_pos[None, :] <= row_pos[:, None]  # [G*bq, bk]
                if sliding_window is not None:
                    mask &= row_pos[:, None] - k_pos[None, :] < sliding_window
                mask = mask[None] & (k_pos[None, None, :] < lengths[:, None, None])
                mask = mask[:, None]  # [B, 1, G*bq, bk]
                m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _M_INIT), axis=-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            else:  # interior blocks, seen whole by every row: no mask to build or apply
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            denom = denom * correction + p.sum(axis=-1)
            pv = jnp.einsum("bkrs,bksd->bkrd", p.astype(vj.dtype), vj,
                            preferred_element_type=jnp.float32)
            acc = acc * correction[..., None] + pv
            return m_new, denom, acc

        masked = functools.partial(key_block, masked=True)
        rows = (B, K, G * bq)
        carry = (jnp.full(rows, _M_INIT, jnp.float32), jnp.zeros(rows, jnp.float32),
                 jnp.zeros((*rows, D), jnp.float32))
        carry = lax.fori_loop(lo, full_lo, masked, carry)
        carry = lax.fori_loop(full_lo, full_hi, functools.partial(key_block, masked=False),
                              carry)
        _, denom, acc = lax.fori_loop(full_hi, hi, masked, carry)
        return jnp.where(denom[..., None] > 0, acc / jnp.maximum(denom, 1e-30)[..., None], 0.0)

    out = lax.map(query_block, (jnp.arange(nq, dtype=jnp.int32), qb))  # [nq, B, K, G*bq, D]
    out = out.reshape(nq, B, K, G, bq, D).transpose(1, 2, 3, 0, 4, 5)
    return out.reshape(B, H, nq * bq, D)[:, :, :T].astype(q.dtype)


# Pallas defaults (rows of the folded (query, head) tile, keys per tile), sized like JAX's
# own Triton flash attention (128 x 128 bf16, 8 warps at D 128) but with half the key tile
# so the f32 [rows, D] accumulator, the q tile and the K/V tiles fit in registers at f32.
PALLAS_BLOCK_Q = 128
PALLAS_BLOCK_K = 64
_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16.
_LOG2_E = math.log2(math.e)


def _prefill_kernel(
    lengths_ref,  # [] this row's valid keys
    q_start_ref,  # [1] position of query 0
    q_ref,  # [R, Dp] one tile of folded rows, row r = t * G + g (zero padded)
    k_ref,  # [S, D] this KV head's keys, read in place
    v_ref,  # [S, D] this KV head's values
    o_ref,  # [R, Dp]
    *,
    num_q_tiles: int,
    group: int,
    num_queries: int,
    seq_len: int,
    head_dim: int,
    block_k: int,
    sliding_window: int | None,
    sm_scale: float,
    precision,
):
    rows, d_pad = q_ref.shape
    tile = num_q_tiles - 1 - pl.program_id(0)  # heaviest (latest) query tile first
    q_start = q_start_ref[0]
    length = jnp.minimum(lengths_ref[()], seq_len)
    # Folded row -> query index (non-negative, so lax.div is floor division).
    row = tile * rows + jnp.arange(rows, dtype=jnp.int32)  # [R]
    row_pos = q_start + lax.div(row, jnp.int32(group))  # [R]
    q_lo = q_start + lax.div(tile * rows, group)
    q_hi = q_start + jnp.minimum(lax.div(tile * rows + rows - 1, group) + 1, num_queries)
    lo, hi = _kernel_key_block_range(q_lo, q_hi, length, block_k=block_k,
                                     num_blocks=pl.cdiv(seq_len, block_k),
                                     sliding_window=sliding_window)

    dims = jnp.arange(d_pad, dtype=jnp.int32)  # [Dp]
    dim_ok = dims < head_dim  # [Dp], all true unless D is not a power of 2
    cols = jnp.minimum(dims, head_dim - 1)[None, :]  # [1, Dp]
    q = q_ref[...]  # [R, Dp]
    qk_scale = sm_scale * _LOG2_E  # exp2 domain

    def body(j, carry):
        acc, m_prev, l_prev = carry  # [R, Dp], [R], [R]
        k_pos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [bk]
        in_buffer = k_pos < seq_len  # [bk]
        key_rows = jnp.where(in_buffer, k_pos, 0)[:, None]  # [bk, 1]
        load_mask = in_buffer[:, None] & dim_ok[None, :]  # [bk, Dp]
        keys = plgpu.load(k_ref.at[key_rows, cols], mask=load_mask, other=0)  # [bk, Dp]
        logits = plgpu.dot(q, keys.astype(q.dtype), trans_b=True, precision=precision)
        logits = logits * qk_scale  # [R, bk] f32
        mask = (k_pos[None, :] <= row_pos[:, None]) & (k_pos < length)[None, :]  # [R, bk]
        if sliding_window is not None:
            mask &= row_pos[:, None] - k_pos[None, :] < sliding_window
        m_next = jnp.maximum(m_prev, jnp.where(mask, logits, _M_INIT).max(axis=-1))  # [R]
        p = jnp.where(mask, jnp.exp2(logits - m_next[:, None]), 0.0)  # [R, bk]
        correction = jnp.exp2(m_prev - m_next)  # [R]
        l_next = correction * l_prev + p.sum(axis=-1)
        values = plgpu.load(v_ref.at[key_rows, cols], mask=load_mask, other=0)  # [bk, Dp]
        values = values.astype(q.dtype)
        acc = correction[:, None] * acc + plgpu.dot(
            p.astype(values.dtype), values, precision=precision
        )  # [R, Dp]
        return acc, m_next, l_next

    init = (
        jnp.zeros((rows, d_pad), jnp.float32),
        jnp.full((rows,), _M_INIT, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, _, denom = lax.fori_loop(lo, hi, body, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]  # 0 for rows that see no key
    o_ref[...] = out.astype(o_ref.dtype)


def _kernel_key_block_range(q_lo, q_hi, length, *, block_k, num_blocks, sliding_window):
    """`key_block_range` with lax.div (all operands are non-negative): the same blocks, in
    primitives the Triton lowering has (jnp's floor division adds sign fix-ups)."""
    hi = lax.div(jnp.minimum(jnp.minimum(q_hi, length) + block_k - 1, num_blocks * block_k),
                 jnp.int32(block_k))
    lo = jnp.int32(0)
    if sliding_window is not None:
        lo = lax.div(jnp.maximum(q_lo - sliding_window + 1, 0), jnp.int32(block_k))
    return lo, jnp.maximum(hi, lo)


def _prefill_call(
    qf: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    q_start: jax.Array,
    *,
    rows: int,
    group: int,
    num_queries: int,
    block_k: int,
    sliding_window: int | None,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    out_dtype: jnp.dtype,
) -> jax.Array:
    """Runs the Pallas kernel on folded operands (grid and BlockSpecs).

    qf: [B, K, tiles * rows, Dp] folded queries in the compute dtype, row t * G + g, zero
    padded; k, v [B, K, S, D] read in place; lengths [B] int32; q_start [1] int32.
    Returns [B, K, tiles * rows, Dp] in out_dtype.
    """
    B, K, folded, d_pad = qf.shape
    S, D = k.shape[2], k.shape[3]
    num_q_tiles = folded // rows

    def bk_of(j):
        return j // K, j % K

    in_specs = [
        pl.BlockSpec((None,), lambda i, j: (j // K,)),
        pl.BlockSpec((1,), lambda i, j: (0,)),
        pl.BlockSpec((None, None, rows, d_pad),
                     lambda i, j: (*bk_of(j), num_q_tiles - 1 - i, 0)),
        pl.BlockSpec((None, None, S, D), lambda i, j: (*bk_of(j), 0, 0)),
        pl.BlockSpec((None, None, S, D), lambda i, j: (*bk_of(j), 0, 0)),
    ]
    out_spec = pl.BlockSpec((None, None, rows, d_pad),
                            lambda i, j: (*bk_of(j), num_q_tiles - 1 - i, 0))
    kernel = functools.partial(
        _prefill_kernel, num_q_tiles=num_q_tiles, group=group, num_queries=num_queries,
        seq_len=S, head_dim=D, block_k=block_k, sliding_window=sliding_window,
        sm_scale=1.0 / math.sqrt(D),
        precision=lax.Precision.HIGHEST if qf.dtype == jnp.float32 else None,
    )
    return backend_lib.pallas_call(
        kernel,
        interpret=interpret,
        out_shape=jax.ShapeDtypeStruct(qf.shape, out_dtype),
        grid=(num_q_tiles, B * K),
        in_specs=in_specs,
        out_specs=out_spec,
        num_warps=num_warps,
        num_stages=num_stages,
        name="rocketkv_prefill_attention",
    )(lengths, q_start, qf, k, v)


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "block_q", "block_k", "num_warps", "num_stages",
                     "interpret"),
)
def prefill_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    q_start: jax.Array | int = 0,
    *,
    sliding_window: int | None = None,
    block_q: int = PALLAS_BLOCK_Q,
    block_k: int = PALLAS_BLOCK_K,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool = False,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """Prefill attention as a Pallas kernel; the contract of `prefill_attention_reference`.

    block_q counts rows of the folded (query, head) tile, block_q / G query positions of
    all G heads; block_q and block_k are powers of 2 >= 16 (shrunk for short T and S).
    num_warps: Triton warps, default 4 for D <= 64 and 8 above. interpret: run in the
    Pallas interpreter (any device) instead of lowering to Triton.
    """
    _check_args(q, k, v, lengths, block_q, block_k, layer)
    if layer is not None:  # the kernel reads one layer's [B, K, S, D]
        k, v = (lax.dynamic_index_in_dim(a, layer, keepdims=False) for a in (k, v))
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value < _MIN_DOT or value & (value - 1):
            raise ValueError(
                f"{name} must be a power of 2 >= {_MIN_DOT} for the Pallas kernel, got {value}"
            )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    rows = min(block_q, max(_MIN_DOT, backend_lib.next_power_of_2(T * G)))
    bk = min(block_k, max(_MIN_DOT, backend_lib.next_power_of_2(S)))
    d_pad = max(_MIN_DOT, backend_lib.next_power_of_2(D))
    num_q_tiles = pl.cdiv(T * G, rows)
    compute_dtype = jnp.promote_types(q.dtype, k.dtype)
    qf = q.reshape(B, K, G, T, D).transpose(0, 1, 3, 2, 4).reshape(B, K, T * G, D)
    qf = jnp.pad(qf.astype(compute_dtype),
                 ((0, 0), (0, 0), (0, num_q_tiles * rows - T * G), (0, d_pad - D)))
    out = _prefill_call(
        qf, k, v, lengths.astype(jnp.int32), jnp.asarray(q_start, jnp.int32).reshape(1),
        rows=rows, group=G, num_queries=T, block_k=bk, sliding_window=sliding_window,
        num_warps=num_warps or (4 if D <= 64 else 8), num_stages=num_stages,
        interpret=interpret, out_dtype=q.dtype,
    )  # [B, K, tiles * R, Dp]
    out = out[:, :, : T * G, :D].reshape(B, K, T, G, D).transpose(0, 1, 3, 2, 4)
    return out.reshape(B, H, T, D)


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    q_start: jax.Array | int = 0,
    *,
    sliding_window: int | None = None,
    kernels: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """`prefill_attention_pallas` or `prefill_attention_reference`, whichever `kernels`
    names (`backend.choose`). Block sizes default per implementation: for the reference
    block_q counts query positions (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K), for the kernel
    rows of the folded (query, head) tile (PALLAS_BLOCK_Q, PALLAS_BLOCK_K). layer: k, v
    are every layer's [Ly, B, K, S, D] and this one is read."""
    blocks = {name: b for name, b in (("block_q", block_q), ("block_k", block_k)) if b}
    run = backend_lib.choose(kernels, pallas=prefill_attention_pallas,
                             reference=prefill_attention_reference)
    return run(q, k, v, lengths, q_start, sliding_window=sliding_window, layer=layer,
               **blocks)

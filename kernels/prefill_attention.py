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
edge (Mistral) to the causal diagonal, and none past the longest row. GQA folds the G query
heads of a KV head into the rows of one matmul, so K and V are never repeated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK_Q = 256  # measured on the 2-core dev CPU (benchmarks/prefill.py --blocks)
DEFAULT_BLOCK_K = 512
# Running-max start: finite, so a block whose logits are all masked gives exp(m - m) with
# p forced to 0 and a correction of 1, never exp(-inf + inf) = NaN.
_M_INIT = float(jnp.finfo(jnp.float32).min)


def _check_args(q, k, v, lengths, block_q, block_k):
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
) -> jax.Array:
    """Blockwise causal GQA attention (pure jnp, float32 softmax).

    q: [B, H, T, D] at positions q_start + (0 .. T-1); k, v: [B, K, S, D] at positions
    0 .. S-1, H = K * G; lengths: [B] int32, keys at or past lengths[b] are padding;
    q_start: int32 scalar (traced is fine). Static: sliding_window, block sizes (clamped to
    T and S). Returns [B, H, T, D] in q's dtype. A query that sees no key (a fully masked
    row) returns zeros; query rows past their row's length are padding, their values are
    unspecified.
    """
    _check_args(q, k, v, lengths, block_q, block_k)
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    bq, bk = min(block_q, T), min(block_k, S)
    nq, nk = -(-T // bq), -(-S // bk)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, nq * bq - T), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, nk * bk - S), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, nk * bk - S), (0, 0)))
    # [nq, B, K, G * bq, D]: one query block, the group's heads folded into its rows
    qb = q.reshape(B, K, G, nq, bq, D).transpose(3, 0, 1, 2, 4, 5).reshape(nq, B, K, G * bq, D)
    q_start = jnp.asarray(q_start, jnp.int32)
    lengths = lengths.astype(jnp.int32)
    max_length = jnp.max(lengths)
    scale = 1.0 / jnp.sqrt(jnp.float32(D))

    def query_block(args):
        i, qi = args  # qi [B, K, G * bq, D]
        qi = qi.astype(jnp.float32) * scale
        q_pos = q_start + i * bq + jnp.arange(bq, dtype=jnp.int32)  # [bq]
        row_pos = jnp.tile(q_pos, G)  # [G * bq], row g * bq + t is head g, query t
        lo, hi = key_block_range(q_pos[0], q_pos[-1] + 1, max_length, block_k=bk,
                                 num_blocks=nk, sliding_window=sliding_window)

        def key_block(j, carry):
            m, l, acc = carry  # [B, K, G*bq], [B, K, G*bq], [B, K, G*bq, D]
            kj = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2).astype(jnp.float32)
            vj = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2).astype(jnp.float32)
            s = jnp.einsum("bkrd,bksd->bkrs", qi, kj)  # [B, K, G*bq, bk]
            k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)  # [bk]
            mask = k_pos[None, :] <= row_pos[:, None]  # [G*bq, bk]
            if sliding_window is not None:
                mask &= row_pos[:, None] - k_pos[None, :] < sliding_window
            mask = mask[None] & (k_pos[None, None, :] < lengths[:, None, None])  # [B, G*bq, bk]
            mask = mask[:, None]  # [B, 1, G*bq, bk]
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _M_INIT), axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(axis=-1)
            acc = acc * correction[..., None] + jnp.einsum("bkrs,bksd->bkrd", p, vj)
            return m_new, l, acc

        rows = (B, K, G * bq)
        init = (jnp.full(rows, _M_INIT, jnp.float32), jnp.zeros(rows, jnp.float32),
                jnp.zeros((*rows, D), jnp.float32))
        _, l, acc = lax.fori_loop(lo, hi, key_block, init)
        return jnp.where(l[..., None] > 0, acc / jnp.maximum(l, 1e-30)[..., None], 0.0)

    out = lax.map(query_block, (jnp.arange(nq, dtype=jnp.int32), qb))  # [nq, B, K, G*bq, D]
    out = out.reshape(nq, B, K, G, bq, D).transpose(1, 2, 3, 0, 4, 5)
    return out.reshape(B, H, nq * bq, D)[:, :, :T].astype(q.dtype)


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    q_start: jax.Array | int = 0,
    *,
    sliding_window: int | None = None,
    backend: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
    """Prefill attention on the chosen backend (see `backend.py`); same contract as
    `prefill_attention_reference`. Block sizes default per backend."""
    from . import backend as backend_lib

    resolved = backend_lib.resolve_backend(backend)
    if resolved == "reference":
        return prefill_attention_reference(
            q, k, v, lengths, q_start, sliding_window=sliding_window,
            block_q=block_q or DEFAULT_BLOCK_Q, block_k=block_k or DEFAULT_BLOCK_K,
        )
    raise NotImplementedError("the Pallas prefill kernel is not written yet")

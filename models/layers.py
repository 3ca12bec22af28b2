"""Stateless building blocks of the decoder: RMSNorm, SwiGLU MLP, dense GQA attention."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite "minus infinity": a fully masked row gives zeros, never NaN


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype. x [..., E], weight [E]."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LayerWeight:
    """One weight of several layers, each its own array, at a traced layer index (an index
    into `arrays`). `linear` multiplies by it in a `lax.switch` with one branch per layer,
    and each branch's matmul reads its layer's array where it lies. On XLA:CPU a weight
    taken out of a stacked array at a traced index, or returned by a switch, is copied
    into a fresh buffer before the matmul (benchmarks/weight_slicing.py)."""

    arrays: tuple[jax.Array, ...]
    index: jax.Array

    @property
    def dtype(self):
        return self.arrays[0].dtype

    @property
    def shape(self):
        return self.arrays[0].shape


def linear(x: jax.Array, w: jax.Array, *, w_transposed: bool = False) -> jax.Array:
    """x [..., E] @ w [E, F] (or @ w.T for w [F, E] with `w_transposed`, a tied LM head)
    -> [..., F] float32: the inputs multiplied in their own dtype, accumulated and returned
    in float32 (for f32 inputs, exactly `x @ w` / `x @ w.T`).

    On XLA:CPU (jaxlib 0.10.2) a bf16 dot runs as YNNPACK's bf16 GEMM only in this form:
      - an f32 result: a bf16 `x @ w` with a bf16 result is rewritten into converts of both
        operands to f32 and an f32 dot (for a stacked weight the convert of the whole stack
        is hoisted out of the layer loop, once per call);
      - no transpose op on w: XLA:CPU runs every data-movement op on bf16 in f32, so
        `w.T` converts all of w; w [F, E] is contracted on its own last axis instead;
      - more than one row: a one-row dot goes to XLA's loop emitter, which converts the
        weight to f32 again; one row of zeros makes it a two-row GEMM.
    f32 weights keep the plain matmul. A `LayerWeight` w is multiplied inside a switch
    over its layers.
    """
    if isinstance(w, LayerWeight):
        return jax.lax.switch(w.index, [functools.partial(linear, w=a, w_transposed=w_transposed)
                                        for a in w.arrays], x)
    if w.dtype == jnp.float32:
        return jnp.matmul(x, w.T if w_transposed else w, preferred_element_type=jnp.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if rows == 1:
        x2 = jnp.pad(x2, ((0, 1), (0, 0)))
    dims = (((1,), (1 if w_transposed else 0,)), ((), ()))
    out = jax.lax.dot_general(x2, w, dims, preferred_element_type=jnp.float32)[:rows]
    return out.reshape(*lead, out.shape[-1])


def swiglu_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)), float32. x [..., E], w_gate/w_up [E, F], w_down
    [F, E]. The gate is computed in float32 and rounded to x's dtype for the down
    projection (`linear`)."""
    h = jax.nn.silu(linear(x, w_gate)) * linear(x, w_up)
    return linear(h.astype(x.dtype), w_down)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with grouped-query heads, computed in float32.

    q: [B, H, T, D]; k, v: [B, K, S, D] with H = K * G; mask: bool, broadcastable to
    [B, K, T, S] (True = attend). Returns [B, H, T, D] in q's dtype; a query row with no
    attendable key returns zeros.
    """
    B, H, T, D = q.shape
    K = k.shape[1]
    G = H // K
    qg = q.reshape(B, K, G, T, D).astype(jnp.float32)
    logits = jnp.einsum("bkgtd,bksd->bkgts", qg, k.astype(jnp.float32)) / jnp.sqrt(D)
    mask = mask[:, :, None]  # [B, K, 1, T, S]
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v.astype(jnp.float32))
    return out.reshape(B, H, T, D).astype(q.dtype)


# f32 bytes of one key block of decode_attention over all batch rows and KV heads: small
# enough that the block's f32 copy and its scores stay in cache, large enough that the
# loop's per-iteration cost is small beside the block's reads (benchmarks/decode_batched.py)
DECODE_BLOCK_BYTES = 4 * 2**20
DECODE_BLOCK_RANGE = (16, 512)


def decode_block_size(batch: int, kv_heads: int, head_dim: int) -> int:
    """Keys per block of `decode_attention`: the largest power of two whose f32 keys over
    all rows and KV heads fit DECODE_BLOCK_BYTES, within DECODE_BLOCK_RANGE."""
    per_slot = batch * kv_heads * head_dim * 4
    lo, hi = DECODE_BLOCK_RANGE
    fits = max(1, DECODE_BLOCK_BYTES // per_slot)
    return min(hi, max(lo, 1 << (fits.bit_length() - 1)))


def decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, block: int | None = None,
    layer: jax.Array | int | None = None,
) -> jax.Array:
    """One decode query per head over a cache, reading each key and value once.

    q: [B, H, D]; k, v: [B, K, S, D] with H = K * G, or with `layer` (an int or a traced
    index) stacked caches [L, B, K, S, D] read at that layer where they lie: slicing the
    layer out first would copy its whole cache on XLA:CPU. visible: bool [B, K, S] (True =
    attend). Returns [B, H, D] in q's dtype; a head with no visible slot returns zeros.
    The same numbers as `dense_attention` with T = 1 (its reference), computed blockwise:
    a loop over `block` slots at a time (static; `decode_block_size` by default) keeps a
    running max, softmax denominator and weighted sum of values per query head (the online
    softmax), in float32. The G query heads of a KV head share each block, so the cache is
    streamed once per step whatever the group size. The last S % block slots are one more
    block of their own size, so the cache is never padded or copied.
    """
    B, H, D = q.shape
    K, S = k.shape[-3], k.shape[-2]
    G = H // K
    block = min(block or decode_block_size(B, K, D), S)
    qg = q.reshape(B, K, G, D).astype(jnp.float32) * (1.0 / math.sqrt(D))

    def update(carry, kb, vb, mb):
        m, den, acc = carry  # [B, K, G], [B, K, G], [B, K, G, D]
        # scores [B, K, s, G]: the key block is read row by row, each row for all G heads
        s = jnp.einsum("bkgd,bksd->bksg", qg, kb)
        s = jnp.where(mb[..., None], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=2))
        p = jnp.where(mb[..., None], jnp.exp(s - m_new[:, :, None]), 0.0)
        scale = jnp.exp(m - m_new)
        den = den * scale + p.sum(axis=2)
        acc = acc * scale[..., None] + jnp.einsum("bksg,bksd->bkgd", p, vb)
        return m_new, den, acc

    carry = (jnp.full((B, K, G), NEG_INF, jnp.float32), jnp.zeros((B, K, G), jnp.float32),
             jnp.zeros((B, K, G, D), jnp.float32))
    carry = fold_cache_blocks(update, carry, (k, v), visible, block, layer)
    _, den, acc = carry
    out = jnp.where(den[..., None] > 0, acc / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
    return out.reshape(B, H, D).astype(q.dtype)


def fold_cache_blocks(update, carry, caches, visible: jax.Array, block: int,
                      layer: jax.Array | int | None = None):
    """`carry` folded by update(carry, *blocks, visible_block) over the slots of `caches`,
    `block` slots at a time (the last S % block slots as one more block of their own size,
    so nothing is padded). caches: arrays [B, K, S, D], or with `layer` stacked arrays
    [L, B, K, S, D] read at that layer where they lie (slicing the layer out first would
    copy it on XLA:CPU); each block reaches `update` as float32. visible: [B, K, S]."""
    B, K, S, D = caches[0].shape[-4:]
    # a bf16 cache is sliced as its uint16 bits and widened inside the loop: sliced as
    # bf16, XLA moves the f32 cast before the slice and out of the loop, which converts the
    # whole cache into a new f32 buffer every step
    bits = [as_bits(a) for a in caches]

    def take(a, start, size):  # slots [start, start + size) of the layer's cache
        if layer is None:
            return jax.lax.dynamic_slice_in_dim(a, start, size, axis=2)
        return jax.lax.dynamic_slice(a, (layer, 0, 0, start, 0), (1, B, K, size, D))[0]

    def blocks(start, size):
        widened = (_widen(take(b, start, size), a.dtype)
                   for a, b in zip(caches, bits, strict=True))
        return *widened, jax.lax.dynamic_slice_in_dim(visible, start, size, axis=2)

    n = S // block
    carry = jax.lax.fori_loop(0, n, lambda j, c: update(c, *blocks(j * block, block)), carry)
    if S % block:
        carry = update(carry, *blocks(n * block, S - n * block))
    return carry


def masked_mean(v: jax.Array, visible: jax.Array, block: int | None = None,
                layer: jax.Array | int | None = None) -> jax.Array:
    """The mean of the visible slots' values, read once and blockwise as `decode_attention`
    reads them: v [B, K, S, D] (or stacked [L, B, K, S, D] at `layer`), visible [B, K, S]
    -> [B, K, D] float32, zeros where no slot is visible. (XLA:CPU compiles the one-shot
    `where(visible, v, 0).sum(axis=2)` into a masked f32 copy of v, written and then read
    again.)"""
    B, K, S, D = v.shape[-4:]
    block = min(block or decode_block_size(B, K, D), S)

    def update(total, vb, mb):
        return total + jnp.where(mb[..., None], vb, 0.0).sum(axis=2)

    total = fold_cache_blocks(update, jnp.zeros((B, K, D), jnp.float32), (v,), visible, block,
                              layer)
    count = jnp.maximum(visible.sum(axis=-1), 1)[..., None]  # [B, K, 1]
    return total / count


@functools.cache
def bf16_moves_in_f32() -> bool:
    """Whether this backend runs data-movement ops on bf16 arrays in f32.

    XLA:CPU in jaxlib 0.10.2 does (its bf16 normalization): a dynamic-slice converts the
    whole array to f32 first, and a dynamic-update-slice or scatter into a bf16 buffer
    converts the whole buffer to f32 and back, so a one-row write into a stacked cache
    costs a pass over all of it. jaxlib 0.12's XLA:CPU writes bf16 in place. Found out by
    compiling a one-row write into a bf16 buffer and looking for a convert in it.
    """
    def write(buf, row, i):
        return jax.lax.dynamic_update_slice_in_dim(buf, row, i, axis=0)

    hlo = jax.jit(write).lower(jax.ShapeDtypeStruct((8, 128), jnp.bfloat16),
                               jax.ShapeDtypeStruct((1, 128), jnp.bfloat16),
                               jax.ShapeDtypeStruct((), jnp.int32)).compile().as_text()
    return " convert(" in hlo


def as_bits(x: jax.Array) -> jax.Array:
    """A bf16 array as its uint16 bits where the backend moves bf16 in f32
    (`bf16_moves_in_f32`): on the bits, slices are plain copies and writes happen in
    place. `from_bits` and `_widen` take them back. Anything else is returned unchanged.
    """
    if x.dtype == jnp.bfloat16 and bf16_moves_in_f32():
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def from_bits(x: jax.Array, dtype) -> jax.Array:
    """`as_bits(y)` -> y, for y of `dtype`."""
    if x.dtype == jnp.uint16 and dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return x


def _widen(x: jax.Array, dtype) -> jax.Array:
    """`as_bits(y)` -> y as float32 (bf16 is the top half of an f32: shift its bits up)."""
    if x.dtype == jnp.uint16 and dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)
    return x.astype(jnp.float32)


def attention_mask(
    q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None
) -> jax.Array:
    """Causal (and sliding-window) visibility of keys at k_pos from queries at q_pos.

    q_pos: [..., T], k_pos: [..., S] int32, negative k_pos marks an empty slot.
    Returns bool [..., T, S]. Mistral's window keeps keys with q - k < window.
    """
    q = q_pos[..., :, None]
    k = k_pos[..., None, :]
    mask = (k >= 0) & (k <= q)
    if sliding_window is not None:
        mask &= (q - k) < sliding_window
    return mask

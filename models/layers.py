"""Stateless building blocks of the decoder: RMSNorm, SwiGLU MLP, dense GQA attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite "minus infinity": a fully masked row gives zeros, never NaN


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, returned in x's dtype. x [..., E], weight [E]."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def swiglu_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)). x [..., E], w_gate/w_up [E, F], w_down [F, E]."""
    return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


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

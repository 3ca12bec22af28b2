"""Functional Llama / Mistral decoder.

The forward is a pure function of (params, config, tokens, positions, cache, plan). The
KV method is passed in as a resolved plan with three pure functions (`compress` once
after prefill, `append` and `attend` at every decode step); the model never branches on
which method it is. Params and caches are stacked on a leading layer axis and the layers
run in one loop (`lax.scan` at prefill, `lax.fori_loop` at decode), so compile time does
not grow with depth. At decode the stacked cache is the loop carry: each layer writes its
new token into it in place and attends on its own slice, so a step reads the cache once
instead of copying every layer in and out of the loop.

Padding convention: prompts are right-padded; token t of a row sits at position t, and
`lengths` [B] says how many tokens of each row are real.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .layers import attention_mask, dense_attention, rms_norm, swiglu_mlp
from .rope import apply_rope, inverse_frequencies

Params = dict[str, Any]


class KVPlan(Protocol):
    """What the model needs from a KV-cache method (a resolved, hashable plan)."""

    capacity: int

    def compress(self, k, v, q, lengths):
        """k, v: [B, K, T, D], q: [B, H, T, D] (RoPE applied), lengths: [B] -> cache."""

    def append(self, cache, k, v, position, layer):
        """k, v: [B, K, D], position: [B] -> the stacked cache (leading layer axis) with the
        token written into layer `layer` (a traced index)."""

    def attend(self, q, cache, query_pos, sliding_window):
        """q: [B, H, D], query_pos: [B] -> attention output [B, H, D]."""


def _project_qkv(p, config: ModelConfig, h, positions, inv_freq):
    """h [B, T, E] -> q [B, H, T, D], k, v [B, K, T, D] with RoPE on q and k."""
    B, T, _ = h.shape
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]  # [B, T, H*D], [B, T, K*D] x2
    if config.qkv_bias:  # Qwen2; Llama / Qwen3 attention_bias
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # [B, H, T, D]
    k = k.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # [B, K, T, D]
    v = v.reshape(B, T, K, D).transpose(0, 2, 1, 3)  # [B, K, T, D]
    if config.qk_norm:  # Qwen3: RMSNorm over each head's D channels, before RoPE
        q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], config.rms_norm_eps)
    q = apply_rope(q, positions[:, None, :], inv_freq)
    k = apply_rope(k, positions[:, None, :], inv_freq)
    return q, k, v


def _mlp_block(p, config: ModelConfig, x):
    """x [B, T, E]: the residual after attention (`x + attn @ wo`) -> the layer's output."""
    if config.o_bias:  # the o_proj bias: every caller passes x right after `attn @ wo`
        x = x + p["bo"]
    h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
    if config.mlp_bias:
        gate = h @ p["w_gate"] + p["b_gate"]  # [B, T, F]
        up = h @ p["w_up"] + p["b_up"]  # [B, T, F]
        return x + (jax.nn.silu(gate) * up) @ p["w_down"] + p["b_down"]
    return x + swiglu_mlp(h, p["w_gate"], p["w_up"], p["w_down"])


def _unembed(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and LM head: x [..., E] -> float32 logits [..., V]."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]  # [E, V]
    return jnp.dot(x, head, preferred_element_type=jnp.float32)


def forward_prefill(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    lengths: jax.Array,
    plan: KVPlan,
    *,
    all_logits: bool = True,
) -> tuple[jax.Array, Any]:
    """Run the prompt through the model and build the (compressed) KV cache.

    tokens: [B, T] int32, right-padded; lengths: [B] int32 real tokens per row (>= 1).
    Returns (logits, cache): logits [B, T, V] float32 when `all_logits`, else the
    logits of each row's last real token [B, V]; cache: the plan's cache pytree with a
    leading layer axis, after the plan's `compress`.
    """
    B, T = tokens.shape
    inv_freq = inverse_frequencies(config)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))  # [B, T]
    key_pos = jnp.where(positions < lengths[:, None], positions, -1)  # [B, T]
    mask = attention_mask(positions, key_pos, config.sliding_window)[:, None]  # [B, 1, T, T]
    x = params["embed"][tokens]  # [B, T, E]

    def layer(x, p):
        h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(p, config, h, positions, inv_freq)
        attn = dense_attention(q, k, v, mask)  # [B, H, T, D]
        cache = plan.compress(k, v, q, lengths)
        attn = attn.transpose(0, 2, 1, 3).reshape(B, T, -1)  # [B, T, H*D]
        x = x + attn @ p["wo"]
        return _mlp_block(p, config, x), cache

    x, cache = jax.lax.scan(layer, x, params["layers"])
    if not all_logits:
        x = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, E]
    return _unembed(params, config, x), cache


def forward_decode(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Any,
    plan: KVPlan,
) -> tuple[jax.Array, Any]:
    """One decode step: tokens [B] int32 at positions [B] -> (logits [B, V] float32, cache).

    Each layer appends the new token to its cache (plan.append) and attends with
    plan.attend, which is where sparse methods read only their selected tokens.
    """
    B = tokens.shape[0]
    inv_freq = inverse_frequencies(config)
    x = params["embed"][tokens][:, None]  # [B, 1, E]

    def layer(i, carry):
        x, cache = carry
        p = jax.tree.map(lambda a: a[i], params["layers"])
        h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(p, config, h, positions[:, None], inv_freq)
        cache = plan.append(cache, k[:, :, 0], v[:, :, 0], positions, i)
        c = jax.tree.map(lambda a: a[i], cache)  # this layer's cache, read where it lies
        attn = plan.attend(q[:, :, 0], c, positions, config.sliding_window)  # [B, H, D]
        x = x + attn.reshape(B, 1, -1) @ p["wo"]
        return _mlp_block(p, config, x), cache

    # the cache as loop carry (not scan xs/ys): XLA updates it in place, where scanning
    # over it measured ~16x the cache bytes per step (a copy of every layer in and out)
    x, cache = jax.lax.fori_loop(0, config.num_layers, layer, (x, cache))
    return _unembed(params, config, x[:, 0]), cache

"""Stage 1: SnapKV-style prompt-token eviction, once per layer after prefill.

Each row's last `window` real tokens are the observation window. Their queries score every
earlier token of the row (softmax over the causally visible keys, summed over the window
queries and over the G query heads of each KV head, so a whole GQA group shares one index
set); the scores are pooled along the sequence (average pooling for SnapKV, max pooling
with a large kernel for SnapKV++), and the top `budget - window` earlier tokens are kept
together with the window itself, in ascending original order. Keys are stored after RoPE,
so kept tokens keep their original positions.

Rows whose real length is <= budget keep every token. Prompts are right-padded; token t of
a row sits at position t.

With a sliding window W (Mistral), a window query at position p scores only the keys it
attends, (p - W, p], and tokens no decode query can see again (t <= length - W) are never
selected: the budget goes to tokens inside the window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..cache import KVCache, cache_from_prompt
from ..models.layers import NEG_INF
from ..partitioned import top_k  # lax.top_k that stays local to each KV head's device
from .dense import keep_all

POOLS = ("avg", "max")


def resolve_pool_kernel(kernel_size: int, span: int) -> int:
    """Pooling size actually used: `kernel_size` clamped to the scored span (T - window of
    the static prompt length), then down to an odd number, at least 1. Odd keeps the
    padding symmetric (kernel // 2 each side) so pooled scores stay centred on their token.
    """
    k = min(kernel_size, max(span, 1))
    if k % 2 == 0:
        k -= 1
    return max(k, 1)


def observation_scores(
    k: jax.Array, q_obs: jax.Array, lengths: jax.Array, window: int,
    sliding_window: int | None = None,
) -> jax.Array:
    """Attention mass each prompt token receives from its row's observation window.

    k: [B, K, T, D]; q_obs: [B, H, W, D] (RoPE applied, W >= window), the queries of each
    row's last W tokens (`models.llama.window_queries`), of which the last `window` are
    the observation window; lengths: [B] int32 (>= window for rows that get compressed).
    Only these w queries are scored, so this costs [B, K, G, w, T], never [T, T].
    Returns float32 [B, K, T]: the softmax probabilities of the window queries (positions
    lengths - window .. lengths - 1, causal inside the window) summed over the window
    queries and the G heads of each group, for tokens t < lengths - window; 0 for the
    window itself and the padding. With `sliding_window` W the window queries see only
    keys within W of them, as the model's attention does.
    """
    B, K, T, D = k.shape
    G = q_obs.shape[1] // K
    if q_obs.shape[2] < window:
        raise ValueError(f"stage 1 needs the last {window} queries, got {q_obs.shape[2]}")
    start = lengths - window  # [B]
    q_pos = start[:, None] + jnp.arange(window)  # [B, w]
    q_obs = q_obs[:, :, q_obs.shape[2] - window:]  # [B, H, w, D]
    q_obs = q_obs.reshape(B, K, G, window, D).astype(jnp.float32)  # [B, K, G, w, D]
    logits = jnp.einsum(
        "bkgwd,bktd->bkgwt", q_obs, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    ) / jnp.sqrt(jnp.float32(D))  # [B, K, G, w, T]
    causal = jnp.arange(T)[None, None, :] <= q_pos[:, :, None]  # [B, w, T]
    if sliding_window is not None:
        causal &= jnp.arange(T)[None, None, :] > q_pos[:, :, None] - sliding_window
    causal = causal[:, None, None]  # [B, 1, 1, w, T]
    probs = jax.nn.softmax(jnp.where(causal, logits, NEG_INF), axis=-1)
    probs = jnp.where(causal, probs, 0.0)  # [B, K, G, w, T]
    scores = probs.sum(axis=(2, 3))  # [B, K, T]
    scored = jnp.arange(T)[None, :] < start[:, None]  # [B, T]
    return jnp.where(scored[:, None, :], scores, 0.0)


def pool_scores(scores: jax.Array, kernel_size: int, pool: str) -> jax.Array:
    """1-D pooling along the last axis, stride 1, padding kernel_size // 2 each side.

    scores: [B, K, T] float32, >= 0, already 0 outside each row's scored span, so zero
    padding is exact for both pools: "avg" divides by kernel_size (count_include_pad, as
    SnapKV's avg_pool1d), "max" is unaffected by zeros. Returns [B, K, T].
    """
    if kernel_size == 1:
        return scores
    pad = kernel_size // 2
    dims, strides = (1, 1, kernel_size), (1, 1, 1)
    padding = ((0, 0), (0, 0), (pad, pad))
    if pool == "max":
        return jax.lax.reduce_window(scores, 0.0, jax.lax.max, dims, strides, padding)
    if pool == "avg":
        total = jax.lax.reduce_window(scores, 0.0, jax.lax.add, dims, strides, padding)
        return total / kernel_size
    raise ValueError(f"unknown pool {pool!r}; expected one of {POOLS}")


def select_prompt_tokens(
    k: jax.Array,
    q: jax.Array,
    lengths: jax.Array,
    *,
    budget: int,
    window: int,
    kernel_size: int,
    pool: str,
    sliding_window: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Indices of the prompt tokens stage 1 keeps.

    k: [B, K, T, D], q: [B, H, W, D] the last W >= window queries of each row (see
    `observation_scores`), lengths: [B] int32. Static: budget (prompt tokens
    kept per row, window <= budget < T), window, kernel_size (already resolved), pool.
    Returns (keep [B, K, budget] int32 ascending, keep_length [B] int32 =
    min(lengths, budget)). Rows with lengths <= budget keep 0 .. lengths - 1 (entries from
    keep_length on are unused). With `sliding_window` W, tokens t <= lengths - W (outside
    every later query's window) rank below every token inside it.
    """
    B, K, T, _ = k.shape
    if not window <= budget < T:
        raise ValueError(f"stage 1 needs window ({window}) <= budget ({budget}) < T ({T})")
    start = lengths - window  # [B]
    window_idx = start[:, None] + jnp.arange(window, dtype=jnp.int32)  # [B, w]
    window_idx = jnp.broadcast_to(window_idx[:, None, :], (B, K, window))  # [B, K, w]
    n_select = budget - window
    if n_select:
        scores = observation_scores(k, q, lengths, window, sliding_window)  # [B, K, T]
        pooled = pool_scores(scores, kernel_size, pool)  # [B, K, T]
        scored = jnp.arange(T)[None, :] < start[:, None]  # [B, T]
        pooled = jnp.where(scored[:, None, :], pooled, -jnp.inf)
        if sliding_window is not None:  # never visible again: below every visible token
            stale = jnp.arange(T)[None, :] <= (lengths - sliding_window)[:, None]  # [B, T]
            pooled = jnp.where(stale[:, None, :], -jnp.finfo(jnp.float32).max, pooled)
        # lax.top_k breaks ties (frequent after max pooling) towards the lower index.
        _, top = top_k(pooled, n_select)  # [B, K, budget - w]
        keep = jnp.concatenate([jnp.sort(top, axis=-1), window_idx], axis=-1)  # [B, K, budget]
    else:
        keep = window_idx
    short = (lengths <= budget)[:, None, None]  # [B, 1, 1]
    keep = jnp.where(short, jnp.arange(budget, dtype=jnp.int32), keep).astype(jnp.int32)
    return keep, jnp.minimum(lengths, budget).astype(jnp.int32)


def compress_prompt(
    k: jax.Array,
    v: jax.Array,
    q: jax.Array,
    lengths: jax.Array,
    *,
    budget: int,
    window: int,
    kernel_size: int,
    pool: str,
    capacity: int,
    page_size: int = 0,
    sliding_window: int | None = None,
    channel_major: bool = False,
) -> KVCache:
    """Stage 1 into a fresh cache. k, v [B, K, T, D]; q [B, H, W, D] each row's last
    W >= window queries; lengths [B].

    When the static prompt length T <= budget nothing can be evicted and every token is
    kept. Returns a KVCache of `capacity` slots (page metadata when page_size > 0,
    channel-major [B, K, D, P] when `channel_major`).
    """
    T = k.shape[2]
    if T <= budget:
        keep, keep_length = keep_all(lengths, k.shape[1], T), lengths  # [B, K, T], [B]
    else:
        keep, keep_length = select_prompt_tokens(
            k, q, lengths, budget=budget, window=window, kernel_size=kernel_size, pool=pool,
            sliding_window=sliding_window,
        )
    return cache_from_prompt(k, v, keep, keep_length, capacity, page_size, channel_major)

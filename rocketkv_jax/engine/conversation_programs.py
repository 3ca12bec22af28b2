"""The compiled programs under `conversation.Conversation`, and the pure functions they run.

The full history of B rows is a stacked `KVCache` [Ly, B, K, S, D] whose slot is the
token's position (no page metadata). A turn is prefilled into it chunk by chunk
(`prefill_turn`, each row from its own start); a reply decodes on `decode_cache` (the
history itself, or a `TurnCache` of it and a temporary compressed copy), and `trim_rows`
forgets what decode wrote after a row stopped. The single-turn baseline compresses once
(`first_compression`) and later feeds turns by decode steps (`feed_tokens`).

Programs are built as generate's are (`compile.py`): compiled once per shape and kept by
`program_cache`, traced starts and lengths, states donated, no host callbacks (JAX's
persistent cache keeps them). A reply decodes with the shared `decode.decode_program`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..cache import KVCache, page_bounds
from ..methods.base import round_capacity
from ..methods.multiturn import TurnCache
from ..models.config import ModelConfig
from ..models.llama import (
    PrefillState,
    forward_decode,
    prefill_chunk,
    unembed,  # the final norm and LM head (the model's own, so logits match prefill)
)
from ..models.plan import compress_layers
from .compile import compile_program, hashable, params_dtype, program_cache, unflatten
from .decode import LoopSettings, begin_decode


# --------------------------------------------------------------- pure functions
def empty_history(config: ModelConfig, batch: int, size: int, dtype) -> KVCache:
    """A stacked KVCache [Ly, B, K, size, D] with no token: the full history, slot = position."""
    Ly, K, D = config.num_layers, config.num_kv_heads, config.head_dim
    zeros = jnp.zeros((Ly, batch, K, size, D), dtype)
    return KVCache(k=zeros, v=zeros, pos=jnp.full((Ly, batch, K, size), -1, jnp.int32),
                   length=jnp.zeros((Ly, batch), jnp.int32),
                   page_max=jnp.zeros((Ly, batch, K, 0, D), dtype),
                   page_min=jnp.zeros((Ly, batch, K, 0, D), dtype))


def with_lengths(history: KVCache, lengths: jax.Array) -> KVCache:
    """The full history marked as holding positions 0 .. lengths - 1 of each row."""
    Ly, B, K, S, _ = history.k.shape
    slot = jnp.arange(S, dtype=jnp.int32)
    pos = jnp.where(slot[None, :] < lengths[:, None], slot[None, :], -1)  # [B, S]
    return dataclasses.replace(
        history, pos=jnp.broadcast_to(pos[None, :, None, :], (Ly, B, K, S)),
        length=jnp.broadcast_to(lengths.astype(jnp.int32)[None], (Ly, B)))


def prefill_turn(params, config: ModelConfig, history: KVCache, q_obs, x_last, tokens,
                 start, lengths, *, kernels: str = "auto"):
    """One chunk of a turn through every layer, against each row's cached history.

    history: the full history (stacked KVCache [Ly, B, K, S, D]); q_obs [Ly, B, H, W, D];
    x_last [B, E]; tokens [B, C] int32 at positions start[b] .. start[b] + C - 1 of row b;
    start [B] int32; lengths [B] the rows' lengths once the turn is in. Each row's chunk
    attends causally over its keys < lengths (`prefill_chunk`, one row at a time under
    vmap, so rows may start at different positions). Returns (history, q_obs, x_last).
    """
    B = tokens.shape[0]

    def row(k, v, q, x, tok, s, n):  # k, v [Ly, K, S, D], q [Ly, H, W, D], x [E]
        state = PrefillState(k[:, None], v[:, None], q[:, None], x[None])
        state, _ = prefill_chunk(params, config, state, tok[None], s, n[None],
                                 kernels=kernels)
        return state.k[:, 0], state.v[:, 0], state.q_obs[:, 0], state.x_last[0]

    if B == 1:  # no vmap: the buffer is written with dynamic_update_slice, in place
        state = PrefillState(history.k, history.v, q_obs, x_last)
        state, _ = prefill_chunk(params, config, state, tokens, start[0], lengths,
                                 kernels=kernels)
        k, v, q_obs, x_last = state.k, state.v, state.q_obs, state.x_last
    else:
        k, v, q_obs, x_last = jax.vmap(row, in_axes=(1, 1, 1, 0, 0, 0, 0),
                                       out_axes=(1, 1, 1, 0))(
            history.k, history.v, q_obs, x_last, tokens, start, lengths)
    history = with_lengths(dataclasses.replace(history, k=k, v=v), lengths)
    return history, q_obs, x_last


def decode_cache(mode: str, plan, history, q_obs, lengths, size: int):
    """The cache a turn decodes on. history: the full history (direct, multi_turn) or the
    single-turn method's cache once compressed; size: the static history bucket stage 1
    reads (positions >= lengths are padding). multi_turn: a TurnCache of the full history
    and `plan.compress` of its first `size` positions (the temporary copy)."""
    if mode == "multi_turn":
        k, v = history.k[:, :, :, :size], history.v[:, :, :, :size]
        return TurnCache(history, compress_layers(plan, k, v, q_obs, lengths))
    return history


def first_compression(plan, history: KVCache, q_obs, lengths, size: int):
    """single_turn: `plan.compress` of every layer's first `size` history positions."""
    k, v = history.k[:, :, :, :size], history.v[:, :, :, :size]
    return compress_layers(plan, k, v, q_obs, lengths)


def trim_rows(cache: KVCache, valid: jax.Array, channel_major: bool) -> KVCache:
    """Forget every slot at or past valid [Ly, B] (tokens decode wrote for rows that had
    already stopped) and rebuild the page max/min of what is left. Stacked cache."""
    Ly, B, K, C, D = cache.k.shape
    keep = jnp.arange(C)[None, None, None, :] < valid[:, :, None, None]  # [Ly, B, 1, C]
    pos = jnp.where(keep, cache.pos, -1)
    page_max, page_min = cache.page_max, cache.page_min
    if page_max.size:
        P = page_max.shape[-1] if channel_major else page_max.shape[-2]
        flat = (Ly * B, K, C)
        page_max, page_min = page_bounds(cache.k.reshape(*flat, D), pos.reshape(flat),
                                         C // P, channel_major)
        page_max = page_max.reshape(cache.page_max.shape)
        page_min = page_min.reshape(cache.page_min.shape)
    return KVCache(cache.k, cache.v, pos, valid.astype(jnp.int32), page_max, page_min)


def feed_tokens(params, config: ModelConfig, plan, cache, tokens, start, counts):
    """single_turn, after the first compression: feed a turn one decode step at a time.

    tokens [B, F] int32, row b's first counts[b] real, at positions start[b] + j. Rows past
    their count keep their cache (a select per step). Returns (cache, logits [B, V] f32 of
    each row's last real token).
    """
    B, F = tokens.shape

    def step(j, carry):
        cache, logits = carry
        new_logits, new_cache = forward_decode(params, config, tokens[:, j], start + j,
                                               cache, plan)
        live = j < counts  # [B]
        cache = jax.tree.map(
            lambda new, old: jnp.where(live.reshape((1, B) + (1,) * (new.ndim - 2)), new, old),
            new_cache, cache)
        return cache, jnp.where(live[:, None], new_logits, logits)

    logits = jnp.zeros((B, config.vocab_size), jnp.float32)
    return jax.lax.fori_loop(0, F, step, (cache, logits))


def grown_plan(plan, capacity: int):
    """`plan` with its cache `capacity` raised (compress sizes the cache from it)."""
    page = getattr(plan, "page_size", 1) or 1
    return dataclasses.replace(plan, capacity=round_capacity(capacity, page))


# --------------------------------------------------------------- programs
def _i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


@program_cache(maxsize=16)
def init_program(config: ModelConfig, B: int, S: int, W: int, params_s):
    dtype = params_dtype(params_s)
    H, D, E = config.num_heads, config.head_dim, config.hidden_size
    return compile_program("conversation_init", lambda: (
        empty_history(config, B, S, dtype), jnp.zeros((config.num_layers, B, H, W, D), dtype),
        jnp.zeros((B, E), dtype)), ())


def _history_structs(config, B, S, W, params_s):
    dtype = params_dtype(params_s)
    return jax.eval_shape(lambda: (
        empty_history(config, B, S, dtype),
        jnp.zeros((config.num_layers, B, config.num_heads, W, config.head_dim), dtype),
        jnp.zeros((B, config.hidden_size), dtype)))


@program_cache(maxsize=32)
def chunk_program(config: ModelConfig, B: int, C: int, S: int, W: int, params_s,
                  kernels: str = "auto"):
    """(params, history, q_obs, x_last, tokens [B, C], start [B], lengths [B]) -> the three;
    the prefill attention run by the `kernels` backend."""

    def chunk(params, history, q_obs, x_last, tokens, start, lengths):
        return prefill_turn(params, config, history, q_obs, x_last, tokens, start, lengths,
                            kernels=kernels)

    hist, q, x = _history_structs(config, B, S, W, params_s)
    args = (unflatten(params_s), hist, q, x, _i32(B, C), _i32(B), _i32(B))
    return compile_program("conversation_chunk", chunk, args, donate_argnums=(1, 2, 3))


@program_cache(maxsize=8)
def logits_program(config: ModelConfig, B: int, params_s):
    x = jax.ShapeDtypeStruct((B, config.hidden_size), params_dtype(params_s))
    return compile_program("conversation_logits",
                           lambda p, x: unembed(p, config, x), (unflatten(params_s), x))


def _start_fn(config, mode, plan, size, loop, first):
    def start(params, history, q_obs, logits, lengths, key):
        if first:
            cache = first_compression(plan, history, q_obs, lengths, size)
        else:
            cache = decode_cache(mode, plan, history, q_obs, lengths, size)
        return begin_decode(logits, cache, key, loop)

    return start


@program_cache(maxsize=64)
def start_program(config: ModelConfig, mode: str, plan, size: int, loop: LoopSettings,
                   first: bool, history_s, q_s, params_s):
    """(params, history, q_obs, logits [B, V], lengths [B], key) -> DecodeState at step 1."""
    history, q = unflatten(history_s), unflatten(q_s)
    B = q.shape[1]
    args = (unflatten(params_s), history, q,
            jax.ShapeDtypeStruct((B, config.vocab_size), jnp.float32), _i32(B),
            jax.ShapeDtypeStruct((2,), jnp.uint32))
    fn = _start_fn(config, mode, plan, size, loop, first)
    # the history becomes (part of) the decode cache, except where it is compressed away
    donate = () if first else (1,)
    out = jax.eval_shape(fn, *args)
    compiled, seconds = compile_program("conversation_start", fn, args,
                                        donate_argnums=donate)
    return compiled, seconds, hashable(out)


@program_cache(maxsize=64)
def finish_program(channel_major: bool, cache_s):
    """(decode cache, step [], n_generated [B]) -> the cache that holds the history after
    the turn (the full history of a TurnCache), without the slots written after each row
    stopped."""

    def finish(cache, step, n_generated):
        cache = cache.full if isinstance(cache, TurnCache) else cache
        # every decode step appended a token to every row; row b's first n_generated - 1
        # of them are its reply (the last sampled token is never fed)
        valid = cache.length - (step - 1) + (n_generated - 1)[None]  # [Ly, B]
        return trim_rows(cache, valid, channel_major)

    cache = unflatten(cache_s)
    B = jax.tree.leaves(cache)[0].shape[1]
    return compile_program("conversation_finish", finish, (cache, _i32(), _i32(B)),
                           donate_argnums=(0,))


@program_cache(maxsize=32)
def feed_program(config: ModelConfig, plan, F: int, cache_s, params_s):
    """(params, cache, tokens [B, F], start [B], counts [B]) -> (cache, logits [B, V])."""
    cache = unflatten(cache_s)
    B = jax.tree.leaves(cache)[0].shape[1]

    def feed(params, cache, tokens, start, counts):
        return feed_tokens(params, config, plan, cache, tokens, start, counts)

    return compile_program("conversation_feed", feed,
                           (unflatten(params_s), cache, _i32(B, F), _i32(B), _i32(B)),
                           donate_argnums=(1,))


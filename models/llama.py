"""Functional Llama / Mistral decoder.

The forward is a pure function of (params, config, tokens, positions, cache, plan). The
KV method is passed in as a resolved plan with three pure functions (`compress` once
after prefill, `append` and `attend` at every decode step); the model never branches on
which method it is. Caches are stacked on a leading layer axis. Params come in one of two
layouts, both run in one `lax.fori_loop` over the layers (`loop_layers`): stacked on a
leading layer axis, or one dict per layer (`models.params.unstack_layers`), where each
matmul reads its layer's own array through a switch over the layers (on XLA:CPU, slicing
the stacked weights copies them first). At decode
the stacked cache is the loop carry: each layer writes its new token into it in place and
attends on its own slice, so a step reads the cache once instead of copying every layer in
and out of the loop.

Prefill runs the prompt one chunk at a time through every layer (one chunk of T unless
`chunk` is given), writing each layer's keys and values into a prompt-sized buffer and
attending blockwise over it (`kernels.prefill_attention`), so memory is O(T) and no
[T, T] score matrix exists. The plan's `compress` then runs once per layer over the whole
buffer, with the queries of each row's last tokens that stage-1 methods score with.

Padding convention: prompts are right-padded; token t of a row sits at position t, and
`lengths` [B] says how many tokens of each row are real.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ..kernels.backend import check_backend_name
from ..kernels.prefill_attention import prefill_attention
from .config import ModelConfig
from .layers import (
    LayerWeight,
    as_bits,
    attention_mask,
    bf16_moves_in_f32,
    dense_attention,
    from_bits,
    linear,
    rms_norm,
    swiglu_mlp,
)
from .plan import KVPlan, attend_layer, compress_layers, layer_groups
from .rope import apply_rope, inverse_frequencies

Params = dict[str, Any]


def loop_layers(layers, start: int, stop: int, body, carry):
    """carry = body(i, p, carry) for layers i in [start, stop), p layer i's weights, in one
    `lax.fori_loop` (i traced), so compile time does not grow with depth.

    layers: params["layers"], either stacked (a dict of [L, ...] arrays: p's arrays are
    sliced out of the stacks) or per layer (a tuple of dicts, each its own arrays: p's
    matrices are `LayerWeight`s, which `linear` multiplies in a switch over the layers, and
    its vectors are sliced from small stacks). XLA:CPU copies a weight slice taken at a
    loop index into a fresh buffer before its matmul (benchmarks/weight_slicing.py); the
    per-layer switch reads each layer's own array in place.
    """
    if isinstance(layers, (tuple, list)):
        group = layers[start:stop]
        mats = {n for n, a in group[0].items() if a.ndim >= 2}
        small = {n: jnp.stack([g[n] for g in group]) for n in group[0] if n not in mats}
        arrays = {n: tuple(g[n] for g in group) for n in mats}

        def layer(i):
            j = i - start
            return {**{n: LayerWeight(a, j) for n, a in arrays.items()},
                    **{n: index_layer(a, j) for n, a in small.items()}}
    else:
        def layer(i):
            return jax.tree.map(lambda a: index_layer(a, i), layers)

    return jax.lax.fori_loop(start, stop, lambda i, c: body(i, layer(i), c), carry)


def index_layer(stacked: jax.Array, i) -> jax.Array:
    """stacked[i] at a traced layer index. Where the backend moves bf16 in f32
    (`layers.bf16_moves_in_f32`), a bf16 stack is sliced as its uint16 bits: sliced as
    bf16, the whole stack is converted to a new f32 buffer (hoisted out of the layer loop,
    once per call), sliced, and the slice converted back."""
    return from_bits(as_bits(stacked)[i], stacked.dtype)


def _project_qkv(p, config: ModelConfig, h, positions, inv_freq):
    """h [B, T, E] -> q [B, H, T, D], k, v [B, K, T, D] with RoPE on q and k, in h's dtype
    (projected, normed and rotated in float32)."""
    B, T, _ = h.shape
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    # [B, T, H*D], [B, T, K*D] x2
    q, k, v = linear(h, p["wq"]), linear(h, p["wk"]), linear(h, p["wv"])
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
    return q.astype(h.dtype), k.astype(h.dtype), v.astype(h.dtype)


def _add(x, *ys):
    """The residual x + y1 + ... (left to right) added in float32, kept in x's dtype."""
    out = x.astype(jnp.float32)
    for y in ys:
        out = out + y
    return out.astype(x.dtype)


def _mlp_block(p, config: ModelConfig, x):
    """x [B, T, E]: the residual after attention (`_add(x, linear(attn, wo))`) -> the
    layer's output."""
    if config.o_bias:  # the o_proj bias: every caller passes x right after `attn @ wo`
        x = x + p["bo"]
    h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
    if config.mlp_bias:
        gate = linear(h, p["w_gate"]) + p["b_gate"]  # [B, T, F]
        up = linear(h, p["w_up"]) + p["b_up"]  # [B, T, F]
        down = linear((jax.nn.silu(gate) * up).astype(x.dtype), p["w_down"])
        return _add(x, down, p["b_down"])
    return _add(x, swiglu_mlp(h, p["w_gate"], p["w_up"], p["w_down"]))


def unembed(params: Params, config: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and LM head: x [..., E] -> float32 logits [..., V]."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        return linear(x, params["embed"], w_transposed=True)  # embed [V, E]
    return linear(x, params["lm_head"])  # [E, V]


def window_queries(q: jax.Array, lengths: jax.Array, width: int, q_start=0):
    """The queries of each row's last `width` real tokens that lie in a block of queries.

    q: [B, H, T, D] at positions q_start .. q_start + T - 1; lengths: [B]. Returns
    (q_obs [B, H, width, D], present [B, width] bool): entry j is the query at position
    lengths - width + j (clipped to 0 for rows shorter than `width`), where it is in the
    block (`present`), else zeros.
    """
    B, H, T, D = q.shape
    pos = jnp.maximum(lengths[:, None] - width + jnp.arange(width), 0)  # [B, w]
    local = pos - q_start  # [B, w]
    present = (local >= 0) & (local < T)
    idx = jnp.clip(local, 0, T - 1)[:, None, :, None]  # [B, 1, w, 1]
    q_obs = jnp.take_along_axis(q, idx, axis=2)  # [B, H, w, D]
    return jnp.where(present[:, None, :, None], q_obs, 0), present


def prefill_chunk_size(T: int, chunk: int | None) -> int:
    """The chunk length a prefill of T (bucketed) tokens runs with: `chunk`, or T when
    chunking is off (None) or the prompt fits one chunk."""
    if chunk is None or chunk >= T:
        return T
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"prefill chunk must be a positive int or None, got {chunk!r}")
    return chunk


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillState:
    """What a prefill carries from one chunk to the next.

    k, v: [Ly, B, K, S, D] every layer's keys and values of positions 0 .. S-1, written
      chunk by chunk (RoPE applied to k);
    q_obs: [Ly, B, H, W, D] the queries of each row's last W tokens (`window_queries`),
      filled in by the chunk that holds them;
    x_last: [B, E] the final hidden state of each row's last real token.
    """

    k: jax.Array
    v: jax.Array
    q_obs: jax.Array
    x_last: jax.Array


def init_prefill_state(config: ModelConfig, batch: int, size: int, query_window: int,
                       dtype) -> PrefillState:
    """Zeroed PrefillState for `batch` rows of up to `size` positions, in the params' dtype."""
    Ly, H, K, D = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim
    return PrefillState(
        k=jnp.zeros((Ly, batch, K, size, D), dtype),
        v=jnp.zeros((Ly, batch, K, size, D), dtype),
        q_obs=jnp.zeros((Ly, batch, H, query_window, D), dtype),
        x_last=jnp.zeros((batch, config.hidden_size), dtype),
    )


def _chunk_attention(config: ModelConfig, i, q, k, v, bufs, start, lengths, kernels: str):
    """Layer i of a prefill chunk: write the chunk's keys and values (q, k, v [B, *, C, D],
    at positions start ..) into the prefill buffers `bufs` = (k, v, q_obs) of
    `PrefillState` (k and v as `as_bits`), keep the window queries that fall in the chunk,
    and attend causally over every key written so far. Returns (attn [B, H, C, D], bufs)."""
    k_buf, v_buf, q_obs = bufs
    B, _, C, _ = q.shape
    S, W = k_buf.shape[3], q_obs.shape[3]
    dtype = q_obs.dtype
    at = (i, 0, 0, start, 0)
    k_buf = jax.lax.dynamic_update_slice(k_buf, as_bits(k[None].astype(dtype)), at)
    v_buf = jax.lax.dynamic_update_slice(v_buf, as_bits(v[None].astype(dtype)), at)
    if kernels == "dense":  # the materialised [B, H, C, S] baseline
        positions = jnp.broadcast_to(start + jnp.arange(C, dtype=jnp.int32), (B, C))
        key_pos = jnp.arange(S, dtype=jnp.int32)[None, :]
        key_pos = jnp.where(key_pos < lengths[:, None], key_pos, -1)  # [B, S]
        mask = attention_mask(positions, key_pos, config.sliding_window)[:, None]
        attn = dense_attention(q, from_bits(k_buf[i], dtype), from_bits(v_buf[i], dtype),
                               mask)
    elif k_buf.dtype == dtype:  # layer i's key blocks read from the stack, uncopied
        attn = prefill_attention(q, k_buf, v_buf, lengths, start, layer=i,
                                 sliding_window=config.sliding_window, kernels=kernels)
    else:
        attn = prefill_attention(q, from_bits(k_buf[i], dtype), from_bits(v_buf[i], dtype),
                                 lengths, start, sliding_window=config.sliding_window,
                                 kernels=kernels)
    if W:
        qw, present = window_queries(q, lengths, W, start)  # [B, H, W, D], [B, W]
        q_obs = q_obs.at[i].set(jnp.where(present[:, None, :, None], qw, q_obs[i]))
    return attn, (k_buf, v_buf, q_obs)


def _chunk_bufs(state: PrefillState):
    """The prefill buffers as the layer loop carries them: k and v as their bits where the
    backend moves bf16 in f32 (`as_bits`), since a bf16 buffer would be converted to f32
    and back whole at every layer's write."""
    return as_bits(state.k), as_bits(state.v), state.q_obs


def _chunk_state(state: PrefillState, bufs, x, start, lengths) -> PrefillState:
    """The state after a chunk: its buffers, and x_last [B, E] from the chunk's final
    hidden states x [B, C, E] for the rows whose last real token lies in it."""
    k, v, q_obs = bufs
    dtype = state.k.dtype
    C = x.shape[1]
    last = lengths - 1 - start  # [B]
    here = (last >= 0) & (last < C)
    x_row = jnp.take_along_axis(x, jnp.clip(last, 0, C - 1)[:, None, None], axis=1)[:, 0]
    x_last = jnp.where(here[:, None], x_row, state.x_last)  # [B, E]
    return PrefillState(from_bits(k, dtype), from_bits(v, dtype), q_obs, x_last)


def _check_chunk_kernels(kernels: str) -> None:
    if kernels != "dense":  # the materialised [B, H, C, S] baseline, else a kernel backend
        check_backend_name(kernels, "prefill attention")


def prefill_chunk(
    params: Params,
    config: ModelConfig,
    state: PrefillState,
    tokens: jax.Array,
    start: jax.Array | int,
    lengths: jax.Array,
    *,
    kernels: str = "auto",
) -> tuple[PrefillState, jax.Array]:
    """Run one chunk of prompt tokens through every layer.

    tokens: [B, C] int32 at positions start .. start + C - 1 (start may be traced, so one
    program serves every chunk); lengths: [B] real tokens per row in the whole prompt. Each
    layer writes the chunk's keys and values into `state` and attends causally over every
    key written so far (positions < lengths), blockwise: memory is O(C * S), never
    [S, S]. Returns (state, x [B, C, E] the chunk's final hidden states).
    """
    _check_chunk_kernels(kernels)
    B, C = tokens.shape
    H, D = config.num_heads, config.head_dim
    inv_freq = inverse_frequencies(config)
    lengths = lengths.astype(jnp.int32)
    positions = jnp.broadcast_to(start + jnp.arange(C, dtype=jnp.int32), (B, C))

    def layer(i, p, lc):
        x, bufs = lc
        h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
        q, k, v = _project_qkv(p, config, h, positions, inv_freq)
        attn, bufs = _chunk_attention(config, i, q, k, v, bufs, start, lengths, kernels)
        attn = attn.transpose(0, 2, 1, 3).reshape(B, C, H * D)  # [B, C, H*D]
        x = _add(x, linear(attn, p["wo"]))
        return _mlp_block(p, config, x), bufs

    x = params["embed"][tokens]  # [B, C, E]
    x, bufs = loop_layers(params["layers"], 0, config.num_layers, layer,
                          (x, _chunk_bufs(state)))
    return _chunk_state(state, bufs, x, start, lengths), x


def prefill_finish(params: Params, config: ModelConfig, state: PrefillState,
                   lengths: jax.Array, plan: KVPlan, size: int | None = None):
    """After the last chunk: the logits of each row's last real token [B, V] float32 and
    the plan's cache, `plan.compress` on every layer's first `size` keys and values (all
    of them by default) with the window queries."""
    k, v = state.k, state.v
    if size is not None:
        k, v = k[:, :, :, :size], v[:, :, :, :size]
    cache = compress_layers(plan, k, v, state.q_obs, lengths.astype(jnp.int32))
    return unembed(params, config, state.x_last), cache


def forward_prefill(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    lengths: jax.Array,
    plan: KVPlan,
    *,
    all_logits: bool = True,
    chunk: int | None = None,
    kernels: str = "auto",
) -> tuple[jax.Array, Any]:
    """Run the prompt through the model and build the (compressed) KV cache.

    tokens: [B, T] int32, right-padded; lengths: [B] int32 real tokens per row (>= 1).
    chunk: tokens per prefill chunk (static). The prompt runs through all layers one
      chunk at a time (`prefill_chunk`), each chunk attending to the keys built so far, so
      activations are O(chunk) and attention never holds a [T, T] matrix; None runs one
      chunk of T.
    kernels: the prefill attention's kernel backend (`kernels.backend`: "auto",
      "reference", "interpret", "triton"), or "dense" for the materialised [B, H, T, T]
      softmax (kept as the baseline of benchmarks and tests).
    Returns (logits, cache): logits [B, T, V] float32 when `all_logits`, else the
    logits of each row's last real token [B, V]; cache: the plan's cache pytree with a
    leading layer axis, from `plan.compress` on every layer's prompt keys and values and
    the queries of each row's last `plan.query_window` tokens.
    """
    B, T = tokens.shape
    C = prefill_chunk_size(T, chunk)
    n_chunks = -(-T // C)
    Tp = n_chunks * C
    tokens = jnp.pad(tokens, ((0, 0), (0, Tp - T)))
    state = init_prefill_state(config, B, Tp, getattr(plan, "query_window", 0),
                               params["embed"].dtype)
    x_all = jnp.zeros((B, Tp if all_logits else 0, config.hidden_size), state.k.dtype)

    def step(c, carry):
        state, x_all = carry
        start = c * C
        chunk_tokens = jax.lax.dynamic_slice_in_dim(tokens, start, C, axis=1)  # [B, C]
        state, x = prefill_chunk(params, config, state, chunk_tokens, start, lengths,
                                 kernels=kernels)
        if all_logits:
            x_all = jax.lax.dynamic_update_slice_in_dim(x_all, x, start, axis=1)
        return state, x_all

    state, x_all = jax.lax.fori_loop(0, n_chunks, step, (state, x_all))
    logits, cache = prefill_finish(params, config, state, lengths, plan, T)
    if all_logits:
        logits = unembed(params, config, x_all[:, :T])
    return logits, cache


def _widen_bf16(a: jax.Array) -> jax.Array:
    return a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a


def _decode_attention(config: ModelConfig, plan, layer, q, k, v, stack, positions):
    """One new token per row, q [B, H, D] and k, v [B, K, D] at positions [B]: append it
    to layer `layer` of the stacked cache (plan.append) and attend with plan.attend, which
    is where sparse methods read only their selected tokens. Returns (attn [B, H, D],
    stack)."""
    stack = plan.append(stack, k, v, positions, layer)
    attn = attend_layer(plan, q, stack, layer, positions, config.sliding_window)
    return attn, stack


def _over_groups(params: Params, config: ModelConfig, plan: KVPlan, cache, carry,
                 make_layer):
    """Run the decoder's layers group by group (`layer_groups`), each over its own stacked
    cache with the group's plan: make_layer(group plan, group's first layer) -> body(i,
    p, (carry, stack)) -> (carry, stack). Returns (carry, cache).

    The cache is loop carry (not scan xs/ys): XLA updates it in place, where scanning over
    it copies every layer in and out of the loop at every step
    (tests/models/test_decode_inplace.py checks XLA's bytes). Where bf16 writes run in
    f32 (`bf16_moves_in_f32`), a bf16 cache goes through the layer loop in f32 (exact
    both ways): each layer's one-token write would convert every layer's cache to f32 and
    back; here the step pays two passes in all."""
    for group in layer_groups(plan, config.num_layers):
        stack = group.stack(cache)
        body = make_layer(group.plan, group.start)
        if bf16_moves_in_f32():
            wide = jax.tree.map(_widen_bf16, stack)
            carry, wide = loop_layers(params["layers"], group.start, group.stop, body,
                                      (carry, wide))
            stack = jax.tree.map(lambda w, s: w.astype(s.dtype), wide, stack)
        else:
            carry, stack = loop_layers(params["layers"], group.start, group.stop, body,
                                       (carry, stack))
        cache = group.replace(cache, stack)
    return carry, cache


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
    plan.attend, which is where sparse methods read only their selected tokens. A plan
    with layer groups (skip_layers) runs one layer loop per group, each over its own
    stacked cache with the group's plan.
    """
    B = tokens.shape[0]
    inv_freq = inverse_frequencies(config)
    x = params["embed"][tokens][:, None]  # [B, 1, E]

    def make_layer(sub, first):
        def layer(i, p, carry):
            x, stack = carry
            h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
            q, k, v = _project_qkv(p, config, h, positions[:, None], inv_freq)
            attn, stack = _decode_attention(config, sub, i - first, q[:, :, 0], k[:, :, 0],
                                            v[:, :, 0], stack, positions)  # [B, H, D]
            x = _add(x, linear(attn.reshape(B, 1, -1), p["wo"]))
            return _mlp_block(p, config, x), stack

        return layer

    x, cache = _over_groups(params, config, plan, cache, x, make_layer)
    return unembed(params, config, x[:, 0]), cache


def forward_mixed(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Any,
    plan: KVPlan,
    state: PrefillState,
    chunk: jax.Array,
    start: jax.Array | int,
    lengths: jax.Array,
    *,
    kernels: str = "auto",
) -> tuple[jax.Array, Any, PrefillState]:
    """One decode step of a cache's rows and one prefill chunk of another prompt, in one
    pass over the weights: `forward_decode(params, config, tokens, positions, cache,
    plan)` and `prefill_chunk(params, config, state, chunk, start, lengths)` at once.

    tokens, positions [R]: the decode rows; chunk [1, C] at positions start ..; lengths [1]:
    the prompt's length. Every layer projects and runs its MLP on the R + C token rows
    together, so the weights are read once for both; attention runs apart (the plan's on
    the decode rows, the prefill attention on the chunk). Returns (logits [R, V] float32,
    cache, state).
    """
    _check_chunk_kernels(kernels)
    R = tokens.shape[0]
    B, C = chunk.shape
    if B != 1:
        raise ValueError(f"forward_mixed prefills one prompt, got a chunk of {B} rows")
    H, D = config.num_heads, config.head_dim
    inv_freq = inverse_frequencies(config)
    lengths = lengths.astype(jnp.int32)
    pos = jnp.concatenate([positions.astype(jnp.int32),
                           start + jnp.arange(C, dtype=jnp.int32)])[None]  # [1, R + C]
    x = params["embed"][jnp.concatenate([tokens, chunk[0]])][None]  # [1, R + C, E]

    def make_layer(sub, first):
        def layer(i, p, carry):
            (x, bufs), stack = carry
            h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
            q, k, v = _project_qkv(p, config, h, pos, inv_freq)  # [1, *, R + C, D]
            rows = (a[0, :, :R].swapaxes(0, 1) for a in (q, k, v))  # [R, *, D]
            attn_d, stack = _decode_attention(config, sub, i - first, *rows, stack, positions)
            attn_c, bufs = _chunk_attention(config, i, q[:, :, R:], k[:, :, R:], v[:, :, R:],
                                            bufs, start, lengths, kernels)  # [1, H, C, D]
            attn = jnp.concatenate([attn_d.reshape(R, H * D),
                                    attn_c[0].swapaxes(0, 1).reshape(C, H * D)])
            x = _add(x, linear(attn[None], p["wo"]))
            return (_mlp_block(p, config, x), bufs), stack

        return layer

    (x, bufs), cache = _over_groups(params, config, plan, cache, (x, _chunk_bufs(state)),
                                    make_layer)
    state = _chunk_state(state, bufs, x[:, R:], start, lengths)
    return unembed(params, config, x[0, :R]), cache, state

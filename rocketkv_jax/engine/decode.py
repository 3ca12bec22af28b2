"""Decoding: the state that crosses decode steps, the compiled decode loop, and the one host
loop that drives it (for generate, the shared prefill and conversations alike).

The device side is a `lax.while_loop` of `models.llama.forward_decode` steps with the
cache as the loop carry, until every row stopped, `max_new_tokens` tokens were produced,
or the step the host asked for (`until`, traced, so one program serves any segment). The
host side (`run_decode`) calls it once when nobody watches the tokens, or one step per call
when they are streamed, so no program holds a host callback.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding as shd
from ..models.config import ModelConfig
from ..models.llama import forward_decode
from ..sampling import Sampling, sample
from .compile import compile_program, program_cache, unflatten


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The static settings of a decode loop (hashable: part of a program's identity)."""

    max_new_tokens: int
    sampling: Sampling
    stop_ids: tuple[int, ...]  # a row stops after producing one of these (kept)
    pad_id: int  # fills a row's output after it stopped


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """What crosses decode steps (and decode program calls).

    step: [] int32, tokens produced so far per row (row b's next one goes to out[b, step]);
    tokens: [B] int32, each row's last sampled token, fed to the model at the next step;
    done: [B] bool, the row produced a stop id (or was done before);
    out: [B, N] int32, the tokens produced so far, pad_id after a row stopped;
    n_generated: [B] int32, tokens each row produced, its stop id included;
    cache: the plan's KV cache pytree (leading layer axis);
    key: [2] uint32, the PRNG key data for the next sample.
    """

    step: jax.Array
    tokens: jax.Array
    done: jax.Array
    out: jax.Array
    n_generated: jax.Array
    cache: Any
    key: jax.Array


def begin_decode(logits, cache, key, loop: LoopSettings, mesh=None) -> DecodeState:
    """Sample each row's first token from its prefill logits [B, V]: step 1's state."""
    B = logits.shape[0]
    stop = jnp.asarray(loop.stop_ids or (-1,), jnp.int32)
    key, sub = jax.random.split(key)
    tok = sample(logits, sub, loop.sampling)  # [B]
    out = jnp.full((B, loop.max_new_tokens), loop.pad_id, jnp.int32).at[:, 0].set(tok)
    return DecodeState(step=jnp.int32(1), tokens=tok, done=jnp.isin(tok, stop), out=out,
                       n_generated=jnp.ones((B,), jnp.int32),
                       cache=shd.constrain_cache(cache, mesh), key=key)


def decode_steps(params, state: DecodeState, lengths, until, *, config: ModelConfig, plan,
                 loop: LoopSettings, mesh=None) -> DecodeState:
    """Decode until every row stopped, `loop.max_new_tokens` tokens were produced, or
    `until` (a traced step count, so one program serves any segment length)."""
    stop = jnp.asarray(loop.stop_ids or (-1,), jnp.int32)
    end = jnp.minimum(until, loop.max_new_tokens)

    def cond(s: DecodeState):
        return (s.step < end) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        positions = lengths + s.step - 1  # position of s.tokens, the previous step's token
        logits, cache = forward_decode(params, config, s.tokens, positions, s.cache, plan)
        key, sub = jax.random.split(s.key)
        nxt = jnp.where(s.done, loop.pad_id, sample(logits, sub, loop.sampling))  # [B]
        return DecodeState(
            step=s.step + 1, tokens=nxt, done=s.done | jnp.isin(nxt, stop),
            out=s.out.at[:, s.step].set(nxt),
            n_generated=s.n_generated + (~s.done).astype(jnp.int32),
            cache=shd.constrain_cache(cache, mesh), key=key)

    return jax.lax.while_loop(cond, body, state)


def rows_sharding(mesh, ndim: int = 1):
    """Rows over the mesh's "data" axis; None without a mesh."""
    return None if mesh is None else shd.batch_sharding(mesh, ndim)


def replicated_sharding(mesh):
    """Every device holds the whole array; None without a mesh."""
    return None if mesh is None else shd.replicated(mesh)


def decode_state_shardings(state: DecodeState, mesh) -> DecodeState | None:
    """Rows over "data" (the cache by its rules), the step and the key replicated. The
    host gathers the rows it reads, so no program gathers the [B, N] tokens."""
    if mesh is None:
        return None
    rep, rows = shd.replicated(mesh), shd.batch_sharding(mesh)
    return DecodeState(step=rep, tokens=rows, done=rows, out=shd.batch_sharding(mesh, 2),
                       n_generated=rows, cache=shd.cache_shardings(state.cache, mesh), key=rep)


@program_cache(maxsize=256)  # an eval grid cycles through ~40 plans per batch
def decode_program(config: ModelConfig, plan, loop: LoopSettings, state_s, params_s,
                   mesh=None):
    """(params, DecodeState, lengths [B], until []) -> DecodeState: decode steps.
    state_s: the DecodeState's shape structs as `compile.hashable` (with shardings under a
    mesh); params_s: `compile.params_struct`."""
    state = unflatten(state_s)
    B = state.tokens.shape[0]

    def decode(params, state, lengths, until):
        return decode_steps(params, state, lengths, until, config=config, plan=plan,
                            loop=loop, mesh=mesh)

    args = (unflatten(params_s), state,
            jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rows_sharding(mesh)),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated_sharding(mesh)))
    shardings = None if mesh is None else jax.tree.map(lambda s: s.sharding, state)
    return compile_program("decode", decode, args, out_shardings=shardings,
                           donate_argnums=(1,))


# ------------------------------------------------------------------ the host loop
def host_array(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly row-sharded) array on the host; with several processes,
    gathered from all of them."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@dataclasses.dataclass
class DecodeRun:
    """What `run_decode` returns: the final state (its cache holds every token decode
    fed), the tokens of the first `rows` rows (a final stop id included), when the first
    token was on the host (`time.perf_counter`), and the seconds of the decode steps."""

    state: DecodeState
    tokens: list[list[int]]
    first_token_at: float
    decode_s: float


def run_decode(decode, params, state: DecodeState, lengths, rows: int,
               on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None
               ) -> DecodeRun:
    """Run a compiled `decode_program` from a step-1 state to the end: one step per call
    when tokens are streamed to `on_step(step, tokens [rows], done [rows])`, else in one
    call. `rows`: the real rows (the batch may be padded past them)."""
    N = state.out.shape[1]
    step, done = 1, host_array(state.done)  # waits for the first token
    t_first = time.perf_counter()
    if on_step is not None:  # state.tokens is the column of out the last call wrote
        on_step(0, host_array(state.tokens)[:rows], done[:rows])
    while step < N and not done.all():
        until = step + 1 if on_step is not None else N
        state = decode(params, state, lengths, jnp.int32(until))
        step, done = int(host_array(state.step)), host_array(state.done)
        if on_step is not None:
            on_step(step - 1, host_array(state.tokens)[:rows], done[:rows])
    out, n_gen = host_array(state.out), host_array(state.n_generated)
    decode_s = time.perf_counter() - t_first
    return DecodeRun(state, [out[i, : n_gen[i]].tolist() for i in range(rows)], t_first,
                     decode_s)

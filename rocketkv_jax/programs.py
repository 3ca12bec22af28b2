"""The compiled programs generation runs, and the named state they hand each other.

`generate_ids` drives four programs from the host:

  init:    a zeroed `PrefillState` for the prompt bucket;
  chunk:   one chunk of prompt tokens through every layer (`models.llama.prefill_chunk`),
           the chunk's start a traced scalar, so every chunk of a prompt shares it;
  start:   the plan's compress over the prompt's keys and values, the first token sampled
           from the prefill logits -> `DecodeState`;
  decode:  decode steps in a `lax.while_loop` until every row stopped, `max_new_tokens`,
           or the step the host asked for (`until`), the cache as the loop carry.

The host reports progress between calls (prefill chunks, streamed tokens), so no program
holds a host callback and JAX's persistent compilation cache can keep all of them (JAX
does not cache a program with a callback). Each state is donated to the next call, so XLA
updates the buffers in place; under a mesh every state leaf has a fixed sharding, in and
out, so a program's output feeds its next call without a reshard or a recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import sharding as shd
from .kernels.backend import triton_lowering
from .models.config import ModelConfig
from .models.llama import (
    PrefillState,
    forward_decode,
    init_prefill_state,
    prefill_chunk,
    prefill_finish,
)
from .sampling import Sampling, sample


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


# ------------------------------------------------------------------ compiling
def compile_program(name: str, fn, args, *, out_shardings=None, donate_argnums=()):
    """jit + lower + compile `fn` for abstract `args`: (compiled, seconds). Every program
    of generation is compiled here (the sharding tests wrap it to read each one's HLO)."""
    fn.__name__ = name
    t0 = time.perf_counter()
    with triton_lowering():
        compiled = jax.jit(fn, out_shardings=out_shardings,
                           donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _struct(x, sharding=None):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _structs(tree, shardings):
    """Shape structs of `tree` carrying `shardings` (a matching tree, or None for all)."""
    if shardings is None:
        return jax.tree.map(_struct, tree)
    return jax.tree.map(_struct, tree, shardings)


def _prefill_state_shardings(mesh) -> PrefillState | None:
    if mesh is None:
        return None
    heads = NamedSharding(mesh, P(None, shd.DATA, shd.MODEL, None, None))
    return PrefillState(k=heads, v=heads, q_obs=heads,
                        x_last=NamedSharding(mesh, P(shd.DATA, None)))


def _decode_state_shardings(state: DecodeState, mesh) -> DecodeState | None:
    """Rows over "data" (the cache by its rules), the step and the key replicated. The
    host gathers the rows it reads, so no program gathers the [B, N] tokens."""
    if mesh is None:
        return None
    rep, rows = shd.replicated(mesh), shd.batch_sharding(mesh)
    return DecodeState(step=rep, tokens=rows, done=rows, out=shd.batch_sharding(mesh, 2),
                       n_generated=rows, cache=shd.cache_shardings(state.cache, mesh), key=rep)


def params_struct(params):
    """A hashable stand-in for the params' shapes, dtypes and shardings."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple(_struct(x, getattr(x, "sharding", None)) for x in leaves)


def _params_abstract(struct):
    return jax.tree.unflatten(struct[0], struct[1])


def _batch(mesh, ndim=1):
    return None if mesh is None else shd.batch_sharding(mesh, ndim)


def _rep(mesh):
    return None if mesh is None else shd.replicated(mesh)


def _dtype(params_s):
    return _params_abstract(params_s)["embed"].dtype


@functools.lru_cache(maxsize=32)
def init_program(config: ModelConfig, B: int, S: int, W: int, params_s, mesh=None):
    """() -> a zeroed PrefillState of B rows, S positions, W window queries."""
    dtype = _dtype(params_s)
    return compile_program("init_prefill", lambda: init_prefill_state(config, B, S, W, dtype),
                           (), out_shardings=_prefill_state_shardings(mesh))


def _prefill_state_struct(config, B, S, W, params_s, mesh):
    dtype = _dtype(params_s)
    state = jax.eval_shape(lambda: init_prefill_state(config, B, S, W, dtype))
    return _structs(state, _prefill_state_shardings(mesh))


@functools.lru_cache(maxsize=32)
def chunk_program(config: ModelConfig, B: int, C: int, S: int, W: int, params_s, mesh=None,
                  kernels: str = "auto"):
    """(params, state, tokens [B, C], start [], lengths [B]) -> state: one prefill chunk,
    its attention run by the `kernels` backend."""

    def chunk(params, state, tokens, start, lengths):
        return prefill_chunk(params, config, state, tokens, start, lengths,
                             kernels=kernels)[0]

    args = (_params_abstract(params_s), _prefill_state_struct(config, B, S, W, params_s, mesh),
            jax.ShapeDtypeStruct((B, C), jnp.int32, sharding=_batch(mesh, 2)),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=_rep(mesh)),
            jax.ShapeDtypeStruct((B,), jnp.int32, sharding=_batch(mesh)))
    return compile_program("prefill_chunk", chunk, args,
                           out_shardings=_prefill_state_shardings(mesh), donate_argnums=(1,))


def _start_fn(config, plan, T, loop, mesh):
    def start(params, state, lengths, key):
        logits, cache = prefill_finish(params, config, state, lengths, plan, T)
        return begin_decode(logits, cache, key, loop, mesh)

    return start


@functools.lru_cache(maxsize=32)  # start_program and for_request ask for the same one
def decode_state_struct(config, plan, B, S, T, W, loop, params_s, mesh=None) -> DecodeState:
    """Shape structs (with shardings under a mesh) of the DecodeState `start` returns."""
    state = jax.eval_shape(
        _start_fn(config, plan, T, loop, None), _params_abstract(params_s),
        _prefill_state_struct(config, B, S, W, params_s, None),
        jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32))
    return _structs(state, _decode_state_shardings(state, mesh))


@functools.lru_cache(maxsize=32)
def start_program(config: ModelConfig, plan, B: int, S: int, T: int, W: int,
                  loop: LoopSettings, params_s, mesh=None):
    """(params, prefill state, lengths [B], key [2]) -> DecodeState at step 1: the plan's
    compress over the first T positions, and each row's first token."""
    out = decode_state_struct(config, plan, B, S, T, W, loop, params_s, mesh)
    args = (_params_abstract(params_s), _prefill_state_struct(config, B, S, W, params_s, mesh),
            jax.ShapeDtypeStruct((B,), jnp.int32, sharding=_batch(mesh)),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=_rep(mesh)))
    shardings = None if mesh is None else jax.tree.map(lambda s: s.sharding, out)
    # the prefill state is not donated: no output has its shape, so XLA could not reuse it
    return compile_program("start_decode", _start_fn(config, plan, T, loop, mesh), args,
                           out_shardings=shardings)


@functools.lru_cache(maxsize=256)  # an eval grid cycles through ~40 plans per batch
def decode_program(config: ModelConfig, plan, loop: LoopSettings, state_s, params_s,
                   mesh=None):
    """(params, DecodeState, lengths [B], until []) -> DecodeState: decode steps.
    state_s: `decode_state_struct(...)` flattened as (treedef, leaves) to be hashable."""
    state = jax.tree.unflatten(*state_s)
    B = state.tokens.shape[0]

    def decode(params, state, lengths, until):
        return decode_steps(params, state, lengths, until, config=config, plan=plan,
                            loop=loop, mesh=mesh)

    args = (_params_abstract(params_s), state,
            jax.ShapeDtypeStruct((B,), jnp.int32, sharding=_batch(mesh)),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=_rep(mesh)))
    shardings = None if mesh is None else jax.tree.map(lambda s: s.sharding, state)
    return compile_program("decode", decode, args, out_shardings=shardings,
                           donate_argnums=(1,))


@dataclasses.dataclass(frozen=True)
class Programs:
    """The compiled programs of one generate request shape, and their compile seconds
    (what the lru caches returned: the first compile's time, or ~0 from JAX's cache)."""

    init: Any
    chunk: Any
    start: Any
    decode: Any
    compile_s: float
    cache_bytes: int  # the KV cache the decode state holds (all layers)


def nbytes(tree) -> int:
    """Bytes of a pytree of arrays or shape structs."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def for_request(config: ModelConfig, plan, B: int, T: int, C: int, loop: LoopSettings,
                params_s, mesh=None, kernels: str = "auto") -> Programs:
    """Programs for B rows of a T-token prompt bucket prefilled in chunks of C tokens
    (T padded up to whole chunks) with the `kernels` backend's attention, decoded with
    `plan` and `loop`."""
    S, W = -(-T // C) * C, getattr(plan, "query_window", 0)
    init, t_init = init_program(config, B, S, W, params_s, mesh)
    chunk, t_chunk = chunk_program(config, B, C, S, W, params_s, mesh, kernels)
    start, t_start = start_program(config, plan, B, S, T, W, loop, params_s, mesh)
    state_s = decode_state_struct(config, plan, B, S, T, W, loop, params_s, mesh)
    decode, t_decode = decode_program(config, plan, loop, hashable(state_s), params_s, mesh)
    return Programs(init, chunk, start, decode, t_init + t_chunk + t_start + t_decode,
                    nbytes(state_s.cache))


def hashable(tree) -> tuple:
    """(treedef, leaves) of a pytree of shape structs: an lru_cache key."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


# Modules whose lru caches hold compiled programs: AOT-compiled executables, which
# jax.clear_caches() does not reach.
_PROGRAM_MODULES = (__name__, "rocketkv_jax.conversation_ops", "rocketkv_jax.eval.shared_prefill")


def clear_caches() -> None:
    """Forget every compiled program this package holds: generate's, the conversation's and
    the shared prefill's (tests that swap a function the programs call, or that must release
    the executables' memory)."""
    for name in _PROGRAM_MODULES:
        module = sys.modules.get(name)
        for value in vars(module).values() if module else ():
            if callable(getattr(value, "cache_clear", None)) and hasattr(value, "cache_info"):
                value.cache_clear()

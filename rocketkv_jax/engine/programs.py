"""The compiled programs of one generate request, and the prefill state they hand on.

`generate_ids` drives four programs from the host:

  init:    a zeroed `PrefillState` for the prompt bucket;
  chunk:   one chunk of prompt tokens through every layer (`models.llama.prefill_chunk`),
           the chunk's start a traced scalar, so every chunk of a prompt shares it;
  start:   the plan's compress over the prompt's keys and values, the first token sampled
           from the prefill logits -> `DecodeState`;
  decode:  decode steps (`decode.decode_program`), the cache as the loop carry.

The host reports progress between calls (prefill chunks, streamed tokens), so no program
holds a host callback and JAX's persistent compilation cache can keep all of them. Each
state is donated to the next call, so XLA updates the buffers in place; under a mesh every
state leaf has a fixed sharding, in and out, so a program's output feeds its next call
without a reshard or a recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import sharding as shd
from ..cache import tree_bytes
from ..models.config import ModelConfig
from ..models.llama import PrefillState, init_prefill_state, prefill_chunk, prefill_finish
from . import decode
from .compile import compile_program, hashable, params_dtype, program_cache, structs, unflatten
from .decode import (
    DecodeState,
    LoopSettings,
    begin_decode,
    decode_state_shardings,
    replicated_sharding,
    rows_sharding,
)


def row_axis(mesh, B: int) -> str | None:
    """The mesh axis B rows are split over: "data" when it divides B (generate pads its
    batch so it always does), else none: one row (what the serving engine prefills) is
    computed whole by every data group, its heads still split over "model"."""
    return shd.DATA if B % mesh.shape[shd.DATA] == 0 else None


def prefill_state_shardings(mesh, B: int) -> PrefillState | None:
    if mesh is None:
        return None
    rows = row_axis(mesh, B)
    heads = NamedSharding(mesh, P(None, rows, shd.MODEL, None, None))
    return PrefillState(k=heads, v=heads, q_obs=heads,
                        x_last=NamedSharding(mesh, P(rows, None)))


def _rows(mesh, B: int, ndim: int = 1):
    return None if mesh is None else NamedSharding(mesh, P(row_axis(mesh, B),
                                                           *(None,) * (ndim - 1)))


@program_cache(maxsize=32)
def init_program(config: ModelConfig, B: int, S: int, W: int, params_s, mesh=None):
    """() -> a zeroed PrefillState of B rows, S positions, W window queries."""
    dtype = params_dtype(params_s)
    return compile_program("init_prefill", lambda: init_prefill_state(config, B, S, W, dtype),
                           (), out_shardings=prefill_state_shardings(mesh, B))


def prefill_state_struct(config, B, S, W, params_s, mesh):
    dtype = params_dtype(params_s)
    state = jax.eval_shape(lambda: init_prefill_state(config, B, S, W, dtype))
    return structs(state, prefill_state_shardings(mesh, B))


@program_cache(maxsize=32)
def chunk_program(config: ModelConfig, B: int, C: int, S: int, W: int, params_s, mesh=None,
                  kernels: str = "auto"):
    """(params, state, tokens [B, C], start [], lengths [B]) -> state: one prefill chunk,
    its attention run by the `kernels` backend."""

    def chunk(params, state, tokens, start, lengths):
        return prefill_chunk(params, config, state, tokens, start, lengths,
                             kernels=kernels)[0]

    args = (unflatten(params_s), prefill_state_struct(config, B, S, W, params_s, mesh),
            jax.ShapeDtypeStruct((B, C), jnp.int32, sharding=_rows(mesh, B, 2)),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated_sharding(mesh)),
            jax.ShapeDtypeStruct((B,), jnp.int32, sharding=_rows(mesh, B)))
    return compile_program("prefill_chunk", chunk, args,
                           out_shardings=prefill_state_shardings(mesh, B), donate_argnums=(1,))


def _start_fn(config, plan, T, loop, mesh):
    def start(params, state, lengths, key):
        logits, cache = prefill_finish(params, config, state, lengths, plan, T)
        return begin_decode(logits, cache, key, loop, mesh)

    return start


@program_cache(maxsize=32)  # start_program and for_request ask for the same one
def decode_state_struct(config, plan, B, S, T, W, loop, params_s, mesh=None) -> DecodeState:
    """Shape structs (with shardings under a mesh) of the DecodeState `start` returns."""
    state = jax.eval_shape(
        _start_fn(config, plan, T, loop, None), unflatten(params_s),
        prefill_state_struct(config, B, S, W, params_s, None),
        jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32))
    return structs(state, decode_state_shardings(state, mesh))


@program_cache(maxsize=32)
def start_program(config: ModelConfig, plan, B: int, S: int, T: int, W: int,
                  loop: LoopSettings, params_s, mesh=None):
    """(params, prefill state, lengths [B], key [2]) -> DecodeState at step 1: the plan's
    compress over the first T positions, and each row's first token."""
    out = decode_state_struct(config, plan, B, S, T, W, loop, params_s, mesh)
    args = (unflatten(params_s), prefill_state_struct(config, B, S, W, params_s, mesh),
            jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rows_sharding(mesh)),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated_sharding(mesh)))
    shardings = None if mesh is None else jax.tree.map(lambda s: s.sharding, out)
    # the prefill state is not donated: no output has its shape, so XLA could not reuse it
    return compile_program("start_decode", _start_fn(config, plan, T, loop, mesh), args,
                           out_shardings=shardings)


@dataclasses.dataclass(frozen=True)
class Programs:
    """The compiled programs of one generate request shape, and their compile seconds
    (what the program caches returned: the first compile's time, or ~0 from JAX's cache)."""

    init: Any
    chunk: Any
    start: Any
    decode: Any
    compile_s: float
    cache_bytes: int  # the KV cache the decode state holds (all layers)


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
    run, t_decode = decode.decode_program(config, plan, loop, hashable(state_s), params_s,
                                          mesh)
    return Programs(init, chunk, start, run, t_init + t_chunk + t_start + t_decode,
                    tree_bytes(state_s.cache))

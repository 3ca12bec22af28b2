"""The compiled programs of the serving engine (`scheduler.Engine`).

A request is prefilled alone (one row) with generate's own programs (`programs.init_program`,
`programs.chunk_program`: chunk by chunk at a traced start), then:

  finish:  the plan's compress over the prompt's keys and values and the first token,
           sampled with the request's own settings (traced, per row) -> a one-row cache;
  insert:  that cache written into one row (a traced slot) of its pool's cache;
  step:    one decode step of every row of a pool, each row at its own position with its
           own sampling settings and PRNG stream;
  grow:    a pool's cache with more rows (the old ones kept);
  seed:    a fresh prefill state whose first positions are a cached prefix's keys/values.

Every shape is fixed by (plan, pool rows, prompt bucket), and settings that differ per
request (temperature, top-k, top-p, seed, position) are data, so a server compiles a
bounded set of programs and then never again (`Engine.stats()["programs"]`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import sharding as shd
from ..models.config import ModelConfig
from ..models.llama import PrefillState, forward_decode, forward_mixed, prefill_finish
from .compile import compile_program, hashable_structs, program_cache, unflatten
from .programs import prefill_state_shardings, prefill_state_struct


def _spec(mesh, *axes):
    return None if mesh is None else NamedSharding(mesh, P(*axes))


def _struct(shape, dtype, mesh, *axes):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=_spec(mesh, *axes))


def one_row_shardings(cache_s, mesh):
    """A one-row cache: whole on every data group, heads over "model"."""
    return None if mesh is None else shd.cache_shardings(unflatten(cache_s), mesh, False)


def pool_shardings(cache_s, mesh):
    """A pool's cache: rows over "data", heads over "model"."""
    return None if mesh is None else shd.cache_shardings(unflatten(cache_s), mesh)


def _with(tree_s, shardings):
    """The shape structs of `tree_s` (a `hashable` key) carrying `shardings`."""
    tree = unflatten(tree_s)
    if shardings is None:
        return tree
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        tree, shardings)


def sample_rows(logits, keys, temperature, top_k, top_p):
    """One token per row, each row with its own settings (all traced).

    logits [B, V] float32; keys [B, 2] uint32 (one PRNG key per row); temperature [B]
    (0: greedy, the argmax); top_k [B] int32 (0: no limit); top_p [B] (1: no limit).
    The truncation rules are `sampling.sample`'s: keep the top_k largest logits, then the
    smallest prefix of the sorted distribution whose mass reaches top_p.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        V = logits.shape[-1]
        t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
        scaled = logits / t
        desc = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [B, 1]
        desc = jnp.where(jnp.arange(V)[None, :] < k[:, None], desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p[:, None], desc, jnp.inf), axis=-1)
        cut = jnp.maximum(kth[:, 0], cutoff)[:, None]
        masked = jnp.where(scaled < cut, -jnp.inf, scaled)
        draw = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked)
        return jnp.where(temperature > 0, draw.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)


def step_keys(seeds, steps):
    """Row b's PRNG key for its token number steps[b]: its request's key [2] with the
    step folded in, so a request draws the same tokens in any slot and any company."""
    return jax.vmap(lambda s, i: jax.random.key_data(
        jax.random.fold_in(jax.random.wrap_key_data(s), i)))(seeds, steps)


@program_cache(maxsize=64)
def finish_program(config: ModelConfig, plan, S: int, T: int, W: int, params_s, one_s,
                   mesh=None):
    """(params, prefill state (1 row), lengths [1], key [2], temperature [], top_k [],
    top_p []) -> (first token [1], one-row cache): compress the first T positions.
    one_s: the one-row cache's shape structs (`hashable`), for its shardings."""

    def finish(params, state, lengths, key, temperature, top_k, top_p):
        logits, cache = prefill_finish(params, config, state, lengths, plan, T)
        tok = sample_rows(logits, step_keys(key[None], jnp.zeros((1,), jnp.int32)),
                          temperature[None], top_k[None], top_p[None])
        return tok, cache

    f32, i32 = jnp.float32, jnp.int32
    args = (unflatten(params_s), prefill_state_struct(config, 1, S, W, params_s, mesh),
            _struct((1,), i32, mesh), _struct((2,), jnp.uint32, mesh),
            _struct((), f32, mesh), _struct((), i32, mesh), _struct((), f32, mesh))
    out = None if mesh is None else (_spec(mesh), one_row_shardings(one_s, mesh))
    return compile_program("serve_finish", finish, args, out_shardings=out)


def with_rows(tree_s: tuple, rows: int) -> tuple:
    """A cache's shape structs (a `hashable` key; layer axis first, rows second in every
    leaf) with `rows` rows."""
    treedef, leaves = tree_s
    return treedef, tuple(jax.ShapeDtypeStruct((x.shape[0], rows, *x.shape[2:]), x.dtype)
                          for x in leaves)


def cache_struct(config: ModelConfig, plan, S: int, T: int, W: int, params_s, rows: int):
    """Shape structs of a pool's cache of `rows` rows for `plan` (layer axis first, rows
    second, in every leaf)."""
    one = jax.eval_shape(
        lambda p, s, n: prefill_finish(p, config, s, n, plan, T)[1], unflatten(params_s),
        prefill_state_struct(config, 1, S, W, params_s, None),
        jax.ShapeDtypeStruct((1,), jnp.int32))
    return unflatten(with_rows(hashable_structs(one), rows))


@program_cache(maxsize=64)
def insert_program(cache_s: tuple, one_s: tuple, mesh=None):
    """(pool cache, one-row cache, slot []) -> pool cache with row `slot` replaced."""

    def insert(pool, one, slot):
        return jax.tree.map(lambda p, o: jax.lax.dynamic_update_slice_in_dim(
            p, o.astype(p.dtype), slot, axis=1), pool, one)

    pool = pool_shardings(cache_s, mesh)
    args = (_with(cache_s, pool), _with(one_s, one_row_shardings(one_s, mesh)),
            _struct((), jnp.int32, mesh))
    return compile_program("serve_insert", insert, args, out_shardings=pool,
                           donate_argnums=(0,))


@program_cache(maxsize=64)
def grow_program(cache_s: tuple, rows: int, mesh=None):
    """(pool cache) -> the same cache with `rows` rows, the new ones empty (zeros, the
    state of an unused row: nothing of it is ever read before `insert` fills it)."""

    def grow(pool):
        return jax.tree.map(lambda x: jnp.concatenate(
            [x, jnp.zeros((x.shape[0], rows - x.shape[1], *x.shape[2:]), x.dtype)], 1), pool)

    return compile_program("serve_grow", grow,
                           (_with(cache_s, pool_shardings(cache_s, mesh)),),
                           out_shardings=pool_shardings(with_rows(cache_s, rows), mesh))


@program_cache(maxsize=64)
def empty_pool_program(cache_s: tuple, mesh=None):
    """() -> a pool cache of zeros, laid out on the mesh."""
    return compile_program("serve_empty_pool", lambda: jax.tree.map(
        lambda x: jnp.zeros(x.shape, x.dtype), unflatten(cache_s)), (),
        out_shardings=pool_shardings(cache_s, mesh))


@program_cache(maxsize=64)
def step_program(config: ModelConfig, plan, cache_s: tuple, params_s, mesh=None):
    """(params, cache, tokens [R], positions [R], seeds [R, 2], steps [R], temperature [R],
    top_k [R], top_p [R]) -> (next tokens [R], cache): one decode step of a pool's R rows
    (rows over the mesh's "data" axis). Rows nobody uses run too (their results are
    dropped; `insert` resets a row)."""
    pool = pool_shardings(cache_s, mesh)
    cache = _with(cache_s, pool)
    R = jax.tree.leaves(cache)[0].shape[1]

    def step(params, cache, tokens, positions, seeds, steps, temperature, top_k, top_p):
        logits, cache = forward_decode(params, config, tokens, positions, cache, plan)
        nxt = sample_rows(logits, step_keys(seeds, steps), temperature, top_k, top_p)
        return nxt, shd.constrain_cache(cache, mesh)

    f32, i32, u32 = jnp.float32, jnp.int32, jnp.uint32
    data = None if mesh is None else shd.DATA
    args = (unflatten(params_s), cache, _struct((R,), i32, mesh, data),
            _struct((R,), i32, mesh, data), _struct((R, 2), u32, mesh, data),
            _struct((R,), i32, mesh, data), _struct((R,), f32, mesh, data),
            _struct((R,), i32, mesh, data), _struct((R,), f32, mesh, data))
    out = None if mesh is None else (_spec(mesh, data), pool)
    return compile_program("serve_step", step, args, out_shardings=out, donate_argnums=(1,))


@program_cache(maxsize=64)
def mixed_program(config: ModelConfig, plan, cache_s: tuple, S: int, W: int, C: int, params_s,
                  kernels: str = "auto"):
    """(params, cache, tokens [R], positions [R], seeds [R, 2], steps [R], temperature [R],
    top_k [R], top_p [R], state, chunk [1, C], start [], lengths [1]) -> (next tokens [R],
    cache, state): `step_program`'s decode step and `chunk_program`'s prefill chunk (a
    one-row state of S positions, W window queries) as one program, `forward_mixed`, so
    the weights are read once for both. One device (no mesh)."""
    cache = unflatten(cache_s)
    R = jax.tree.leaves(cache)[0].shape[1]

    def mixed(params, cache, tokens, positions, seeds, steps, temperature, top_k, top_p,
              state, chunk, start, lengths):
        logits, cache, state = forward_mixed(params, config, tokens, positions, cache, plan,
                                             state, chunk, start, lengths, kernels=kernels)
        nxt = sample_rows(logits, step_keys(seeds, steps), temperature, top_k, top_p)
        return nxt, cache, state

    f32, i32, u32 = jnp.float32, jnp.int32, jnp.uint32
    rows = (jax.ShapeDtypeStruct((R,), i32), jax.ShapeDtypeStruct((R,), i32),
            jax.ShapeDtypeStruct((R, 2), u32), jax.ShapeDtypeStruct((R,), i32),
            jax.ShapeDtypeStruct((R,), f32), jax.ShapeDtypeStruct((R,), i32),
            jax.ShapeDtypeStruct((R,), f32))
    args = (unflatten(params_s), cache, *rows,
            prefill_state_struct(config, 1, S, W, params_s, None),
            jax.ShapeDtypeStruct((1, C), i32), jax.ShapeDtypeStruct((), i32),
            jax.ShapeDtypeStruct((1,), i32))
    return compile_program("serve_mixed", mixed, args, donate_argnums=(1, 9))


@program_cache(maxsize=64)
def seed_program(config: ModelConfig, S_from: int, S: int, W: int, params_s, mesh=None):
    """(prefix k [Ly, 1, K, S_from, D], prefix v) -> a one-row prefill state of S positions
    whose first min(S_from, S) positions hold the prefix's keys and values (the chunks
    from the reuse point on overwrite the rest)."""
    n = min(S_from, S)

    def seed(k, v):
        dtype = k.dtype
        Ly, _, K, _, D = k.shape
        kk = jnp.zeros((Ly, 1, K, S, D), dtype).at[:, :, :, :n].set(k[:, :, :, :n])
        vv = jnp.zeros((Ly, 1, K, S, D), dtype).at[:, :, :, :n].set(v[:, :, :, :n])
        return PrefillState(k=kk, v=vv,
                            q_obs=jnp.zeros((Ly, 1, config.num_heads, W, D), dtype),
                            x_last=jnp.zeros((1, config.hidden_size), dtype))

    prefix = prefill_state_struct(config, 1, S_from, W, params_s, mesh)
    return compile_program("serve_seed", seed, (prefix.k, prefix.v),
                           out_shardings=prefill_state_shardings(mesh, 1))

"""Batched generation as one `jax.jit` program: prefill, compress, then a
`lax.while_loop` of decode steps over a statically sized KV cache.

The cache is created and consumed inside the program, so XLA updates it in place in the
loop; nothing of it crosses the host boundary. One program is compiled per (config,
plan, batch bucket, prompt-length bucket, max_new_tokens, sampling, stop ids); prompt
lengths are padded up to buckets so a new prompt length rarely means a new compile.

Tokens are streamed to the host with an ordered `io_callback` at every step; the same
callback timestamps steps, which is how prefill time and decode speed are measured.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from . import sharding as shd
from .models.config import ModelConfig
from .models.llama import forward_decode, forward_prefill
from .sampling import Sampling, sample

GREEDY = Sampling()


class GenerateError(ValueError):
    """Bad input to generate: empty or over-long prompts, a budget past the context."""


def length_bucket(n: int, limit: int | None = None) -> int:
    """Smallest bucket >= n among 16, 24, 32, 48, ... (powers of two and 1.5x them).

    `limit` caps the bucket (never below n) so a prompt near the model's context does
    not pad past it.
    """
    b = 16
    while b < n:
        b = b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3
    return max(n, min(b, limit)) if limit else b


def batch_bucket(n: int) -> int:
    """Batch sizes are padded to powers of two."""
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------- host streaming
# The callback runs on an XLA runtime thread, so the active sink is a process global;
# a lock keeps two concurrent generate calls from interleaving their streams.
_sink = types.SimpleNamespace(fn=None)
_sink_lock = threading.Lock()


def _emit(step, tokens, done):
    """Host side of the per-step io_callback: forwards to the active generate call."""
    fn = _sink.fn
    if fn is not None:
        fn(int(step), np.asarray(tokens), np.asarray(done))


def _stream(step, tokens, done, mesh=None):
    tokens, done = shd.replicate((tokens, done), mesh)  # the host reads whole rows
    io_callback(_emit, None, step, tokens, done, ordered=True)


# ------------------------------------------------------------------- the program
def _generate_program(
    params, tokens, lengths, key, *, config, plan, max_new_tokens, sampling, stop_ids, pad_id,
    mesh=None,
):
    """tokens [B, T] int32 right-padded, lengths [B] -> (out [B, N] int32, n_generated [B]).

    Row b's output stops after its first stop id (included) and is padded with pad_id.
    """
    B = tokens.shape[0]
    N = max_new_tokens
    stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    logits, cache = forward_prefill(params, config, tokens, lengths, plan, all_logits=False)
    cache = shd.constrain_cache(cache, mesh)  # B over "data", KV heads over "model"
    key, sub = jax.random.split(key)
    tok = sample(logits, sub, sampling)  # [B]
    out = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok)  # [B, N]
    done = jnp.isin(tok, stop)  # [B]
    _stream(0, tok, done, mesh)

    def cond(state):
        step, _, done, *_ = state
        return (step < N) & ~jnp.all(done)

    def body(state):
        step, tok, done, out, n_gen, cache, key = state
        positions = lengths + step - 1  # position of `tok`, the previous step's token
        logits, cache = forward_decode(params, config, tok, positions, cache, plan)
        cache = shd.constrain_cache(cache, mesh)
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, pad_id, sample(logits, sub, sampling))  # [B]
        out = out.at[:, step].set(nxt)
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, stop)
        _stream(step, nxt, done, mesh)
        return step + 1, nxt, done, out, n_gen, cache, key

    state = (jnp.int32(1), tok, done, out, jnp.ones((B,), jnp.int32), cache, key)
    _, _, _, out, n_gen, _, _ = jax.lax.while_loop(cond, body, state)
    return out, n_gen


@dataclasses.dataclass
class GenerateStats:
    prompt_tokens: int
    generated_tokens: int
    compile_s: float
    prefill_s: float
    decode_s: float
    kv_cache_bytes: int
    batch: int
    prompt_bucket: int

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = self.generated_tokens - self.batch  # the first token comes from prefill
        return decoded / self.decode_s if self.decode_s > 0 and decoded > 0 else 0.0

    def summary(self) -> str:
        return (
            f"[stats] prompt tokens: {self.prompt_tokens} | generated tokens: "
            f"{self.generated_tokens} | prefill: {self.prefill_s:.3f} s | decode: "
            f"{self.decode_tokens_per_s:.1f} tok/s | compile: {self.compile_s:.1f} s | "
            f"KV cache: {_fmt_bytes(self.kv_cache_bytes)}"
        )


@dataclasses.dataclass
class GenerateOutput:
    tokens: list[list[int]]  # generated ids per prompt, including a final stop id if hit
    stats: GenerateStats


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


@functools.lru_cache(maxsize=32)
def _compiled(config, plan, B, T, N, sampling, stop_ids, pad_id, params_struct, mesh=None):
    fn = functools.partial(
        _generate_program, config=config, plan=plan, max_new_tokens=N, sampling=sampling,
        stop_ids=stop_ids, pad_id=pad_id, mesh=mesh,
    )
    params_abstract = jax.tree.unflatten(params_struct[0], params_struct[1])
    tok_s, len_s, key_s = (None,) * 3 if mesh is None else (
        shd.batch_sharding(mesh, 2), shd.batch_sharding(mesh), shd.replicated(mesh))
    args = (
        params_abstract,
        jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=tok_s),
        jax.ShapeDtypeStruct((B,), jnp.int32, sharding=len_s),
        jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=key_s),
    )
    # outputs replicated, so every process (multi-host) can read them
    out_shardings = None if mesh is None else shd.replicated(mesh)
    t0 = time.perf_counter()
    compiled = jax.jit(fn, out_shardings=out_shardings).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _params_struct(params):
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(
        x, "sharding", None)) for x in leaves)


def kv_cache_bytes(params, config: ModelConfig, plan, B: int, T: int) -> int:
    """Bytes of the KV cache pytree the program holds (all layers), from shapes."""
    _, cache = jax.eval_shape(
        lambda p, t, n: forward_prefill(p, config, t, n, plan, all_logits=False),
        params, jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32),
    )
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def check_request(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """Raise GenerateError for requests the model cannot serve (before any compile)."""
    if not prompts:
        raise GenerateError("no prompts given")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ctx = config.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty")
        if len(p) > ctx:
            raise GenerateError(
                f"prompt {i} has {len(p)} tokens, longer than the model's context of {ctx}"
            )
        if len(p) + max_new_tokens > ctx:
            raise GenerateError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                f"would reach {len(p) + max_new_tokens} > the model's context of {ctx}. "
                f"Lower --max-new-tokens to at most {ctx - len(p)}."
            )


def generate_ids(
    params,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    method,
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    pad_id: int = 0,
    on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    mesh=None,
) -> GenerateOutput:
    """Generate for a batch of token-id prompts of any lengths (one compiled program).

    method: an unresolved KV method (e.g. `make_method("rocketkv", 256)`); it is planned
    for the bucketed prompt length. stop_ids default to the config's EOS ids.
    on_step(step, tokens [B], done [B]) is called on the host as tokens are produced.
    mesh: a `sharding.make_mesh` mesh to run on (batch over "data", heads over "model");
    params not yet laid out on it are moved there by `sharding.PARAM_RULES`.
    """
    check_request(config, prompts, max_new_tokens)
    stop = tuple(sorted(set(config.eos_token_ids if stop_ids is None else stop_ids)))
    n = len(prompts)
    B = shd.round_batch(batch_bucket(n), mesh)  # a multiple of the data axis
    lens = [len(p) for p in prompts]
    T = length_bucket(max(lens), limit=config.max_position_embeddings - max_new_tokens)
    plan = method.plan(config, T, max_new_tokens)
    tokens = np.full((B, T), pad_id, np.int32)
    lengths = np.ones((B,), np.int32)
    for i, p in enumerate(list(prompts) + [prompts[0]] * (B - n)):  # pad rows repeat row 0
        tokens[i, : len(p)] = p
        lengths[i] = len(p)
    if mesh is not None:
        shd.check_mesh(config, mesh, B)
        params = shd.place_params(params, config, mesh)
    compiled, compile_s = _compiled(
        config, plan, B, T, max_new_tokens, sampling, stop, pad_id, _params_struct(params), mesh
    )
    times: list[float] = []

    def sink(step, toks, done):
        times.append(time.perf_counter())
        if on_step is not None:
            on_step(step, toks[:n], done[:n])

    with _sink_lock:
        _sink.fn = sink
        try:
            t0 = time.perf_counter()
            key = jax.random.key_data(jax.random.key(seed))
            args = (jnp.asarray(tokens), jnp.asarray(lengths), key) if mesh is None else (
                shd.put_batch(tokens, mesh), shd.put_batch(lengths, mesh),
                shd.put_replicated(key, mesh))
            out, n_gen = compiled(params, *args)
            out, n_gen = np.asarray(out), np.asarray(n_gen)
            t_end = time.perf_counter()
        finally:
            _sink.fn = None
    prefill_s = (times[0] - t0) if times else t_end - t0
    stats = GenerateStats(
        prompt_tokens=sum(lens),
        generated_tokens=int(n_gen[:n].sum()),
        compile_s=compile_s,
        prefill_s=prefill_s,
        decode_s=(t_end - times[0]) if times else 0.0,
        kv_cache_bytes=kv_cache_bytes(params, config, plan, B, T),
        batch=n,
        prompt_bucket=T,
    )
    return GenerateOutput([out[i, : n_gen[i]].tolist() for i in range(n)], stats)


# ------------------------------------------------------- step-wise API (bench, eval)
def make_prefill(config: ModelConfig, plan):
    """jitted (params, tokens [B, T], lengths [B]) -> (last logits [B, V], cache)."""
    return jax.jit(lambda p, t, n: forward_prefill(p, config, t, n, plan, all_logits=False))


def make_decode_step(config: ModelConfig, plan):
    """jitted (params, tokens [B], positions [B], cache) -> (logits [B, V], cache), with
    the cache donated so XLA updates it in place."""

    def step(p, tok, pos, cache):
        return forward_decode(p, config, tok, pos, cache, plan)

    return jax.jit(step, donate_argnums=(3,))


def forced_decode_logprobs(
    params, config: ModelConfig, prompt: Sequence[int], forced: Sequence[int], method
) -> np.ndarray:
    """Next-token log-probabilities at each step of decoding `forced` after `prompt`.

    Returns [len(forced), V] float32: row i is the distribution that predicts forced[i]
    (row 0 from prefill, row i from decoding forced[i-1]). Used for fidelity metrics.
    """
    check_request(config, [prompt], max(1, len(forced)))
    T = length_bucket(len(prompt), limit=config.max_position_embeddings - len(forced))
    plan = method.plan(config, T, len(forced))
    tokens = np.zeros((1, T), np.int32)
    tokens[0, : len(prompt)] = prompt
    prefill, step = _stepwise(config, plan)
    logits, cache = prefill(params, jnp.asarray(tokens), jnp.asarray([len(prompt)], jnp.int32))
    rows = [jax.nn.log_softmax(logits[0])]
    for i, tok in enumerate(forced[:-1]):
        pos = jnp.asarray([len(prompt) + i], jnp.int32)
        logits, cache = step(params, jnp.asarray([tok], jnp.int32), pos, cache)
        rows.append(jax.nn.log_softmax(logits[0]))
    return np.asarray(jnp.stack(rows))


@functools.lru_cache(maxsize=16)
def _stepwise(config, plan) -> tuple[Any, Any]:
    return make_prefill(config, plan), make_decode_step(config, plan)

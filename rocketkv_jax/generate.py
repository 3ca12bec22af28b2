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

from . import defaults
from . import sharding as shd
from .methods.base import DensePlan
from .methods.capture import KeepRaw
from .methods.cost import fallback_note
from .methods.skip_layers import compress_layers
from .models.config import ModelConfig
from .models.llama import forward_decode, forward_prefill, prefill_chunk_size
from .sampling import Sampling, sample

GREEDY = Sampling()
DEFAULT_PREFILL_CHUNK = defaults.DEFAULT_PREFILL_CHUNK  # prompt tokens per prefill chunk


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
_sink = types.SimpleNamespace(fn=None, chunk=None)
_sink_lock = threading.Lock()


def _emit(step, tokens, done):
    """Host side of the per-step io_callback: forwards to the active generate call."""
    fn = _sink.fn
    if fn is not None:
        fn(int(step), np.asarray(tokens), np.asarray(done))


def _emit_chunk(c):
    """Host side of the per-chunk prefill io_callback (progress)."""
    fn = _sink.chunk
    if fn is not None:
        fn(int(c))


def _chunk_done(c):
    io_callback(_emit_chunk, None, c, ordered=True)


def _stream(step, tokens, done, mesh=None):
    tokens, done = shd.replicate((tokens, done), mesh)  # the host reads whole rows
    io_callback(_emit, None, step, tokens, done, ordered=True)


# ------------------------------------------------------------------- the program
def _generate_program(params, tokens, lengths, key, *, config, plan, prefill_chunk=None,
                      mesh=None, **loop):
    """tokens [B, T] int32 right-padded, lengths [B] -> (out [B, N] int32, n_generated [B]).

    Row b's output stops after its first stop id (included) and is padded with pad_id.
    """
    logits, cache = forward_prefill(params, config, tokens, lengths, plan, all_logits=False,
                                    chunk=prefill_chunk, on_chunk=_chunk_done)
    return _decode_loop(params, logits, cache, lengths, key, config=config, plan=plan,
                        mesh=mesh, **loop)


def _decode_loop(
    params, logits, cache, lengths, key, *, config, plan, max_new_tokens, sampling, stop_ids,
    pad_id, mesh=None,
):
    """Sample from the prefill logits [B, V], then decode until every row stopped or
    max_new_tokens were produced. Returns (out [B, N] int32, n_generated [B])."""
    B = logits.shape[0]
    N = max_new_tokens
    stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
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
    prefill_chunk: int = 0  # tokens per prefill chunk (the bucket when not chunked)
    method: str = ""
    token_budget: int | None = None  # None for full
    sequence: int = 0  # prompt bucket + max_new_tokens: what the budget is compared with
    dense_fallback: bool = False  # the budget covers the sequence: exact dense attention
    attention_note: str = ""  # why a budgeted plan attends densely (methods.cost.fallback_note)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decoded_tokens(self) -> int:
        return self.generated_tokens - self.batch  # the first token comes from prefill

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = self.decoded_tokens
        return decoded / self.decode_s if self.decode_s > 0 and decoded > 0 else 0.0

    def method_summary(self) -> str:
        """"rocketkv (budget 256)", or with the dense fallback said out loud."""
        if self.token_budget is None:
            return self.method
        if self.dense_fallback:
            return (f"{self.method} (budget {self.token_budget} >= sequence {self.sequence}: "
                    f"dense attention, nothing evicted)")
        if self.attention_note:
            return f"{self.method} (budget {self.token_budget}; {self.attention_note})"
        return f"{self.method} (budget {self.token_budget})"

    def summary(self) -> str:
        decode = (f"{self.decode_tokens_per_s:.1f} tok/s" if self.decoded_tokens > 0
                  else "n/a (one token per prompt, from prefill)")
        method = f"method: {self.method_summary()} | " if self.method else ""
        return (
            f"[stats] {method}prompt tokens: {self.prompt_tokens} | generated tokens: "
            f"{self.generated_tokens} | prefill: {self.prefill_s:.3f} s "
            f"({self.prefill_tokens_per_s:.0f} tok/s) | decode: {decode} | "
            f"compile: {self.compile_s:.1f} s | KV cache: {_fmt_bytes(self.kv_cache_bytes)}"
        )


def _method_stats(method, plan, T: int, N: int) -> dict:
    """GenerateStats fields naming the method, its budget and whether it fell back to
    dense attention (a budget that covers the bucketed prompt plus N)."""
    name = getattr(method, "name", type(method).__name__)
    budget = getattr(method, "token_budget", None)
    dense = isinstance(plan, DensePlan) and plan.fallback == "budget"
    return dict(method=name, token_budget=budget, sequence=T + N,
                dense_fallback=budget is not None and dense,
                attention_note=fallback_note(plan) if budget is not None else "")


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
def _compiled(config, plan, B, T, N, sampling, stop_ids, pad_id, params_struct, mesh=None,
              prefill_chunk=None):
    fn = functools.partial(
        _generate_program, config=config, plan=plan, max_new_tokens=N, sampling=sampling,
        stop_ids=stop_ids, pad_id=pad_id, mesh=mesh, prefill_chunk=prefill_chunk,
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
    """Raise GenerateError for requests the model cannot serve (before any compile).

    A prompt of P tokens with N new tokens needs P + N - 1 positions: the last sampled
    token is returned, never fed back.
    """
    if not prompts:
        raise GenerateError("no prompts given")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ctx = config.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty")
        check_token_ids(p, config.vocab_size, f"prompt {i}")
        if len(p) > ctx:
            raise GenerateError(
                f"prompt {i} has {len(p)} tokens, longer than the model's context of {ctx}"
            )
        if len(p) + max_new_tokens - 1 > ctx:
            raise GenerateError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                f"needs {len(p) + max_new_tokens - 1} positions > the model's context of "
                f"{ctx}. Lower --max-new-tokens to at most {ctx - len(p) + 1}."
            )


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str = "prompt") -> None:
    """Raise GenerateError unless every id is an integer in [0, vocab_size): the embedding
    gather would clamp an id outside it to the last row and answer silently wrong."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise GenerateError(f"{what} must be a sequence of integer token ids")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        j = int(bad[0])
        raise GenerateError(
            f"{what} holds token id {int(arr[j])} at position {j}, outside the model's "
            f"vocabulary of {vocab_size} (valid ids: 0..{vocab_size - 1}); the tokenizer "
            f"and the checkpoint disagree, or the ids are wrong"
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
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    on_prefill_chunk: Callable[[int, int], None] | None = None,
) -> GenerateOutput:
    """Generate for a batch of token-id prompts of any lengths (one compiled program).

    method: an unresolved KV method (e.g. `make_method("rocketkv", 256)`); it is planned
    for the bucketed prompt length. stop_ids default to the config's EOS ids.
    on_step(step, tokens [B], done [B]) is called on the host as tokens are produced.
    mesh: a `sharding.make_mesh` mesh to run on (batch over "data", heads over "model");
    params not yet laid out on it are moved there by `sharding.PARAM_RULES`.
    prefill_chunk: prompt tokens per prefill chunk (None: the whole prompt at once); a
    prompt longer than one chunk is padded to a whole number of chunks, so every prompt
    of n chunks shares one program. on_prefill_chunk(done, total) is called on the host
    as each chunk finishes.
    """
    check_request(config, prompts, max_new_tokens)
    check_prefill_chunk(prefill_chunk)
    stop = _stop_tuple(config, stop_ids)
    n = len(prompts)
    tokens, lengths = _pack(config, prompts, max_new_tokens, pad_id, mesh, prefill_chunk)
    B, T = tokens.shape
    plan = method.plan(config, T, max_new_tokens)
    if mesh is not None:
        shd.check_mesh(config, mesh, B)
        params = shd.place_params(params, config, mesh)
    chunk = prefill_chunk_size(T, prefill_chunk)
    compiled, compile_s = _compiled(
        config, plan, B, T, max_new_tokens, sampling, stop, pad_id, _params_struct(params), mesh,
        chunk,
    )
    if mesh is None:
        args = (jnp.asarray(tokens), jnp.asarray(lengths), _key(seed))
    else:
        args = (shd.put_batch(tokens, mesh), shd.put_batch(lengths, mesh),
                shd.put_replicated(_key(seed), mesh))
    on_chunk = None if on_prefill_chunk is None else (
        lambda c, total=-(-T // chunk): on_prefill_chunk(c + 1, total))
    return _run(compiled, (params, *args), n, lengths, on_step, GenerateStats(
        prompt_tokens=int(lengths[:n].sum()), generated_tokens=0, compile_s=compile_s,
        prefill_s=0.0, decode_s=0.0, kv_cache_bytes=kv_cache_bytes(params, config, plan, B, T),
        batch=n, prompt_bucket=T, prefill_chunk=chunk,
        **_method_stats(method, plan, T, max_new_tokens)), on_chunk)


def _stop_tuple(config: ModelConfig, stop_ids) -> tuple[int, ...]:
    return tuple(sorted(set(config.eos_token_ids if stop_ids is None else stop_ids)))


def _key(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed))


def check_prefill_chunk(prefill_chunk) -> None:
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(
            prefill_chunk, int) or prefill_chunk < 16):
        raise GenerateError(
            f"prefill_chunk must be an int >= 16 (tokens per prefill chunk) or None, got "
            f"{prefill_chunk!r}")


def prompt_bucket(n: int, limit: int, prefill_chunk: int | None) -> int:
    """Padded prompt length for a longest prompt of n tokens: a `length_bucket`, or a whole
    number of chunks once the prompt is longer than one chunk."""
    T = length_bucket(n, limit=limit)
    if prefill_chunk is not None and T > prefill_chunk:
        T = max(n, min(-(-n // prefill_chunk) * prefill_chunk, limit))
    return T


def _pack(config, prompts, max_new_tokens, pad_id, mesh=None,
          prefill_chunk=None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts into buckets: tokens [B, T] int32, lengths [B] int32. Padding
    rows (up to the batch bucket) repeat row 0 and are dropped from the results."""
    B = shd.round_batch(batch_bucket(len(prompts)), mesh)  # a multiple of the data axis
    T = prompt_bucket(max(map(len, prompts)), config.max_position_embeddings - max_new_tokens,
                      prefill_chunk)
    tokens = np.full((B, T), pad_id, np.int32)
    lengths = np.ones((B,), np.int32)
    for i, p in enumerate(list(prompts) + [prompts[0]] * (B - len(prompts))):
        tokens[i, : len(p)] = p
        lengths[i] = len(p)
    return tokens, lengths


def _run(compiled, args, n, lengths, on_step, stats: GenerateStats,
         on_chunk=None) -> GenerateOutput:
    """Run a compiled generate program with the host stream attached; fill in timings."""
    times: list[float] = []

    def sink(step, toks, done):
        times.append(time.perf_counter())
        if on_step is not None:
            on_step(step, toks[:n], done[:n])

    with _sink_lock:
        _sink.fn, _sink.chunk = sink, on_chunk
        try:
            t0 = time.perf_counter()
            out, n_gen = compiled(*args)
            out, n_gen = np.asarray(out), np.asarray(n_gen)
            t_end = time.perf_counter()
        finally:
            _sink.fn = _sink.chunk = None
    stats.prefill_s = stats.prefill_s + ((times[0] - t0) if times else t_end - t0)
    stats.decode_s = (t_end - times[0]) if times else 0.0
    stats.generated_tokens = int(n_gen[:n].sum())
    return GenerateOutput([out[i, : n_gen[i]].tolist() for i in range(n)], stats)


# ------------------------------------------------------------ one prefill, many methods
def _from_prefill_program(params, logits, states, lengths, key, *, config, plan, **loop):
    """Compress the stored per-layer (k, v, q) with `plan`, then decode as generate does."""
    cache = compress_layers(plan, *states, lengths)  # layer by layer
    return _decode_loop(params, logits, cache, lengths, key, config=config, plan=plan, **loop)


@functools.lru_cache(maxsize=256)  # an eval grid cycles through ~40 plans per batch
def _compiled_from_prefill(config, plan, N, sampling, stop_ids, pad_id, arg_structs):
    fn = functools.partial(_from_prefill_program, config=config, plan=plan, max_new_tokens=N,
                           sampling=sampling, stop_ids=stop_ids, pad_id=pad_id)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*jax.tree.unflatten(*arg_structs)).compile()
    return compiled, time.perf_counter() - t0


class SharedPrefill:
    """Prefill a batch once (as every method's prefill is), then generate from it with
    several methods: what `generate_ids` would give, at one prefill's cost.

    Holds each layer's prompt k, v [Ly, B, K, T, D] and each row's last
    STORED_QUERY_WINDOW queries [Ly, B, H, W, D] in memory. Used by the evaluation, which
    runs many (method, budget) pairs on the same prompts.
    """

    def __init__(self, params, config: ModelConfig, prompts, *, max_new_tokens: int,
                 pad_id: int = 0, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        check_request(config, prompts, max_new_tokens)
        check_prefill_chunk(prefill_chunk)
        self.params, self.config, self.n = params, config, len(prompts)
        self.max_new_tokens, self.pad_id = max_new_tokens, pad_id
        self.tokens, self.lengths = _pack(config, prompts, max_new_tokens, pad_id,
                                          prefill_chunk=prefill_chunk)
        B, T = self.tokens.shape
        prefill = jax.jit(lambda p, t, n: forward_prefill(p, config, t, n, KeepRaw(T),
                                                          all_logits=False, chunk=prefill_chunk))
        t0 = time.perf_counter()
        self.logits, self.states = prefill(params, jnp.asarray(self.tokens),
                                           jnp.asarray(self.lengths))
        jax.block_until_ready(self.logits)
        self.prefill_s = time.perf_counter() - t0

    def generate(self, method, *, sampling: Sampling = GREEDY, seed: int = 0,
                 stop_ids: Sequence[int] | None = None) -> GenerateOutput:
        B, T = self.tokens.shape
        plan = method.plan(self.config, T, self.max_new_tokens)
        args = (self.params, self.logits, self.states, jnp.asarray(self.lengths), _key(seed))
        structs = jax.tree.flatten(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args))
        compiled, compile_s = _compiled_from_prefill(
            self.config, plan, self.max_new_tokens, sampling,
            _stop_tuple(self.config, stop_ids), self.pad_id, (structs[1], tuple(structs[0])))
        return _run(compiled, args, self.n, self.lengths, None, GenerateStats(
            prompt_tokens=int(self.lengths[: self.n].sum()), generated_tokens=0,
            compile_s=compile_s, prefill_s=self.prefill_s, decode_s=0.0,
            kv_cache_bytes=kv_cache_bytes(self.params, self.config, plan, B, T), batch=self.n,
            prompt_bucket=T, **_method_stats(method, plan, T, self.max_new_tokens)))


# ------------------------------------------------------- step-wise API (bench, eval)
def make_prefill(config: ModelConfig, plan, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
    """jitted (params, tokens [B, T], lengths [B]) -> (last logits [B, V], cache)."""
    return jax.jit(lambda p, t, n: forward_prefill(p, config, t, n, plan, all_logits=False,
                                                   chunk=prefill_chunk))


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
    check_token_ids(forced, config.vocab_size, "forced tokens")
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

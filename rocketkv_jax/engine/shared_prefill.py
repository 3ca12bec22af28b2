"""Prefill once, compress with many plans: what the evaluation and the benchmarks run.

Every method's prefill is the same dense forward; only the per-layer `plan.compress` at
its end depends on the method. So a batch of prompts is prefilled once with a plan that
keeps the raw result (`KeepRaw`: every layer's keys, values and window queries, a
`RawPrefill`), and each (method, budget) then compresses that (`compress_program`) and
decodes from it: what `generate_ids` would give for each, at one prefill's cost
(tests/engine/test_generate_tiny.py checks the two agree token for token).

Also here: the log-probabilities of forced tokens, decoded step by step (fidelity).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..cache import tree_bytes
from ..kernels.backend import prefill_backend
from ..models.config import ModelConfig
from ..models.llama import forward_prefill
from ..models.plan import compress_layers
from ..names import DEFAULT_KERNELS, DEFAULT_PREFILL_CHUNK
from ..sampling import Sampling, prng_key
from .compile import compile_program, hashable, params_struct, program_cache, unflatten
from .decode import LoopSettings, begin_decode, decode_program, run_decode
from .generate import (
    GREEDY,
    GenerateOutput,
    GenerateStats,
    finish_stats,
    kernels_summary,
    make_decode_step,
    make_prefill,
    method_stats,
)
from .requests import (
    GenerateError,
    check_prefill_chunk,
    check_request,
    check_token_ids,
    length_bucket,
    pack_prompts,
    stop_tuple,
)

# Trailing queries a raw prefill keeps per row: any stage-1 window up to this can be
# compressed from it.
STORED_QUERY_WINDOW = 128


@dataclasses.dataclass(frozen=True)
class KeepRaw:
    """A plan whose `compress` returns each layer's raw prompt k, v [B, K, T, D] and its
    rows' last `query_window` queries q [B, H, query_window, D] unchanged."""

    capacity: int
    query_window: int = STORED_QUERY_WINDOW

    def compress(self, k, v, q, lengths):
        return k, v, q


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RawPrefill:
    """A prefill before compression. k, v: [Ly, B, K, T, D] every layer's prompt keys
    (RoPE applied) and values; q: [Ly, B, H, W, D] each row's last W queries; lengths: [B]
    int32 real tokens per row."""

    k: jax.Array
    v: jax.Array
    q: jax.Array
    lengths: jax.Array


def _i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


@program_cache(maxsize=16)
def raw_prefill_program(config: ModelConfig, B: int, T: int, params_s,
                        chunk: int | None = DEFAULT_PREFILL_CHUNK,
                        kernels: str = DEFAULT_KERNELS):
    """(params, tokens [B, T], lengths [B]) -> (logits [B, V] float32 of each row's last
    token, RawPrefill), prefilled in chunks of `chunk` tokens by the `kernels` backend."""

    def prefill(params, tokens, lengths):
        logits, (k, v, q) = forward_prefill(params, config, tokens, lengths, KeepRaw(T),
                                            all_logits=False, chunk=chunk, kernels=kernels)
        return logits, RawPrefill(k, v, q, lengths)

    return compile_program("raw_prefill", prefill, (unflatten(params_s), _i32(B, T), _i32(B)))


@program_cache(maxsize=256)  # a grid compresses with ~40 plans per prefill
def compress_program(plan, raw_s):
    """(RawPrefill) -> `plan`'s cache, the one `make_prefill(config, plan)` returns for
    the same prompt (leading layer axis). raw_s: the RawPrefill's `compile.hashable`."""

    def compress(raw):
        return compress_layers(plan, raw.k, raw.v, raw.q, raw.lengths)

    return compile_program("compress", compress, (unflatten(raw_s),))


def _start_from_raw(plan, loop):
    def start(params, logits, raw, key):
        cache = compress_layers(plan, raw.k, raw.v, raw.q, raw.lengths)  # layer by layer
        return begin_decode(logits, cache, key, loop)

    return start


@program_cache(maxsize=256)
def start_program(plan, loop: LoopSettings, args_s):
    """(params, logits [B, V], RawPrefill, key [2]) -> DecodeState at step 1."""
    return compile_program("start_from_prefill", _start_from_raw(plan, loop),
                           unflatten(args_s))


def prefill_raw(params, config: ModelConfig, tokens, lengths, *,
                chunk: int | None = DEFAULT_PREFILL_CHUNK, kernels: str = DEFAULT_KERNELS):
    """Run `raw_prefill_program` on packed prompts: (logits, RawPrefill, compile seconds,
    run seconds). tokens [B, T], lengths [B] int32 (numpy or jax)."""
    B, T = tokens.shape
    program, compile_s = raw_prefill_program(config, B, T, params_struct(params), chunk,
                                             kernels)
    t0 = time.perf_counter()
    logits, raw = jax.block_until_ready(program(params, jnp.asarray(tokens, jnp.int32),
                                                jnp.asarray(lengths, jnp.int32)))
    return logits, raw, compile_s, time.perf_counter() - t0


class SharedPrefill:
    """Prefill a batch once, then generate from it with several methods: what
    `generate_ids` would give for each, at one prefill's cost.

    Holds the RawPrefill (every layer's prompt k, v and each row's last
    STORED_QUERY_WINDOW queries) in memory. kernels: the prefill attention's backend
    ("auto": the Pallas kernel on a GPU).
    """

    def __init__(self, params, config: ModelConfig, prompts, *, max_new_tokens: int,
                 pad_id: int = 0, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 kernels: str = DEFAULT_KERNELS):
        check_request(config, prompts, max_new_tokens)
        check_prefill_chunk(prefill_chunk)
        self.kernels = prefill_backend(kernels)
        self.params, self.config, self.n = params, config, len(prompts)
        self.max_new_tokens, self.pad_id = max_new_tokens, pad_id
        self.tokens, self.lengths = pack_prompts(config, prompts, max_new_tokens, pad_id,
                                                 prefill_chunk=prefill_chunk)
        self.logits, self.raw, _, self.prefill_s = prefill_raw(
            params, config, self.tokens, self.lengths, chunk=prefill_chunk,
            kernels=self.kernels)

    def generate(self, method, *, sampling: Sampling = GREEDY, seed: int = 0,
                 stop_ids: Sequence[int] | None = None) -> GenerateOutput:
        T = self.tokens.shape[1]
        N = self.max_new_tokens
        plan = method.plan(self.config, T, N)
        loop = LoopSettings(N, sampling, stop_tuple(self.config, stop_ids), self.pad_id)
        args = (self.params, self.logits, self.raw, prng_key(seed))
        args_s = hashable(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args))
        start, t_start = start_program(plan, loop, args_s)
        state_s = jax.eval_shape(_start_from_raw(plan, loop), *args)
        decode, t_decode = decode_program(self.config, plan, loop, hashable(state_s),
                                          params_struct(self.params))
        stats = GenerateStats(
            prompt_tokens=int(self.lengths[: self.n].sum()), generated_tokens=0,
            compile_s=t_start + t_decode, prefill_s=self.prefill_s, decode_s=0.0,
            kv_cache_bytes=tree_bytes(state_s.cache), batch=self.n,
            prompt_bucket=T, kernels=kernels_summary(self.kernels, plan),
            **method_stats(method, plan, T, N))
        t0 = time.perf_counter()
        run = run_decode(decode, self.params, start(*args), self.raw.lengths, self.n)
        return finish_stats(run, stats, t0)

    def compressed(self, method):
        """(plan, cache): `method`'s plan for this batch and the cache it compresses from
        this prefill (leading layer axis; what its decode starts from)."""
        plan = method.plan(self.config, self.tokens.shape[1], self.max_new_tokens)
        raw_s = hashable(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      self.raw))
        program, _ = compress_program(plan, raw_s)
        return plan, program(self.raw)

    def forced_logprobs(self, method, forced) -> np.ndarray:
        """Teacher forcing from this prefill: [n_prompts, n, V] float32 log-probabilities,
        where [b, i] is `method`'s next-token distribution for prompt b after forced[b, :i]
        (i = 0: from the prefill's logits). forced: [n_prompts, n] token ids, n at most
        max_new_tokens. What `forced_decode_logprobs` gives for each row, from one prefill."""
        forced = np.asarray(forced)
        if forced.ndim != 2 or forced.shape[0] != self.n:
            raise GenerateError(f"forced tokens must be [{self.n}, n], one row a prompt; "
                                f"got shape {forced.shape}")
        if not 1 <= forced.shape[1] <= self.max_new_tokens:
            raise GenerateError(f"1 to {self.max_new_tokens} forced tokens a prompt (this "
                                f"prefill's max_new_tokens); got {forced.shape[1]}")
        for row in forced:
            check_token_ids(row, self.config.vocab_size, "forced tokens")
        plan, cache = self.compressed(method)
        step = make_decode_step(self.config, plan)
        B = self.tokens.shape[0]
        tokens = np.full((B, forced.shape[1]), self.pad_id, np.int32)
        tokens[: self.n] = forced
        rows = [jax.nn.log_softmax(self.logits, axis=-1)]
        for i in range(forced.shape[1] - 1):
            logits, cache = step(self.params, jnp.asarray(tokens[:, i]),
                                 self.raw.lengths + i, cache)
            rows.append(jax.nn.log_softmax(logits, axis=-1))
        return np.asarray(jnp.stack(rows, axis=1)[: self.n], np.float32)


def forced_decode_logprobs(
    params, config: ModelConfig, prompt: Sequence[int], forced: Sequence[int], method,
    kernels: str = DEFAULT_KERNELS,
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
    prefill, step = _stepwise(config, plan, prefill_backend(kernels))
    logits, cache = prefill(params, jnp.asarray(tokens), jnp.asarray([len(prompt)], jnp.int32))
    rows = [jax.nn.log_softmax(logits[0])]
    for i, tok in enumerate(forced[:-1]):
        pos = jnp.asarray([len(prompt) + i], jnp.int32)
        logits, cache = step(params, jnp.asarray([tok], jnp.int32), pos, cache)
        rows.append(jax.nn.log_softmax(logits[0]))
    return np.asarray(jnp.stack(rows))


@program_cache(maxsize=16)
def _stepwise(config, plan, kernels):
    return make_prefill(config, plan, kernels=kernels), make_decode_step(config, plan)

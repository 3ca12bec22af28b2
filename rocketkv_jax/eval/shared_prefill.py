"""Evaluation machinery over the generation engine: one prefill shared by many methods,
and the log-probabilities of forced tokens (fidelity metrics)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import programs
from ..generate import (
    DEFAULT_KERNELS,
    DEFAULT_PREFILL_CHUNK,
    GREEDY,
    GenerateOutput,
    GenerateStats,
    check_prefill_chunk,
    check_request,
    check_token_ids,
    kernels_summary,
    length_bucket,
    make_decode_step,
    make_prefill,
    method_stats,
    pack_prompts,
    prng_key,
    run_decode,
    stop_tuple,
)
from ..kernels.backend import resolve_backend
from ..methods.capture import KeepRaw
from ..models.config import ModelConfig
from ..models.llama import forward_prefill
from ..models.plan import compress_layers
from ..programs import LoopSettings
from ..sampling import Sampling


def _start_from_raw(config, plan, loop):
    def start(params, logits, raw, lengths, key):
        cache = compress_layers(plan, *raw, lengths)  # layer by layer
        return programs.begin_decode(logits, cache, key, loop)

    return start


@functools.lru_cache(maxsize=256)  # an eval grid cycles through ~40 plans per batch
def _start_program(config, plan, loop, arg_structs):
    args = jax.tree.unflatten(*arg_structs)
    return programs.compile_program("start_from_prefill", _start_from_raw(config, plan, loop),
                                    args)


class SharedPrefill:
    """Prefill a batch once (as every method's prefill is), then generate from it with
    several methods: what `generate_ids` would give, at one prefill's cost.

    Holds each layer's prompt k, v [Ly, B, K, T, D] and each row's last
    STORED_QUERY_WINDOW queries [Ly, B, H, W, D] in memory. Used by the evaluation, which
    runs many (method, budget) pairs on the same prompts. kernels: the prefill attention's
    backend ("auto": the Pallas kernel on a GPU).
    """

    def __init__(self, params, config: ModelConfig, prompts, *, max_new_tokens: int,
                 pad_id: int = 0, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 kernels: str = DEFAULT_KERNELS):
        check_request(config, prompts, max_new_tokens)
        check_prefill_chunk(prefill_chunk)
        self.kernels = resolve_backend(kernels)
        self.params, self.config, self.n = params, config, len(prompts)
        self.max_new_tokens, self.pad_id = max_new_tokens, pad_id
        self.tokens, self.lengths = pack_prompts(config, prompts, max_new_tokens, pad_id,
                                                 prefill_chunk=prefill_chunk)
        B, T = self.tokens.shape
        prefill = jax.jit(lambda p, t, n: forward_prefill(
            p, config, t, n, KeepRaw(T), all_logits=False, chunk=prefill_chunk,
            kernels=self.kernels))
        t0 = time.perf_counter()
        self.logits, self.raw = prefill(params, jnp.asarray(self.tokens),
                                        jnp.asarray(self.lengths))
        jax.block_until_ready(self.logits)
        self.prefill_s = time.perf_counter() - t0

    def generate(self, method, *, sampling: Sampling = GREEDY, seed: int = 0,
                 stop_ids: Sequence[int] | None = None) -> GenerateOutput:
        T = self.tokens.shape[1]
        N = self.max_new_tokens
        plan = method.plan(self.config, T, N)
        loop = LoopSettings(N, sampling, stop_tuple(self.config, stop_ids), self.pad_id)
        lens = jnp.asarray(self.lengths)
        args = (self.params, self.logits, self.raw, lens, prng_key(seed))
        start, t_start = _start_program(self.config, plan, loop, programs.hashable(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)))
        ps = programs.params_struct(self.params)
        state_s = jax.eval_shape(_start_from_raw(self.config, plan, loop), *args)
        decode, t_decode = programs.decode_program(self.config, plan, loop,
                                                   programs.hashable(state_s), ps)
        stats = GenerateStats(
            prompt_tokens=int(self.lengths[: self.n].sum()), generated_tokens=0,
            compile_s=t_start + t_decode, prefill_s=self.prefill_s, decode_s=0.0,
            kv_cache_bytes=programs.nbytes(state_s.cache), batch=self.n,
            prompt_bucket=T, kernels=kernels_summary(self.kernels, plan),
            **method_stats(method, plan, T, N))
        t0 = time.perf_counter()
        return run_decode(decode, self.params, start(*args), lens, self.n, None, stats, t0)


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
    prefill, step = _stepwise(config, plan, resolve_backend(kernels))
    logits, cache = prefill(params, jnp.asarray(tokens), jnp.asarray([len(prompt)], jnp.int32))
    rows = [jax.nn.log_softmax(logits[0])]
    for i, tok in enumerate(forced[:-1]):
        pos = jnp.asarray([len(prompt) + i], jnp.int32)
        logits, cache = step(params, jnp.asarray([tok], jnp.int32), pos, cache)
        rows.append(jax.nn.log_softmax(logits[0]))
    return np.asarray(jnp.stack(rows))


@functools.lru_cache(maxsize=16)
def _stepwise(config, plan, kernels):
    return make_prefill(config, plan, kernels=kernels), make_decode_step(config, plan)

"""Batched generation: bucket the prompts, prefill them chunk by chunk, compress, decode.

The public entry is `generate_ids`. Prompt lengths are padded up to buckets, so a new
prompt length rarely means a new compile; the host drives the compiled programs of
`programs.py` (a prefill chunk, the start of decode, decode steps) and reports progress
between them: prefill chunks done, tokens as they are produced. The KV cache lives on
the device across those calls, donated from one to the next.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, defaults, names, programs
from . import sharding as shd
from .kernels.backend import resolve_backend
from .methods.base import NO_KERNELS, DensePlan
from .methods.cost import fallback_note
from .models.config import ModelConfig
from .models.llama import forward_decode, forward_prefill, prefill_chunk_size
from .programs import DecodeState, LoopSettings
from .sampling import Sampling, prng_key

__all__ = ["GREEDY", "GenerateError", "GenerateOutput", "GenerateStats", "check_request",
           "generate_ids", "make_decode_step", "make_prefill", "prng_key"]
GREEDY = Sampling()
DEFAULT_PREFILL_CHUNK = defaults.DEFAULT_PREFILL_CHUNK  # prompt tokens per prefill chunk
DEFAULT_KERNELS = names.DEFAULT_KERNELS  # "auto": Pallas kernels on a GPU


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
    kernels: str = ""  # which kernel backends ran (`kernels_summary`)

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
        kernels = f"kernels: {self.kernels} | " if self.kernels else ""
        return (
            f"[stats] {method}{kernels}prompt tokens: {self.prompt_tokens} | generated tokens: "
            f"{self.generated_tokens} | prefill: {self.prefill_s:.3f} s "
            f"({self.prefill_tokens_per_s:.0f} tok/s) | decode: {decode} | "
            f"compile: {self.compile_s:.1f} s | KV cache: {_fmt_bytes(self.kv_cache_bytes)}"
        )


def kernels_summary(prefill: str, plan) -> str:
    """Which kernel backends ran, for the stats line: "triton" (prefill attention and the
    decode's sparse attention), "prefill triton, decode reference", or, for a plan whose
    decode attention is dense jnp under XLA, "triton (prefill; decode attention dense)".
    prefill: the resolved backend of the prefill attention."""
    decode = plan.describe().get("kernels", NO_KERNELS) if hasattr(plan, "describe") else (
        NO_KERNELS)
    if decode == NO_KERNELS:
        return f"{prefill} (prefill; decode attention dense)"
    return prefill if decode == prefill else f"prefill {prefill}, decode {decode}"


def method_stats(method, plan, T: int, N: int) -> dict:
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


def check_request(config: ModelConfig, prompts: Sequence[Sequence[int]],
                  max_new_tokens: int) -> None:
    """Raise GenerateError for requests the model cannot serve (before any compile).

    A prompt of P tokens with N new tokens needs P + N - 1 positions: the last sampled
    token is returned, never fed back.
    """
    check_config(config)
    checks.max_new_tokens(max_new_tokens, error=GenerateError)
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence | np.ndarray):
        raise GenerateError(f"prompts must be a list of token-id lists (one per prompt), got "
                            f"{type(prompts).__name__}; tokenize text first "
                            f"(Tokenizer.encode)")
    if not len(prompts):
        raise GenerateError("no prompts given")
    ctx = config.max_position_embeddings
    for i, p in enumerate(prompts):
        if isinstance(p, str | bytes) or not isinstance(p, Sequence | np.ndarray):
            raise GenerateError(f"prompt {i} must be a list of token ids, got "
                                f"{type(p).__name__}")
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


def check_config(config) -> None:
    if not isinstance(config, ModelConfig):
        raise GenerateError(f"config must be a ModelConfig (Model.config of load_model), got "
                            f"{type(config).__name__}")


def check_method(method) -> None:
    """A KV method object: what `make_method` returns (it plans, names are not methods)."""
    if isinstance(method, str):
        raise GenerateError(f"method must be a KV method, not its name: pass "
                            f"make_method({method!r}, token_budget)")
    if not callable(getattr(method, "plan", None)):
        raise GenerateError(f"method must be a KV method (make_method(name, token_budget)), "
                            f"got {type(method).__name__}")


def check_sampling(sampling) -> None:
    if not isinstance(sampling, Sampling):
        raise GenerateError(f"sampling must be a Sampling(temperature, top_k, top_p), got "
                            f"{type(sampling).__name__}")


def check_stop_ids(stop_ids) -> None:
    """None (the config's EOS ids) or token ids (integers >= 0; an id past the model's
    vocabulary, such as a tokenizer's extra token, is never sampled and so never stops)."""
    if stop_ids is None:
        return
    if isinstance(stop_ids, str | bytes) or not isinstance(
            stop_ids, Sequence | set | frozenset | np.ndarray):
        raise GenerateError(f"stop_ids must be a list of token ids or None, got "
                            f"{type(stop_ids).__name__}")
    for t in stop_ids:
        checks.integer(t, "each of stop_ids", GenerateError)


def check_callbacks(**callbacks) -> None:
    for name, f in callbacks.items():
        if f is not None and not callable(f):
            raise GenerateError(f"{name} must be a function or None, got {type(f).__name__}")


def check_pad_id(pad_id, vocab_size: int) -> int:
    return checks.integer(pad_id, "pad_id", GenerateError, high=vocab_size,
                          meaning=f" (a token id of the vocabulary of {vocab_size})")


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
    kernels: str = DEFAULT_KERNELS,
) -> GenerateOutput:
    """Generate for a batch of token-id prompts of any lengths (one compiled program).

    method: an unresolved KV method (e.g. `make_method("rocketkv", 256)`); it is planned
    for the bucketed prompt length. stop_ids default to the config's EOS ids.
    on_step(step, tokens [B], done [B]) is called on the host as tokens are produced.
    mesh: a `sharding.make_mesh` mesh to run on (batch over "data", heads over "model");
    params not yet laid out on it are moved there by their declared axes
    (`sharding.param_shardings`).
    prefill_chunk: prompt tokens per prefill chunk (None: the whole prompt at once); a
    prompt longer than one chunk is padded to a whole number of chunks, so every prompt
    of n chunks shares one program. on_prefill_chunk(done, total) is called on the host
    as each chunk finishes.
    kernels: the prefill attention's backend (`names.KERNEL_BACKENDS`; "auto": the Pallas
    kernel on a GPU, the jnp reference elsewhere). The decode's sparse attention runs the
    method's own `kernels`; the stats line names both as they ran.
    """
    check_request(config, prompts, max_new_tokens)
    kernels = resolve_backend(kernels)
    check_prefill_chunk(prefill_chunk)
    check_method(method)
    check_sampling(sampling)
    checks.seed(seed, error=GenerateError)
    check_stop_ids(stop_ids)
    pad_id = check_pad_id(pad_id, config.vocab_size)
    check_callbacks(on_step=on_step, on_prefill_chunk=on_prefill_chunk)
    loop = LoopSettings(max_new_tokens, sampling, stop_tuple(config, stop_ids), pad_id)
    n = len(prompts)
    tokens, lengths = pack_prompts(config, prompts, max_new_tokens, pad_id, mesh, prefill_chunk)
    B, T = tokens.shape
    plan = method.plan(config, T, max_new_tokens)
    if mesh is not None:
        shd.check_mesh(config, mesh, B)
        params = shd.place_params(params, config, mesh)
    C = prefill_chunk_size(T, prefill_chunk)
    n_chunks = -(-T // C)
    progs = programs.for_request(config, plan, B, T, C, loop, programs.params_struct(params),
                                 mesh, kernels)
    stats = GenerateStats(
        prompt_tokens=int(lengths[:n].sum()), generated_tokens=0, compile_s=progs.compile_s,
        prefill_s=0.0, decode_s=0.0, kv_cache_bytes=progs.cache_bytes,
        batch=n, prompt_bucket=T, prefill_chunk=C, kernels=kernels_summary(kernels, plan),
        **method_stats(method, plan, T, max_new_tokens))
    padded = np.zeros((B, n_chunks * C), np.int32)
    padded[:, :T] = tokens
    put_b = (lambda x: jnp.asarray(x)) if mesh is None else (lambda x: shd.put_batch(x, mesh))
    put_r = (lambda x: jnp.asarray(x)) if mesh is None else (
        lambda x: shd.put_replicated(x, mesh))
    lens = put_b(lengths)

    t0 = time.perf_counter()
    prefill = progs.init()
    for c in range(n_chunks):
        prefill = progs.chunk(params, prefill, put_b(padded[:, c * C:(c + 1) * C]),
                              put_r(np.int32(c * C)), lens)
        if on_prefill_chunk is not None:
            jax.block_until_ready(prefill.x_last)
            on_prefill_chunk(c + 1, n_chunks)
    state = progs.start(params, prefill, lens, put_r(prng_key(seed)))
    del prefill
    return run_decode(progs.decode, params, state, lens, n, on_step, stats, t0)


def stop_tuple(config: ModelConfig, stop_ids) -> tuple[int, ...]:
    return tuple(sorted({int(t) for t in (config.eos_token_ids if stop_ids is None
                                          else stop_ids)}))


def check_prefill_chunk(prefill_chunk) -> int | None:
    return checks.prefill_chunk(prefill_chunk, error=GenerateError)


def prompt_bucket(n: int, limit: int, prefill_chunk: int | None) -> int:
    """Padded prompt length for a longest prompt of n tokens: a `length_bucket`, or a whole
    number of chunks once the prompt is longer than one chunk."""
    T = length_bucket(n, limit=limit)
    if prefill_chunk is not None and T > prefill_chunk:
        T = max(n, min(-(-n // prefill_chunk) * prefill_chunk, limit))
    return T


def pack_prompts(config, prompts, max_new_tokens, pad_id, mesh=None,
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


def host_array(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly row-sharded) array on the host; with several processes,
    gathered from all of them."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def run_decode(decode, params, state: DecodeState, lens, n: int, on_step,
                stats: GenerateStats, t0: float) -> GenerateOutput:
    """Run the decode program from a step-1 state to the end, one step per call when
    tokens are streamed to `on_step`, else in one call; fill in the timings."""
    N = state.out.shape[1]
    step, done = 1, host_array(state.done)
    t_first = time.perf_counter()
    stats.prefill_s += t_first - t0
    if on_step is not None:  # state.tokens is the column of out the last call wrote
        on_step(0, host_array(state.tokens)[:n], done[:n])
    while step < N and not done.all():
        until = step + 1 if on_step is not None else N
        state = decode(params, state, lens, jnp.int32(until))
        step, done = int(host_array(state.step)), host_array(state.done)
        if on_step is not None:
            on_step(step - 1, host_array(state.tokens)[:n], done[:n])
    out, n_gen = host_array(state.out), host_array(state.n_generated)
    stats.decode_s = time.perf_counter() - t_first
    stats.generated_tokens = int(n_gen[:n].sum())
    return GenerateOutput([out[i, : n_gen[i]].tolist() for i in range(n)], stats)


# ------------------------------------------------------- step-wise API (bench, eval)
def make_prefill(config: ModelConfig, plan, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 kernels: str = DEFAULT_KERNELS):
    """jitted (params, tokens [B, T], lengths [B]) -> (last logits [B, V], cache), the
    prefill attention run by the `kernels` backend."""
    check_config(config)
    prefill_chunk = check_prefill_chunk(prefill_chunk)
    return jax.jit(lambda p, t, n: forward_prefill(p, config, t, n, plan, all_logits=False,
                                                   chunk=prefill_chunk, kernels=kernels))


def make_decode_step(config: ModelConfig, plan):
    """jitted (params, tokens [B], positions [B], cache) -> (logits [B, V], cache), with
    the cache donated so XLA updates it in place."""
    check_config(config)

    def step(p, tok, pos, cache):
        return forward_decode(p, config, tok, pos, cache, plan)

    return jax.jit(step, donate_argnums=(3,))

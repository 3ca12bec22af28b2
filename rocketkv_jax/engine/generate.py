"""Batched generation: bucket the prompts, prefill them chunk by chunk, compress, decode.

The public entry is `generate_ids`. Its prompts are checked and packed into buckets
(`requests.py`); the host drives the compiled programs of `programs.py` (prefill chunks,
the start of decode) and the one decode loop (`decode.run_decode`), and reports progress
between them: prefill chunks done, tokens as they are produced. The KV cache lives on the
device across those calls, donated from one to the next.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks
from .. import sharding as shd
from ..kernels.backend import prefill_backend
from ..methods.base import NO_KERNELS, DensePlan
from ..methods.cost import fallback_note
from ..models.config import ModelConfig
from ..models.llama import forward_decode, forward_prefill, prefill_chunk_size
from ..names import DEFAULT_KERNELS, DEFAULT_PREFILL_CHUNK
from ..sampling import Sampling, prng_key
from . import programs
from .compile import params_struct
from .decode import LoopSettings, run_decode
from .requests import (
    GenerateError,
    check_callbacks,
    check_config,
    check_method,
    check_pad_id,
    check_prefill_chunk,
    check_request,
    check_sampling,
    check_stop_ids,
    pack_prompts,
    stop_tuple,
)

__all__ = ["GREEDY", "GenerateError", "GenerateOutput", "GenerateStats", "check_request",
           "generate_ids", "make_decode_step", "make_prefill", "prng_key"]
GREEDY = Sampling()


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
    kernels = prefill_backend(kernels)
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
    progs = programs.for_request(config, plan, B, T, C, loop, params_struct(params),
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
    run = run_decode(progs.decode, params, state, lens, n, on_step)
    return finish_stats(run, stats, t0)


def finish_stats(run, stats: GenerateStats, t0: float) -> GenerateOutput:
    """The output of a decode run started at `t0` (before the prefill's programs):
    prefill time up to its first token, then the decode steps' time."""
    stats.prefill_s += run.first_token_at - t0
    stats.decode_s = run.decode_s
    stats.generated_tokens = sum(map(len, run.tokens))
    return GenerateOutput(run.tokens, stats)


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

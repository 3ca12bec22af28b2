"""Measuring machinery of the benchmarks: benchmark models, the prefill that builds decode
caches, compiled decode steps with XLA's cost and memory analysis, interleaved timing, this
machine's memory bandwidth, and random kernel operands.

Caches are built the way `make_prefill(config, plan)` builds them, but with one model
forward per context instead of one per (context, method): the engine's shared prefill
(`rocketkv_jax.engine.shared_prefill`) runs the forward once and keeps every layer's raw
(k, v, q), and `compress_cache` applies a method's `compress` to it layer by layer
(tests/bench/test_bench_smoke.py checks the two caches are equal).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..engine import programs
from ..engine.compile import hashable_structs, params_struct
from ..engine.decode import LoopSettings
from ..engine.generate import GREEDY, make_decode_step
from ..engine.shared_prefill import (
    STORED_QUERY_WINDOW,
    RawPrefill,
    compress_program,
    raw_prefill_program,
)
from ..models.config import ModelConfig
from ..models.llama import forward_prefill
from ..models.params import random_params
from ..sampling import prng_key
from .config import MODEL_KEYS
from .roofline import llama31_8b_config
from .xla_stats import bytes_accessed, loop_aware_bytes, memory_stats


@dataclasses.dataclass
class BenchModel:
    """A model to benchmark: config, params and a deterministic prompt of any length."""

    key: str
    label: str
    config: ModelConfig
    params: Any
    prompt_ids: Callable[[int], np.ndarray]  # T -> [T] int32
    note: str = ""
    gguf: str | None = None  # the GGUF the weights came from (peers load the same file)


TINY_CONFIG = ModelConfig(
    model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=4096, tie_word_embeddings=False,
)


def _random_prompt(vocab: int, seed: int) -> Callable[[int], np.ndarray]:
    def ids(T: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(3, vocab, T).astype(np.int32)

    return ids


def _essay_prompt(tokenizer, fallback: Callable[[int], np.ndarray]) -> Callable[[int], np.ndarray]:
    """Paul Graham essay text (the eval haystack) tokenized, cut (or repeated) to T tokens."""
    try:
        from ..eval.tasks import load_sentences

        text = " ".join(load_sentences())
    except Exception:  # noqa: BLE001 - the essays are optional; random ids time the same
        return fallback
    corpus: list[np.ndarray] = []

    def ids(T: int) -> np.ndarray:
        if not corpus:
            corpus.append(np.asarray(tokenizer.encode(text), np.int32))
        c = corpus[0]
        return np.tile(c, -(-T // len(c)))[:T]

    return ids


def load_bench_model(key: str, *, model_path=None, layers: int = 2, vocab: int = 8192,
                     seed: int = 0) -> BenchModel:
    """Build a benchmark model by key (see MODEL_KEYS)."""
    if key == "smollm2":
        from ..convert import embedded_smollm2_gguf
        from ..model_store import load_model

        m = load_model(model_path, progress=False)
        gguf = None
        if model_path is None:
            try:
                gguf = str(embedded_smollm2_gguf())
            except Exception:  # noqa: BLE001 - peers are skipped without the GGUF
                gguf = None
        cfg = m.config
        return BenchModel(
            key, "SmolLM2-135M" if model_path is None else str(model_path), cfg, m.params,
            _essay_prompt(m.tokenizer, _random_prompt(cfg.vocab_size, seed)),
            note=f"real weights, float32, {cfg.num_layers} layers, {cfg.num_heads}/"
            f"{cfg.num_kv_heads} heads, head_dim {cfg.head_dim}, prompt = essay text",
            gguf=gguf,
        )
    if key == "llama8b-shape":
        cfg = llama31_8b_config(layers, vocab)
        params = random_params(cfg, seed=seed, scale=0.02)
        return BenchModel(
            key, f"Llama-3.1-8B shape, {layers} layers", cfg, params,
            _random_prompt(vocab, seed),
            note=f"random weights, float32, {layers} of 32 layers, vocab {vocab} (of 128256; "
            "keeps the LM head's share of the weight bytes near the real model's), "
            "prompt = random ids",
        )
    if key == "tiny":
        params = random_params(TINY_CONFIG, seed=seed, scale=0.1)
        return BenchModel(key, "tiny (CI smoke)", TINY_CONFIG, params,
                          _random_prompt(TINY_CONFIG.vocab_size, seed),
                          note="random weights, float32, 2 layers, hidden 256")
    raise ValueError(f"unknown benchmark model {key!r}; expected one of {', '.join(MODEL_KEYS)}")


def release_memory() -> None:
    """Return freed host memory to the OS (glibc keeps XLA's freed CPU buffers otherwise, and
    a later, larger prefill then adds to them)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- prefill
def _prompt_arrays(model: BenchModel, T: int, B: int):
    ids = model.prompt_ids(T)
    tokens = jnp.asarray(np.broadcast_to(ids, (B, T)))
    return tokens, jnp.full((B,), T, jnp.int32)


def compile_capture_prefill(model: BenchModel, T: int, B: int, kernels: str = "auto"):
    """Compile (do not run) the model's prefill of a [B, T] prompt in one chunk, keeping
    every layer's raw (k, v, q): (compiled, compile seconds)."""
    return raw_prefill_program(model.config, B, T, params_struct(model.params), None,
                               kernels)


def capture_prefill(model: BenchModel, T: int, B: int, compiled=None,
                    kernels: str = "auto") -> tuple[RawPrefill, float]:
    """Run the model's prefill forward once and keep every layer's (k, v, q):
    (RawPrefill, seconds)."""
    if compiled is None:
        compiled, _ = compile_capture_prefill(model, T, B, kernels)
    tokens, lengths = _prompt_arrays(model, T, B)
    t0 = time.perf_counter()
    _, raw = jax.block_until_ready(compiled(model.params, tokens, lengths))
    return raw, time.perf_counter() - t0


def synthetic_capture(config: ModelConfig, T: int, B: int, seed: int = 0,
                      dtype=jnp.float32) -> RawPrefill:
    """Standard normal k, v, q of the shapes a prefill produces (for contexts whose dense
    prefill does not fit in memory). A random-weight model's k, v, q are noise too; the
    decode step's cost does not depend on the values."""
    Ly, H, K, D = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim
    kk, kv, kq = jax.random.split(jax.random.wrap_key_data(prng_key(seed)), 3)
    k = jax.random.normal(kk, (Ly, B, K, T, D), dtype)  # [Ly, B, K, T, D]
    v = jax.random.normal(kv, (Ly, B, K, T, D), dtype)  # [Ly, B, K, T, D]
    W = STORED_QUERY_WINDOW
    q = jax.random.normal(kq, (Ly, B, H, W, D), dtype)  # [Ly, B, H, W, D]
    return RawPrefill(*jax.block_until_ready((k, v, q)), jnp.full((B,), T, jnp.int32))


def compress_cache(plan, raw: RawPrefill):
    """plan.compress on every layer of a raw prefill: the cache `make_prefill(config,
    plan)` returns (leading layer axis), and the seconds it took (compile excluded)."""
    fn, _ = compress_program(plan, hashable_structs(raw))
    t0 = time.perf_counter()
    cache = jax.block_until_ready(fn(raw))
    return cache, time.perf_counter() - t0


# ------------------------------------------------------------------------ decode step
@dataclasses.dataclass
class CompiledStep:
    """A compiled `make_decode_step(config, plan)` and what XLA says about it: bytes accessed
    as XLA reports it (layer loop counted once) and loop-aware (`loop_aware_bytes`)."""

    fn: Any
    compile_s: float
    bytes_accessed: float | None
    loop_bytes: float | None
    memory: dict[str, int] | None


def compile_step(config: ModelConfig, plan, params, cache, B: int) -> CompiledStep:
    """Lower and compile the jitted decode step for these (possibly abstract) arguments."""
    step = make_decode_step(config, plan)
    tok = jax.ShapeDtypeStruct((B,), jnp.int32)
    t0 = time.perf_counter()
    compiled = step.lower(params, tok, tok, cache).compile()
    compile_s = time.perf_counter() - t0
    return CompiledStep(compiled, compile_s, bytes_accessed(compiled),
                        loop_aware_bytes(compiled), memory_stats(compiled))


def abstract_cache(config: ModelConfig, plan, params, T: int, B: int):
    """Shapes of the cache `make_prefill(config, plan)` returns for a [B, T] prompt."""
    _, cache = jax.eval_shape(
        lambda p, t, n: forward_prefill(p, config, t, n, plan, all_logits=False), params,
        jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32),
    )
    return cache


def time_interleaved(
    steps: dict[str, Any], caches: dict[str, Any], params, *, B: int, T: int, warmup: int,
    iters: int,
) -> dict[str, list[float]]:
    """Seconds per decode step of each method, round-robin: every step runs each method once
    (starting from a rotating method), so load changes hit all methods alike.

    steps[name] is a compiled decode step, caches[name] its cache (donated and replaced
    every step). Step i decodes token 1 at position T + i; the first `warmup` are dropped.
    """
    names = list(steps)
    tok = jnp.ones((B,), jnp.int32)
    positions = [jnp.full((B,), T + i, jnp.int32) for i in range(warmup + iters)]
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + iters):
        r = i % len(names)
        for n in names[r:] + names[:r]:
            t0 = time.perf_counter()
            logits, caches[n] = steps[n](params, tok, positions[i], caches[n])
            logits.block_until_ready()
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------- whole program
def generate_program_memory(model: BenchModel, plan, T: int, N: int, B: int):
    """Memory analysis of the programs `generate_ids` runs for a [B, T] prompt (one
    prefill chunk) and N new tokens: (stats of the program with the largest peak, with its
    "program" name, total compile seconds). They run one after another, holding only the
    state they pass on, so the largest program's peak is the generation's."""
    progs = programs.for_request(model.config, plan, B, T, T, LoopSettings(N, GREEDY, (), 0),
                                 params_struct(model.params))
    stats = []
    for name in ("init", "chunk", "start", "decode"):
        m = memory_stats(getattr(progs, name))
        if m is not None:
            stats.append({**m, "program": name})
    return (max(stats, key=lambda m: m["peak"]) if stats else None), progs.compile_s


# ------------------------------------------------------------------- this machine
def measure_bandwidth(nbytes: int, repeats: int) -> dict:
    """This CPU's memory bandwidth over an `nbytes` float32 buffer, best of `repeats`:
    copy = numpy copy into a preallocated buffer (read + write bytes counted), read = a jitted
    sum (the decode step's traffic is reads). GB/s; best = the larger."""
    n = nbytes // 4
    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the destination's pages in
    copy = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy.append(2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    del dst
    x = jnp.asarray(src)
    del src
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    read = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        read.append(x.nbytes / (time.perf_counter() - t0) / 1e9)
    del x
    release_memory()
    return {"buffer_bytes": n * 4, "repeats": repeats, "copy_GBps": max(copy),
            "read_GBps": max(read), "best_GBps": max(max(copy), max(read)),
            "copy_all": copy, "read_all": read}


def best_bandwidth(results: dict) -> float:
    """Bytes per second the roofline divides by: the best of every bandwidth measurement."""
    return max(b["best_GBps"] for b in results["bandwidth"]) * 1e9


# ------------------------------------------------------------------- inputs
def broadcast_rows(cache, struct):
    """A cache compressed from one row, repeated to the batch of `struct` (its shapes at
    batch B), materialized. Every method compresses each row on its own, so this is the
    cache of B copies of that row, without holding a B-row capture in memory."""
    def grow(x, s):
        if x.shape == s.shape:
            return x
        axes = [i for i, (a, b) in enumerate(zip(x.shape, s.shape, strict=True)) if a != b]
        if len(axes) != 1 or x.shape[axes[0]] != 1:
            raise ValueError(f"cannot broadcast a {x.shape} cache leaf to {s.shape}")
        return jnp.broadcast_to(x, s.shape).astype(s.dtype)

    return jax.block_until_ready(jax.tree.map(grow, cache, struct))


def make_operands(b, kv, g, d, cache, page_size, dtype, seed=0):
    """Random decode operands for one layer: q, k, v, page_max, page_min, lengths."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, kv, g, d), dtype)
    k = jax.random.normal(keys[1], (b, kv, cache, d), dtype)
    v = jax.random.normal(keys[2], (b, kv, cache, d), dtype)
    pages = -(-cache // page_size)
    pad = pages * page_size - cache
    kp = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=jnp.nan)
    kp = kp.reshape(b, kv, pages, page_size, d)
    page_max = jnp.nanmax(kp, axis=3)  # [B, K, P, D]
    page_min = jnp.nanmin(kp, axis=3)
    lengths = jnp.full((b,), cache, jnp.int32)
    return q, k, v, page_max, page_min, lengths

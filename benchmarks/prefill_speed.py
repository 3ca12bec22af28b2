"""Prefill speed on real SmolLM2-135M: ours (chunked blockwise, jitted) against
transformers (torch, sdpa attention) on the same prompt, same thread count, one run.

    python benchmarks/prefill_speed.py [--contexts 2k,4k,8k] [--chunk 4096] [--reps 2]

Each (context, implementation) is timed `reps` times, interleaved, after one warm-up
(compile) run; the median is reported with the ratio ours / transformers (< 1 is faster).
Only the forward over the prompt is timed: our last-token logits plus the full KV cache,
transformers' `model(ids, use_cache=True, logits_to_keep=1)`, which is how its `generate`
runs the prefill (the LM head on the last token only; on every token it would add about
15% to transformers' time at 4k).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rocketkv_jax.bench.config import token_counts
from rocketkv_jax.bench.peer_hf import load_smollm2
from rocketkv_jax.convert import embedded_smollm2_gguf
from rocketkv_jax.engine.generate import make_prefill
from rocketkv_jax.methods import make_method
from rocketkv_jax.model_store import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="2k,4k,8k")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    contexts = token_counts(args.contexts, "contexts")
    ours_model = load_model(None)
    hf = load_smollm2(embedded_smollm2_gguf())
    hf.set_attn_implementation("sdpa") if hasattr(hf, "set_attn_implementation") else None
    rng = np.random.default_rng(0)
    print(f"# prefill on SmolLM2-135M, f32, {threads} threads, {platform.machine()}, "
          f"jax {jax.__version__}, torch {torch.__version__}, chunk {args.chunk}")
    print("| T | ours s | transformers s | ours tok/s | transformers tok/s | ours / transformers |")
    print("|---|---|---|---|---|---|")
    for T in contexts:
        T = min(T, ours_model.config.max_position_embeddings - 1)
        ids = rng.integers(10, ours_model.config.vocab_size, (1, T)).astype(np.int32)
        plan = make_method("full").plan(ours_model.config, T, 1)
        prefill = make_prefill(ours_model.config, plan, args.chunk)
        tokens, lengths = jnp.asarray(ids), jnp.asarray([T], jnp.int32)

        def ours(prefill=prefill, tokens=tokens, lengths=lengths):
            jax.block_until_ready(prefill(ours_model.params, tokens, lengths))

        def theirs(ids=ids):
            with torch.inference_mode():
                hf(torch.as_tensor(ids, dtype=torch.long), use_cache=True, logits_to_keep=1)

        ours()
        theirs()  # warm-up (compile / allocator)
        times = {"ours": [], "hf": []}
        for _ in range(args.reps):
            for name, fn in (("ours", ours), ("hf", theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        a, b = statistics.median(times["ours"]), statistics.median(times["hf"])
        print(f"| {T} | {a:.2f} | {b:.2f} | {T / a:.0f} | {T / b:.0f} | {a / b:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

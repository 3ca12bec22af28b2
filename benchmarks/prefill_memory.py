"""Prefill temp memory from XLA's memory analysis (compiled, never run): the dense
[B, H, T, T] prefill against the chunked blockwise one, batch 1, last-token logits.

    python benchmarks/prefill_memory.py [--contexts 4k,8k,16k,32k] [--chunk 4096] [--quick]

Shapes: SmolLM2-135M (30 layers, 9/3 heads, D 64) and Llama-3.1-8B's layers (2 layers,
32/8 heads, D 128), with f32 weights as the converted checkpoints hold them. Methods: full
and rocketkv at M=256. The dense column is only compiled up to --dense-max (its temp
reaches hundreds of GiB and XLA's compile of it takes minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time

import jax
import jax.numpy as jnp

from rocketkv_jax import checks
from rocketkv_jax.bench.config import token_counts
from rocketkv_jax.bench.roofline import llama31_8b_config
from rocketkv_jax.bench.xla_stats import memory_stats
from rocketkv_jax.methods import make_method
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.llama import forward_prefill

SMOLLM2 = ModelConfig(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=100000.0, max_position_embeddings=1 << 17, tie_word_embeddings=True,
)


def temp_gib(config: ModelConfig, plan, T: int, **kw) -> float:
    params = {path: jax.ShapeDtypeStruct(shape, jnp.float32)
              for path, shape in config.param_shapes().items()}
    tree: dict = {"layers": {}}
    for path, s in params.items():
        *parents, leaf = path.split("/")
        (tree[parents[0]] if parents else tree)[leaf] = s
    fn = jax.jit(lambda p, t, n: forward_prefill(p, config, t, n, plan, all_logits=False, **kw))
    compiled = fn.lower(tree, jax.ShapeDtypeStruct((1, T), jnp.int32),
                        jax.ShapeDtypeStruct((1,), jnp.int32)).compile()
    return memory_stats(compiled)["temp"] / 2**30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="4k,8k,16k,32k,64k,128k")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--dense-max", default="8k", help="largest context compiled densely")
    ap.add_argument("--quick", action="store_true", help="4k and 8k on 2 SmolLM2 layers (CI)")
    args = ap.parse_args(argv)
    contexts = token_counts(args.contexts, "contexts")
    dense_max = checks.token_count(args.dense_max, "--dense-max")
    models = {"smollm2-135m": SMOLLM2, "llama3.1-8b-shape-2l": llama31_8b_config(layers=2)}
    if args.quick:
        contexts, dense_max = [4096, 8192], 4096
        models = {"smollm2-2l": dataclasses.replace(SMOLLM2, num_layers=2)}
    print(f"# prefill temp memory (GiB, XLA memory_analysis), batch 1, chunk {args.chunk}; "
          f"jax {jax.__version__} on {platform.processor() or platform.machine()}")
    print("| model | method | T | dense | chunked blockwise | ratio to previous T |")
    print("|---|---|---|---|---|---|")
    for label, cfg in models.items():
        for method in ("full", "rocketkv"):
            prev = None
            for T in contexts:
                m = make_method(method, 256)
                plan = m.plan(cfg, T, 64)
                t0 = time.perf_counter()
                dense = temp_gib(cfg, plan, T, kernels="dense") if T <= dense_max else None
                ours = temp_gib(cfg, plan, T, chunk=args.chunk)
                growth = f"{ours / prev:.2f}x" if prev else ""
                prev = ours
                d = f"{dense:.2f}" if dense is not None else "-"
                print(f"| {label} | {method} | {T} | {d} | {ours:.2f} | {growth} |", flush=True)
                print(f"  ({time.perf_counter() - t0:.0f} s to compile)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

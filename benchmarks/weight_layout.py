"""End-to-end `generate` with stacked and per-layer weights, measured in one run.

    python benchmarks/weight_layout.py [--model smollm2|qwen2.5-coder-0.5b|llama8b-shape|tiny]
                                       [--context 7936]
                                       [--new-tokens 64] [--batch 1] [--budget 256]
                                       [--methods full,rocketkv] [--quick]

`generate --weight-layout per-layer` keeps one array per layer, each matmul in a switch
over the layers, so XLA:CPU's matmuls read each layer's weights in place instead of a copy
of a slice of the stacked arrays (benchmarks/weight_slicing.py); the price is a kernel per
layer and matmul (compile time, memory mappings). For each method this runs
`generate_ids` on the same prompt with both layouts: a first call (compile included, the
persistent compilation cache off) and a second, warm call. It prints compile seconds, warm
prefill seconds and warm decode tokens/s per layout, the per-layer / stacked ratios, and
whether the two layouts generated the same tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("ROCKETKV_JAX_COMPILE_CACHE", "off")

from rocketkv_jax.bench import measure as bd  # noqa: E402
from rocketkv_jax.bench.config import parse_methods  # noqa: E402
from rocketkv_jax.bench.grid import machine_line  # noqa: E402
from rocketkv_jax.engine.generate import generate_ids  # noqa: E402
from rocketkv_jax.methods import make_method  # noqa: E402
from rocketkv_jax.model_store import NAMED_MODELS  # noqa: E402
from rocketkv_jax.models.params import unstack_layers  # noqa: E402
from rocketkv_jax.names import WEIGHT_LAYOUTS  # noqa: E402

# named models with real weights beside the embedded SmolLM2 (`rocketkv models`)
REAL_MODELS = tuple(name for name in NAMED_MODELS if name != "smollm2")


def measure(bm: bd.BenchModel, method: str, budget: int, T: int, N: int, B: int) -> dict:
    prompts = [bm.prompt_ids(T).tolist()] * B
    kv = make_method(method, budget)
    out = {}
    for layout in WEIGHT_LAYOUTS:  # one layout's weights in memory at a time
        params = bm.params if layout == "stacked" else unstack_layers(bm.params)
        first = generate_ids(params, bm.config, prompts, kv, max_new_tokens=N, stop_ids=[])
        warm = generate_ids(params, bm.config, prompts, kv, max_new_tokens=N, stop_ids=[])
        out[layout] = {"compile_s": first.stats.compile_s, "prefill_s": warm.stats.prefill_s,
                       "decode_tok_s": warm.stats.decode_tokens_per_s,
                       "tokens": [list(map(int, t)) for t in warm.tokens]}
        del params
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=("smollm2", *REAL_MODELS, "llama8b-shape",
                                                          "tiny"),
                   help="a benchmark model, or a named model's real weights (default: smollm2)")
    p.add_argument("--context", type=int, default=7936, help="prompt tokens (default: 7936)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt (default: 1)")
    p.add_argument("--budget", type=int, default=256, help="token budget M (default: 256)")
    p.add_argument("--methods", default="full,rocketkv", help="KV methods (default: full,rocketkv)")
    p.add_argument("--quick", action="store_true", help="tiny model, 256 tokens, 8 new")
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.context, a.new_tokens, a.budget = "tiny", 256, 8, 64
    for k in ("context", "new_tokens", "batch", "budget"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    methods = parse_methods(a.methods)
    bm = (bd.load_bench_model("smollm2", model_path=a.model) if a.model in REAL_MODELS
          else bd.load_bench_model(a.model))
    if a.context + a.new_tokens - 1 > bm.config.max_position_embeddings:
        p.error(f"--context {a.context} + --new-tokens {a.new_tokens} needs "
                f"{a.context + a.new_tokens - 1} positions; {bm.label} has "
                f"{bm.config.max_position_embeddings}")
    print(machine_line())
    print(f"{bm.label} ({bm.config.num_layers} layers), prompt {a.context} tokens x {a.batch}, "
          f"{a.new_tokens} new tokens, greedy, budget {a.budget}; compile = the first call "
          "(persistent compilation cache off), prefill and decode = a second, warm call")
    head = (f"{'method':<10} {'layout':<10} {'compile s':>9} {'prefill s':>9} "
            f"{'decode tok/s':>12}")
    print(head)
    summary = []
    for m in methods:
        r = measure(bm, m, a.budget, a.context, a.new_tokens, a.batch)
        for layout in WEIGHT_LAYOUTS:
            x = r[layout]
            print(f"{m:<10} {layout:<10} {x['compile_s']:9.1f} {x['prefill_s']:9.2f} "
                  f"{x['decode_tok_s']:12.1f}")
        s, q = r["stacked"], r["per-layer"]
        summary.append(
            f"{m}: per-layer / stacked: compile {q['compile_s'] / s['compile_s']:.2f}x, "
            f"prefill time {q['prefill_s'] / s['prefill_s']:.2f}x, decode speed "
            f"{q['decode_tok_s'] / s['decode_tok_s']:.2f}x; same tokens: "
            f"{'yes' if q['tokens'] == s['tokens'] else 'NO'}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

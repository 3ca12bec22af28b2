"""How much of the generate program's peak memory is prefill attention scores, per method.

Compiles (does not run) the one program `generate_ids` runs -- prefill, compress and the
while-loop decode -- for the tiny benchmark model at one prompt length, and prints XLA's
temp memory per method in units of one [B, H, T, T] float32 score buffer. Seconds on CPU:

    python benchmarks/generate_peak.py [--context 2048] [--budget 128]
"""

import argparse

from rocketkv_jax.bench.measure import abstract_cache, generate_program_memory, load_bench_model
from rocketkv_jax.cache import tree_bytes
from rocketkv_jax.methods import make_method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=2048, help="prompt length T")
    p.add_argument("--budget", type=int, default=128, help="token budget of the methods")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    model = load_bench_model("tiny")
    cfg, T, N = model.config, args.context, args.new_tokens
    scores = cfg.num_heads * T * T * 4
    print(f"tiny model ({cfg.num_layers} layers, H={cfg.num_heads}), T={T}, N={N}, batch 1; "
          f"one [B, H, T, T] f32 buffer = {scores / 1e6:.1f} MB")
    print(f"{'method':>10}  {'M':>5}  {'KV cache MB':>11}  {'temp MB':>8}  {'temp / scores':>13}")
    for name in ("full", "streaming", "snapkv", "quest", "rocketkv"):
        method = make_method(name, args.budget)
        plan = method.plan(cfg, T, N)
        temp = generate_program_memory(model, plan, T, N, 1)[0]["temp"]
        cache = abstract_cache(cfg, plan, model.params, T, 1)  # all layers
        cache_mb = tree_bytes(cache)
        M = "-" if name == "full" else str(args.budget)
        print(f"{name:>10}  {M:>5}  {cache_mb / 1e6:>11.2f}  {temp / 1e6:>8.1f}  "
              f"{temp / scores:>13.2f}")


if __name__ == "__main__":
    main()

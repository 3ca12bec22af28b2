"""How much of the generate program's peak memory is prefill attention scores, per method.

Compiles (does not run) the one program `generate_ids` runs -- prefill, compress and the
while-loop decode -- for the tiny benchmark model at one prompt length, and prints XLA's
temp memory per method in units of one [B, H, T, T] float32 score buffer. Seconds on CPU:

    python benchmarks/generate_peak.py [--context 2048] [--budget 128]
"""

import argparse

import jax
import jax.numpy as jnp

from rocketkv_jax.bench_decode import TINY_CONFIG, memory_stats
from rocketkv_jax.generate import GREEDY, _compiled, _params_struct
from rocketkv_jax.methods import make_method
from rocketkv_jax.models.params import random_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=2048, help="prompt length T")
    p.add_argument("--budget", type=int, default=128, help="token budget of the methods")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    cfg, T, N = TINY_CONFIG, args.context, args.new_tokens
    params = jax.tree.map(jnp.asarray, random_params(cfg))
    scores = cfg.num_heads * T * T * 4
    print(f"tiny model ({cfg.num_layers} layers, H={cfg.num_heads}), T={T}, N={N}, batch 1; "
          f"one [B, H, T, T] f32 buffer = {scores / 1e6:.1f} MB")
    print(f"{'method':>10}  {'M':>5}  {'KV cache MB':>11}  {'temp MB':>8}  {'temp / scores':>13}")
    for name in ("full", "streaming", "snapkv", "quest", "rocketkv"):
        method = make_method(name) if name == "full" else make_method(name, args.budget)
        plan = method.plan(cfg, T, N)
        compiled, _ = _compiled(cfg, plan, 1, T, N, GREEDY, (), 0, _params_struct(params))
        temp = memory_stats(compiled)["temp"]
        kvq = [jax.ShapeDtypeStruct((1, K, T, cfg.head_dim), jnp.float32)
               for K in (cfg.num_kv_heads, cfg.num_kv_heads, cfg.num_heads)]
        cache = jax.eval_shape(plan.compress, *kvq, jax.ShapeDtypeStruct((1,), jnp.int32))
        cache_mb = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache)) * cfg.num_layers
        M = "-" if name == "full" else str(args.budget)
        print(f"{name:>10}  {M:>5}  {cache_mb / 1e6:>11.2f}  {temp / 1e6:>8.1f}  "
              f"{temp / scores:>13.2f}")


if __name__ == "__main__":
    main()

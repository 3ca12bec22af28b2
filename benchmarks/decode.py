"""Decode benchmark: every KV method vs full KV (step time ratios, KV bytes, XLA bytes, peak
memory) and vs peers (transformers, kvpress), measured in one run.

A thin wrapper of `rocketkv bench` (its flags are in rocketkv_jax/bench/, the grid in
benchmarks/bench_grid.py):

    python benchmarks/decode.py --quick      # CI smoke, well under a minute
    python benchmarks/decode.py              # full grid + peers (results: docs/benchmarks.md)
    python benchmarks/decode.py --help
"""

import sys

from rocketkv_jax.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/decode.py"))

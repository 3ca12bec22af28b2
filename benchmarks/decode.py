"""Decode benchmark: every KV method vs full KV (step time ratios, KV bytes, XLA bytes, peak
memory) and vs peers (transformers, kvpress), measured in one run.

The same as `rocketkv bench` (its flags: rocketkv_jax/cli/bench.py, the harness:
rocketkv_jax/bench/):

    python benchmarks/decode.py --quick      # CI smoke, well under a minute
    python benchmarks/decode.py              # full grid + peers (results: docs/benchmarks.md)
    python benchmarks/decode.py --help
"""

import sys

from rocketkv_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

"""The benchmark harness: `rocketkv bench` (its flags: rocketkv_jax/cli/bench.py) and the
measuring code the scripts in benchmarks/ share.

- `config.py`: a run's settings (`BenchConfig`), resolved and checked from flag values.
- `grid.py`: the decode grid of every KV method against full KV, and `--report`.
- `measure.py`: benchmark models, decode caches from one prefill, compiled decode steps
  with XLA's statistics, interleaved timing, memory bandwidth, kernel operands.
- `roofline.py`: bytes a decode step moves, from shapes; the H100 roofline.
- `tables.py`: byte counts and tables, and the decode grid's tables.
- `peers.py`, `peer_hf.py`: Hugging Face transformers and kvpress on the same prompt
  (`peer_hf.py` runs by path in another interpreter and imports nothing of this package).
- `calibrate.py`: `rocketkv bench --calibrate`, the cost model's constants for this device.
- `gpu_parts.py`, `gpu_report.py`: the parts and the record of `benchmarks/gpu_check.py`.
- `xla_stats.py`: XLA's memory and cost statistics of a compiled program.
- `script.py`: what the scripts share for their command line (a --model that cannot load).
"""

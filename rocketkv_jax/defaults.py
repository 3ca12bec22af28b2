"""Defaults shared by the library and the CLI, in a module that imports nothing, so that
`rocketkv --help` can show them without importing JAX."""

DEFAULT_PREFILL_CHUNK = 4096  # prompt tokens per prefill chunk (benchmarks/prefill.py)

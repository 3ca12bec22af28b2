"""The engine: every compiled program and the host loops that drive them.

- `compile.py`: how a program is compiled and kept (`compile_program`, `program_cache`,
  `clear_caches`), the abstract arguments of program caches, JAX's persistent cache.
- `requests.py`: a generate request's checks, and prompts packed into buckets.
- `programs.py`: the prefill programs of one generate request (init, chunk, start).
- `decode.py`: the decode state and program, and the one host decode loop (`run_decode`).
- `generate.py`: `generate_ids`, its statistics, and the step-wise `make_prefill` /
  `make_decode_step`.
- `shared_prefill.py`: prefill once, compress with many plans (eval, benchmarks).
- `conversation.py`, `conversation_programs.py`: multi-turn conversations that keep their
  KV cache.

The engine runs the model (`rocketkv_jax.models`) with the KV methods' plans
(`rocketkv_jax.methods`); eval, bench and the CLI call it, never the other way round.
"""

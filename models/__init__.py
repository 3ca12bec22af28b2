"""`rocketkv_jax.models`: this folder, installed under that name (pyproject's package-dir;
a top-level `models` package would collide with other projects). `from
rocketkv_jax.models.llama import forward_decode` reads models/llama.py.

The functional decoders (Llama, Mistral, Qwen2, Qwen3): `config.py` (ModelConfig and every
parameter's shape and axes), `params.py`, `llama.py` (prefill and decode), `layers.py`,
`rope.py`, and `plan.py`, the contract a KV method's plan fulfils. Nothing here imports the
methods, the engine or the CLI.
"""

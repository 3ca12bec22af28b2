"""A tiny random Llama / Mistral decoder shared by the model-level tests (importable from
every test: tests/ is on sys.path through its conftest)."""

import functools

import jax.numpy as jnp
import numpy as np

from rocketkv_jax.models.config import ModelConfig


def tiny_config(sliding_window=None) -> ModelConfig:
    return ModelConfig(
        model_type="mistral" if sliding_window else "llama", vocab_size=61, hidden_size=48,
        intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
        tie_word_embeddings=False, sliding_window=sliding_window,
    )


@functools.cache
def tiny_params(config: ModelConfig):
    rng = np.random.default_rng(0)
    params: dict = {"layers": {}}
    for path, shape in config.param_shapes().items():
        w = rng.standard_normal(shape) * 0.02
        if path.endswith("norm"):
            w = 1.0 + w  # RMSNorm gains near 1, so attention is not washed out
        if path == "embed":
            w = w * 50  # larger activations make the attention patterns sharper
        *parents, leaf = path.split("/")
        (params[parents[0]] if parents else params)[leaf] = jnp.asarray(w, jnp.float32)
    return params

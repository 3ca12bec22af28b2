"""A second process generating the same request shape loads every program from JAX's
persistent compilation cache instead of compiling it (what `rocketkv generate` relies on
for a fast second run): counted with JAX's own cache-hit / cache-miss monitoring events."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import jax
from jax import monitoring
from rocketkv_jax.engine.compile import enable_compilation_cache
from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.methods import make_method
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.params import random_params

enable_compilation_cache(single_device=True)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # even the tiny init
events = {"hits": 0, "misses": 0}
def listen(name, **kw):
    if name == "/jax/compilation_cache/cache_hits":
        events["hits"] += 1
    elif name == "/jax/compilation_cache/cache_misses":
        events["misses"] += 1
monitoring.register_event_listener(listen)
cfg = ModelConfig(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
                  eos_token_ids=())
params = random_params(cfg, seed=0, scale=0.3)
method = make_method(sys.argv[1], None if sys.argv[1] == "full" else 32,
                     **({} if sys.argv[1] == "full" else {"stage2": "on"}))
out = generate_ids(params, cfg, [[3 + i % 90 for i in range(197)]], method, max_new_tokens=4,
                   prefill_chunk=64)
print(json.dumps({**events, "tokens": out.tokens}))
"""


def _run(method, cache_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ROCKETKV_JAX_COMPILE_CACHE": str(cache_dir)}
    r = subprocess.run([sys.executable, "-c", SCRIPT, method], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["full", "rocketkv"])  # rocketkv: custom_partitioning ops
def test_second_process_loads_every_program_from_the_cache(tmp_path, method):
    first = _run(method, tmp_path)
    assert first["misses"] >= 4 and first["hits"] == 0, first  # init, chunk, start, decode
    second = _run(method, tmp_path)
    assert second["misses"] == 0 and second["hits"] == first["misses"], second
    assert second["tokens"] == first["tokens"]

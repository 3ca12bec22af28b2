"""Sharded checks of the Qwen-family params (q/k/v, o and MLP biases, q/k RMSNorm) on 4
forced host devices, run by test_sharding_qwen.py in ONE subprocess (XLA_FLAGS must be set
before JAX starts). Prints one JSON report on the last line.

usage: python qwen_sharded_checks.py
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rocketkv_jax import sharding as shd  # noqa: E402
from rocketkv_jax.engine import generate as gen  # noqa: E402
from rocketkv_jax.methods import make_method, method_hparams  # noqa: E402
from rocketkv_jax.models.config import ModelConfig  # noqa: E402
from rocketkv_jax.models.params import flatten, random_params  # noqa: E402

_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
             num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
             max_position_embeddings=512, eos_token_ids=())
# Qwen2.5-Coder's shape in small: 14 query / 2 KV heads (G = 7), q/k/v biases, tied head.
# "qwen3-biases": q/k norm plus every bias (o and MLP too), 4 / 2 heads, untied.
CONFIGS = {
    "qwen2": ModelConfig(model_type="qwen2", num_heads=14, qkv_bias=True,
                         tie_word_embeddings=True, **_BASE),
    "qwen3-biases": ModelConfig(model_type="qwen3", num_heads=4, qkv_bias=True, o_bias=True,
                                mlp_bias=True, qk_norm=True, tie_word_embeddings=False,
                                **_BASE),
}
PROMPT_LENS = (120, 97)  # bucket 128
BUDGET, NEW = 32, 8
MESHES = ((1, 2), (2, 2))  # model=2 divides the 2 KV heads; (1, 2) on 2 of the 4 devices
NEW_PARAMS = ("bq", "bk", "bv", "bo", "b_gate", "b_up", "b_down", "q_norm", "k_norm")


def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, 128, n).tolist() for n in PROMPT_LENS]


def method(name):
    # stage2 "on": the sparse paths are what sharding must keep exact (see sharded_checks)
    kw = {"stage2": "on"} if "stage2" in method_hparams(name) else {}
    return make_method(name, None if name == "full" else BUDGET, **kw)


def main():
    report = {"devices": jax.device_count()}
    for tag, cfg in CONFIGS.items():
        single = random_params(cfg, seed=5, scale=0.3)
        for name in ("full", "rocketkv"):
            out = gen.generate_ids(single, cfg, prompts(), method(name), max_new_tokens=NEW)
            report[f"{tag}/{name}/single"] = out.tokens
        for data, model in MESHES:
            mesh = shd.make_mesh(data, model, jax.devices()[: data * model])
            params = shd.place_params(single, cfg, mesh)
            for name in ("full", "rocketkv"):
                out = gen.generate_ids(params, cfg, prompts(), method(name),
                                       max_new_tokens=NEW, mesh=mesh)
                report[f"{tag}/{name}/{data}x{model}"] = out.tokens
            report[f"{tag}/params/{data}x{model}"] = {
                path.split("/")[-1]: {"spec": str(x.sharding.spec), "shape": list(x.shape),
                                      "shard_shape": list(x.addressable_shards[0].data.shape)}
                for path, x in flatten(params).items()
                if path.split("/")[-1] in NEW_PARAMS
            }
        try:
            gen.generate_ids(single, cfg, prompts(), method("full"), max_new_tokens=2,
                             mesh=shd.make_mesh(1, 4))
            report[f"{tag}/model4"] = None
        except shd.MeshError as e:
            report[f"{tag}/model4"] = str(e)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

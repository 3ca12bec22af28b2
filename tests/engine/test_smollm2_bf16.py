"""SmolLM2 with its params cast to bf16 against the same model in f32: the greedy tokens
of a chat prompt agree over the first steps, for full KV and for rocketkv. The wider
measurement (teacher-forced KL and agreement over essay prompts, beside transformers' own
bf16 against f32) is benchmarks/bf16_agreement.py."""

import jax
import jax.numpy as jnp
import pytest

from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.eval.tasks import default_essays_dir, normalize_essay
from rocketkv_jax.methods import make_method
from rocketkv_jax.model_store import load_model
from rocketkv_jax.models.params import cast_params

# teacher-forced on essay prompts, the first bf16 / f32 disagreement came at step 15 or
# later (docs/benchmarks.md, "bf16 against f32"): a near tie may flip past that
STEPS = 10


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    return load_model(smollm2_checkpoint)


@pytest.mark.parametrize("method", ["full", "rocketkv"])
def test_bf16_greedy_tokens_equal_f32_over_the_first_steps(smol, method):
    bf16 = cast_params(smol.params, jnp.bfloat16)
    assert jax.tree.leaves(bf16)[0].dtype == jnp.bfloat16
    essay = normalize_essay(sorted(default_essays_dir().glob("*.txt"))[0].read_text())
    prompt = smol.tokenizer.encode(essay, add_special_tokens=False)[:600]
    kv = make_method(method, 128)  # rocketkv keeps 128 of the 600 prompt tokens

    def greedy(params):
        return generate_ids(params, smol.config, [prompt], kv, max_new_tokens=STEPS,
                            stop_ids=[]).tokens[0]

    want, got = greedy(smol.params), greedy(bf16)
    assert len(want) == len(got) == STEPS
    assert got == want, (smol.tokenizer.decode(got), smol.tokenizer.decode(want))

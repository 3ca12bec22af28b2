"""Chunked prefill on the real model (SmolLM2-135M-Instruct) at 2k: the same greedy tokens
and the same compressed cache as the one-shot dense prefill."""

import jax
import numpy as np
import pytest

from rocketkv_jax.engine.generate import generate_ids, make_prefill
from rocketkv_jax.eval.tasks import make_sample
from rocketkv_jax.methods import make_method
from rocketkv_jax.model_store import load_model
from rocketkv_jax.models.llama import forward_prefill


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    return load_model(smollm2_checkpoint)


@pytest.fixture(scope="module")
def prompt(smol):
    sample = make_sample("niah_single", smol.tokenizer, context_length=2048, index=1, seed=2)
    return smol.tokenizer.encode(sample.prompt)


@pytest.mark.slow
@pytest.mark.parametrize("method,budget", [("full", None), ("rocketkv", 256)])
def test_chunked_generate_equals_one_pass(smol, prompt, method, budget):
    m = make_method(method, budget)
    one = generate_ids(smol.params, smol.config, [prompt], m, max_new_tokens=12,
                       prefill_chunk=None)
    chunked = generate_ids(smol.params, smol.config, [prompt], m, max_new_tokens=12,
                           prefill_chunk=512)
    assert chunked.stats.prefill_chunk == 512 and one.stats.prefill_chunk > 2000
    assert chunked.tokens == one.tokens


@pytest.mark.slow
def test_chunked_prefill_keeps_the_same_tokens_as_dense(smol, prompt):
    T = len(prompt)
    plan = make_method("snapkv++", 256).plan(smol.config, T, 8)
    tokens = np.asarray([prompt], np.int32)
    lengths = np.asarray([T], np.int32)
    dense = jax.jit(lambda p, t, n: forward_prefill(p, smol.config, t, n, plan,
                                                    all_logits=False, kernels="dense"))
    logits_d, cache_d = dense(smol.params, tokens, lengths)
    logits_c, cache_c = make_prefill(smol.config, plan, 512)(smol.params, tokens, lengths)
    np.testing.assert_array_equal(np.asarray(cache_c.pos), np.asarray(cache_d.pos))
    np.testing.assert_allclose(np.asarray(logits_c), np.asarray(logits_d), atol=2e-4, rtol=1e-4)

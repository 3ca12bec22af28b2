"""Python API calls with arguments of the wrong type or range fail at our boundary, with
our message naming the argument, before anything reaches JAX or numpy."""

import math
import traceback

import numpy as np
import pytest
from tiny_checkpoint import tiny_checkpoint_config, tiny_params

from rocketkv_jax import load_model, make_decode_step, make_method, make_prefill
from rocketkv_jax.engine.conversation import Conversation
from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.methods import Full
from rocketkv_jax.model_store import ModelNotFoundError
from rocketkv_jax.sampling import Sampling

CFG = tiny_checkpoint_config()
PARAMS = tiny_params(CFG)
PLAN = Full().plan(CFG, 16, 2)


def _generate(**kw):
    kw = {"prompts": [[1, 2, 3]], "method": Full(), "max_new_tokens": 2, **kw}
    return generate_ids(PARAMS, CFG, kw.pop("prompts"), kw.pop("method"), **kw)


def _conversation(**kw):
    return Conversation(PARAMS, CFG, kw.pop("method", Full()), **{"capacity": 32, **kw})


def _generate_turn(**kw):
    conv = _conversation()
    conv.append([1, 2, 3])
    return conv.generate(kw.pop("max_new_tokens", 2), **kw)


CASES = [
    (lambda: _generate(max_new_tokens=2.0), "max_new_tokens must be an integer"),
    (lambda: _generate(max_new_tokens="2"), "max_new_tokens must be an integer"),
    (lambda: _generate(max_new_tokens=2**40), r"max_new_tokens must be < 2\*\*31"),
    (lambda: _generate(prompts=5), "prompts must be a list of token-id lists"),
    (lambda: _generate(prompts="w1 w2"), "tokenize text first"),
    (lambda: _generate(prompts=[7]), "prompt 0 must be a list of token ids, got int"),
    (lambda: _generate(prompts=[[1.5, 2.0]]), "prompt 0 must be a sequence of integer"),
    (lambda: _generate(method="rocketkv"), r"not its name: pass make_method\('rocketkv'"),
    (lambda: _generate(method=None), "method must be a KV method"),
    (lambda: _generate(sampling={"temperature": 1.0}), "sampling must be a Sampling"),
    (lambda: _generate(stop_ids=2), "stop_ids must be a list of token ids or None"),
    (lambda: _generate(stop_ids=["a"]), "each of stop_ids must be an integer"),
    (lambda: _generate(pad_id=-1), "pad_id must be >= 0"),
    (lambda: _generate(pad_id=61), "pad_id must be < 61"),
    (lambda: _generate(prefill_chunk=True), "prefill_chunk must be an integer"),
    (lambda: _generate(prefill_chunk=0), "prefill_chunk must be >= 16"),
    (lambda: _generate(on_step=3), "on_step must be a function"),
    (lambda: generate_ids(PARAMS, {"vocab_size": 61}, [[1]], Full(), max_new_tokens=2),
     "config must be a ModelConfig"),
    (lambda: Sampling(temperature=math.nan), "temperature must be 0 or a finite number"),
    (lambda: Sampling(top_k=3.0), "top_k must be an integer"),
    (lambda: make_prefill(CFG, PLAN, prefill_chunk="4096"), "prefill_chunk must be an integer"),
    (lambda: make_prefill(None, PLAN), "config must be a ModelConfig"),
    (lambda: make_decode_step("smollm2", PLAN), "config must be a ModelConfig"),
    (lambda: make_method(["rocketkv"]), "the method name must be a str"),
    (lambda: make_method("rocketkv", math.inf), "token_budget must be an integer"),
    (lambda: make_method("rocketkv", 256, stage1_share=math.nan), "stage1_share must be"),
    (lambda: make_method("quest", 256, skip_layers=-1), "skip_layers must be >= 0"),
    (lambda: _conversation(capacity=32.0), "capacity must be an integer"),
    (lambda: _conversation(capacity=1), "capacity must be >= 2"),
    (lambda: _conversation(batch=0), "batch must be >= 1"),
    (lambda: _conversation(method="full"), "method must be a KV method"),
    (lambda: _conversation(pad_id=100), "pad_id must be < 61"),
    (lambda: _conversation().append(5), "a turn must be a list of token ids"),
    (lambda: _conversation().append("w1 w2"), "tokenize text first"),
    (lambda: _conversation(batch=2).append([[1, 2], 3]), "row 1: a turn must be a list"),
    (lambda: _generate_turn(max_new_tokens=1.5), "max_new_tokens must be an integer"),
    (lambda: _generate_turn(sampling="greedy"), "sampling must be a Sampling"),
    (lambda: _generate_turn(seed=np.float64(1)), "seed must be an integer"),
    (lambda: tiny_checkpoint_config(rms_norm_eps=math.nan), "rms_norm_eps must be a finite"),
    (lambda: tiny_checkpoint_config(rope_theta=math.inf), "rope_theta must be a finite"),
]


@pytest.mark.parametrize("call, message", CASES)
def test_wrong_arguments_fail_at_our_boundary(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert "/rocketkv_jax/" in last.filename, last  # raised by our checks, not JAX's


def test_load_model_takes_a_path_or_a_name():
    with pytest.raises(ModelNotFoundError, match="must be a checkpoint directory or a model "
                       "name .*, got int"):
        load_model(5)

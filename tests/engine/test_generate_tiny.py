"""generate on a tiny random model: batching, stops, buckets, step-wise decode agrees."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.engine.requests import GenerateError, batch_bucket, length_bucket
from rocketkv_jax.methods import Full
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.llama import forward_prefill
from rocketkv_jax.models.params import random_params
from rocketkv_jax.sampling import Sampling

CFG = ModelConfig(
    model_type="llama", vocab_size=97, hidden_size=96, intermediate_size=160, num_layers=2,
    num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=256, tie_word_embeddings=False, eos_token_ids=(),
)
PARAMS = random_params(CFG, seed=0, scale=0.3)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in lengths]


def _greedy_reference(prompt, n):
    """Greedy decoding by re-running the full forward on the growing sequence (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        T = len(seq)
        logits, _ = forward_prefill(
            PARAMS, CFG, jnp.asarray([seq]), jnp.asarray([T]), Full().plan(CFG, T, 0)
        )
        seq.append(int(np.argmax(np.asarray(logits[0, -1]))))
    return seq[len(prompt):]


def test_greedy_equals_cacheless_reference():
    prompt = _prompts([11])[0]
    out = generate_ids(PARAMS, CFG, [prompt], Full(), max_new_tokens=12)
    assert out.tokens[0] == _greedy_reference(prompt, 12)


def test_mixed_length_batch_equals_one_by_one():
    prompts = _prompts([3, 17, 9, 30, 1])
    batched = generate_ids(PARAMS, CFG, prompts, Full(), max_new_tokens=10).tokens
    for p, got in zip(prompts, batched, strict=True):
        alone = generate_ids(PARAMS, CFG, [p], Full(), max_new_tokens=10).tokens[0]
        assert got == alone


def test_sampled_batch_is_reproducible_per_seed():
    prompts = _prompts([5, 12])
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9)
    a = generate_ids(PARAMS, CFG, prompts, Full(), max_new_tokens=8, sampling=s, seed=4)
    b = generate_ids(PARAMS, CFG, prompts, Full(), max_new_tokens=8, sampling=s, seed=4)
    c = generate_ids(PARAMS, CFG, prompts, Full(), max_new_tokens=8, sampling=s, seed=5)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stop_id_ends_one_row_while_others_continue():
    prompts = _prompts([6, 14, 9], seed=3)
    free = generate_ids(PARAMS, CFG, prompts, Full(), max_new_tokens=12, stop_ids=[]).tokens
    # a token that row 1 produces at step 4 but rows 0 and 2 never produce
    stop = next(t for t in free[1][3:] if t not in free[0] and t not in free[2])
    k = free[1].index(stop)
    out = generate_ids(PARAMS, CFG, prompts, Full(), max_new_tokens=12, stop_ids=[stop])
    assert out.tokens[1] == free[1][: k + 1]  # stopped, stop id included
    assert out.tokens[0] == free[0] and out.tokens[2] == free[2]
    assert out.stats.generated_tokens == 24 + k + 1


def test_all_rows_stopping_ends_the_loop_early():
    prompt = _prompts([7])[0]
    free = generate_ids(PARAMS, CFG, [prompt], Full(), max_new_tokens=10, stop_ids=[]).tokens[0]
    out = generate_ids(PARAMS, CFG, [prompt], Full(), max_new_tokens=10, stop_ids=[free[2]])
    assert out.tokens[0] == free[: free.index(free[2]) + 1]


def test_streaming_callback_sees_every_token_in_order():
    prompts = _prompts([4, 8])
    seen = []
    out = generate_ids(PARAMS, CFG, prompts, Full(), max_new_tokens=6,
                       on_step=lambda s, t, d: seen.append((s, t.tolist())))
    assert [s for s, _ in seen] == list(range(6))
    assert [t[0] for _, t in seen] == out.tokens[0]
    assert [t[1] for _, t in seen] == out.tokens[1]


def test_stats_are_sane():
    out = generate_ids(PARAMS, CFG, _prompts([20, 5]), Full(), max_new_tokens=5)
    st = out.stats
    assert st.prompt_tokens == 25 and st.generated_tokens == 10 and st.batch == 2
    assert st.prompt_bucket == 24
    # full KV: 2 layers x (k + v) x [B=2, K=2, C=24+5, D=16] f32 + pos int32 + lengths
    assert st.kv_cache_bytes == 2 * (2 * 2 * 2 * 29 * 16 * 4 + 2 * 2 * 29 * 4 + 2 * 4)
    assert st.prefill_s > 0 and st.decode_tokens_per_s > 0


def test_buckets():
    assert [length_bucket(n) for n in (1, 16, 17, 25, 33, 100, 2048, 2049)] == [
        16, 16, 24, 32, 48, 128, 2048, 3072]
    assert length_bucket(200, limit=210) == 210 and length_bucket(205, limit=200) == 205
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


@pytest.mark.parametrize(
    "prompts, n, match",
    [
        ([[]], 4, "empty"),
        ([[1] * 300], 4, "longer than the model's context"),
        ([[1] * 250], 10, "max_new_tokens"),
        ([[1, 2]], 0, "max_new_tokens must be >= 1"),
        ([], 4, "no prompts"),
    ],
)
def test_bad_requests(prompts, n, match):
    with pytest.raises(GenerateError, match=match):
        generate_ids(PARAMS, CFG, prompts, Full(), max_new_tokens=n)


def test_eos_from_config_is_the_default_stop():
    prompt = _prompts([7])[0]
    free = generate_ids(PARAMS, CFG, [prompt], Full(), max_new_tokens=10, stop_ids=[]).tokens[0]
    cfg = dataclasses.replace(CFG, eos_token_ids=(free[4],))
    out = generate_ids(PARAMS, cfg, [prompt], Full(), max_new_tokens=10)
    assert out.tokens[0] == free[: free.index(free[4]) + 1]


@pytest.mark.parametrize("method", ["full", "rocketkv", "snapkv", "quest", "streaming"])
def test_shared_prefill_generates_what_generate_ids_does(method):
    from rocketkv_jax.engine.shared_prefill import SharedPrefill
    from rocketkv_jax.methods import make_method

    prompts = _prompts([60, 41, 75], seed=7)
    m = make_method(method, None if method == "full" else 40)
    shared = SharedPrefill(PARAMS, CFG, prompts, max_new_tokens=6)
    got = shared.generate(m, stop_ids=[]).tokens
    want = generate_ids(PARAMS, CFG, prompts, m, max_new_tokens=6, stop_ids=[]).tokens
    assert got == want


def test_shared_prefill_forced_logprobs_equal_a_cacheless_forward():
    from rocketkv_jax.engine.shared_prefill import SharedPrefill

    prompts = _prompts([33, 20], seed=5)
    forced = np.random.default_rng(1).integers(3, CFG.vocab_size, (2, 5))
    got = SharedPrefill(PARAMS, CFG, prompts, max_new_tokens=6).forced_logprobs(Full(), forced)
    assert got.shape == (2, 5, CFG.vocab_size)
    for b, prompt in enumerate(prompts):
        seq = prompt + forced[b].tolist()
        logits, _ = forward_prefill(PARAMS, CFG, jnp.asarray([seq]), jnp.asarray([len(seq)]),
                                    Full().plan(CFG, len(seq), 0))
        want = np.asarray(logits[0, len(prompt) - 1 : len(seq) - 1], np.float64)
        want -= np.log(np.exp(want - want.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            + want.max(-1, keepdims=True)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["rocketkv", "snapkv++", "hybrid", "quest"])
def test_shared_prefill_forced_logprobs_equal_forced_decode_logprobs(method):
    from rocketkv_jax.engine.shared_prefill import SharedPrefill, forced_decode_logprobs
    from rocketkv_jax.methods import make_method

    m = make_method(method, 40, **({} if method == "snapkv++" else {"stage2": "on"}))
    prompt = _prompts([70], seed=9)[0]
    forced = np.random.default_rng(2).integers(3, CFG.vocab_size, (1, 6))
    shared = SharedPrefill(PARAMS, CFG, [prompt], max_new_tokens=6)
    got = shared.forced_logprobs(m, forced)[0]
    want = forced_decode_logprobs(PARAMS, CFG, prompt, forced[0].tolist(), m)
    # the same padded length as `want`'s, so the same plan
    assert shared.tokens.shape[1] == length_bucket(70, limit=CFG.max_position_embeddings - 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    assert np.abs(got - shared.forced_logprobs(make_method("full"), forced)[0]).max() > 1e-3


def test_shared_prefill_forced_tokens_are_checked():
    from rocketkv_jax.engine.shared_prefill import SharedPrefill

    shared = SharedPrefill(PARAMS, CFG, _prompts([9, 12]), max_new_tokens=4)
    with pytest.raises(GenerateError, match=r"must be \[2, n\]"):
        shared.forced_logprobs(Full(), [[5, 6]])
    with pytest.raises(GenerateError, match="1 to 4 forced tokens"):
        shared.forced_logprobs(Full(), np.full((2, 5), 5))
    with pytest.raises(GenerateError, match="outside the model's vocabulary"):
        shared.forced_logprobs(Full(), [[5, 97], [5, 6]])

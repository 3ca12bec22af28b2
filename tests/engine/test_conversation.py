"""Conversations on a tiny random model: a turn against the cached history equals a
one-shot prefill of the whole history; replies equal one-shot greedy generation;
RocketKV-MT's temporary copy equals stage 1 on the full history; errors are clear."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.engine.conversation import Conversation, ConversationError, decode_cache
from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.engine.requests import length_bucket
from rocketkv_jax.methods import Full, RocketKV, TopK
from rocketkv_jax.methods.base import DensePlan
from rocketkv_jax.methods.multiturn import MultiTurnPlan, RocketKVMT, SnapKVMT
from rocketkv_jax.models.config import ModelConfig
from rocketkv_jax.models.llama import forward_decode, forward_prefill
from rocketkv_jax.models.params import random_params

CFG = ModelConfig(
    model_type="llama", vocab_size=97, hidden_size=96, intermediate_size=160, num_layers=2,
    num_heads=6, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=256, tie_word_embeddings=False, eos_token_ids=(),
)
PARAMS = random_params(CFG, seed=0, scale=0.3)


def _turns(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in lengths]


def _one_shot(history):
    """Last-token logits [V] and the full-KV cache of a one-shot prefill of `history`."""
    T = len(history)
    logits, cache = forward_prefill(PARAMS, CFG, jnp.asarray([history]), jnp.asarray([T]),
                                    Full().plan(CFG, T, 0), chunk=None)
    return np.asarray(logits[0, -1]), cache


def assert_logits_close(got, want):
    """Within 1e-5 of the logits' scale (max |want|): f32 noise between decode and prefill
    attention (a reply's keys come from decode steps, the reference's from a prefill)
    reaches ~2e-5 absolute on logits of magnitude ~5; a wrong position or a missing token
    moves them by O(0.1)."""
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-5, f"max |diff| / max |logit| = {err:.2e}"


def _last_logits(conv):
    return np.asarray(conv._logits)


@pytest.mark.parametrize("chunk", [None, 16])
def test_full_turns_equal_one_shot_prefill_and_generate(chunk):
    t1, t2, t3 = _turns([37, 5, 19])
    conv = Conversation(PARAMS, CFG, Full(), capacity=160, prefill_chunk=chunk)
    conv.append(t1)
    assert_logits_close(_last_logits(conv)[0], _one_shot(t1)[0])
    for turn in (t2, t3):
        history = conv.history[0]
        reply = conv.generate(6).tokens[0]
        # the reply is what one-shot greedy generation of the same history gives
        assert reply == generate_ids(PARAMS, CFG, [history], Full(), max_new_tokens=6,
                                     prefill_chunk=None).tokens[0]
        stats = conv.append(turn)
        assert conv.history[0] == history + reply + turn
        # only the new tokens were prefilled: the reply's last token and the turn
        assert stats.prefilled == 1 + len(turn)
        ref, _ = _one_shot(conv.history[0])
        assert_logits_close(_last_logits(conv)[0], ref)


def test_batched_rows_of_different_lengths_equal_one_by_one():
    t1 = _turns([9, 30], seed=1)
    t2 = _turns([12, 3], seed=2)
    free = generate_ids(PARAMS, CFG, t1, Full(), max_new_tokens=8, stop_ids=[]).tokens
    stop = next(t for t in free[0][2:6] if t not in free[1])  # row 0 stops early
    conv = Conversation(PARAMS, CFG, Full(), capacity=96, batch=2, prefill_chunk=16,
                        stop_ids=[stop])
    conv.append(t1)
    replies = conv.generate(8).tokens
    assert replies[0] == free[0][:free[0].index(stop) + 1] and replies[1] == free[1]
    conv.append(t2)
    assert conv.lengths == [len(t1[b]) + len(replies[b]) + len(t2[b]) for b in range(2)]
    for b in range(2):
        ref, _ = _one_shot(conv.history[b])
        assert_logits_close(_last_logits(conv)[b], ref)
    histories = conv.history
    replies = conv.generate(5).tokens
    for b in range(2):
        assert replies[b] == generate_ids(PARAMS, CFG, [histories[b]], Full(),
                                          max_new_tokens=5, stop_ids=[stop]).tokens[0]


def test_topk_oracle_reads_every_turn():
    t1, t2 = _turns([70, 6], seed=3)
    method = TopK(token_budget=32)
    conv = Conversation(PARAMS, CFG, method, capacity=128, prefill_chunk=None)
    conv.append(t1)
    conv.generate(4)
    conv.append(t2)
    history = conv.history[0]
    reply = conv.generate(10).tokens[0]
    assert reply == generate_ids(PARAMS, CFG, [history], method, max_new_tokens=10,
                                 prefill_chunk=None).tokens[0]


def assert_close_scaled(got, want):
    """Within 1e-5 of the reference's scale, as `assert_logits_close`."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= 1e-5, f"max |diff| / max |ref| = {err:.2e}"


@pytest.mark.parametrize("method", [RocketKVMT(48), SnapKVMT(48)], ids=lambda m: m.name)
def test_multi_turn_temporary_copy_is_stage1_of_the_full_history(method):
    # two turns without a reply between them, so the whole history is prefilled and a
    # one-shot prefill is its independent reference; turn 2 is shorter than the stage-1
    # window (32), so its window queries come from re-prefilling the history's last ones
    t1, t2 = _turns([100, 5], seed=4)
    conv = Conversation(PARAMS, CFG, method, capacity=192, prefill_chunk=16)
    conv.append(t1)
    stats = conv.append(t2)
    assert stats.prefilled == 32  # t2 and the 27 tokens before it (their queries)
    history = conv.history[0]
    h = len(history)
    size = length_bucket(h)
    plan = conv.method.plan(CFG, size, 12)
    assert not isinstance(plan, DensePlan) and plan.prompt_budget < h  # it evicts
    lengths = jnp.asarray([h], jnp.int32)
    full_before = jax.tree.map(np.asarray, conv._history)
    cache = decode_cache("multi_turn", plan, conv._history, conv._q_obs, lengths, size)
    # independent path: a one-shot prefill of the whole history, compressed by the plan
    tokens = np.zeros((1, size), np.int32)
    tokens[0, :h] = history
    _, ref = forward_prefill(PARAMS, CFG, jnp.asarray(tokens), lengths, plan, chunk=None,
                             all_logits=False)
    np.testing.assert_array_equal(np.asarray(cache.temp.pos), np.asarray(ref.pos))
    np.testing.assert_array_equal(np.asarray(cache.temp.length), np.asarray(ref.length))
    assert (np.asarray(ref.pos) >= 0).sum(-1).max() < h  # tokens were evicted
    for f in ("k", "v", "page_max", "page_min"):
        got, want = np.asarray(getattr(cache.temp, f)), np.asarray(getattr(ref, f))
        finite = np.isfinite(want)  # empty pages' bounds are -inf / +inf in both
        np.testing.assert_array_equal(np.isfinite(got), finite)
        if finite.any():
            assert_close_scaled(got[finite], want[finite])
    # the full history is untouched by the compression
    for a, b in zip(jax.tree.leaves(cache.full), jax.tree.leaves(full_before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_rocketkv_mt_decode_appends_to_both_copies():
    t1, t2, t3 = _turns([100, 5, 4], seed=4)
    conv = Conversation(PARAMS, CFG, RocketKVMT(48), capacity=192, prefill_chunk=16)
    conv.append(t1)
    conv.generate(8)
    conv.append(t2)
    history = conv.history[0]
    h = len(history)
    size = length_bucket(h)
    plan = conv.method.plan(CFG, size, 12)
    lengths = jnp.asarray([h], jnp.int32)
    ref = decode_cache("multi_turn", plan, jax.tree.map(jnp.array, conv._history),
                       jnp.array(conv._q_obs), lengths, size)
    kept = int(np.asarray(ref.temp.length)[0, 0])
    full_before = jax.tree.map(np.asarray, ref.full)
    reply = conv.generate(12).tokens[0]
    # the temporary copy got every new token: the reply is single-turn rocketkv's on the
    # whole history as one prompt (the same plan, the same stage-1 cache)
    assert reply == generate_ids(PARAMS, CFG, [history], RocketKV(48), max_new_tokens=12,
                                 prefill_chunk=None).tokens[0]
    # reference decode with the multi-turn plan: each token lands in both copies
    for j, t in enumerate(reply[:-1]):
        _, ref = forward_decode(PARAMS, CFG, jnp.asarray([t]), jnp.asarray([h + j]), ref,
                                MultiTurnPlan(plan))
    n = len(reply) - 1
    full, temp = jax.tree.map(np.asarray, ref.full), jax.tree.map(np.asarray, ref.temp)
    assert (full.length == h + n).all() and (temp.length == kept + n).all()
    for f in ("k", "v", "pos"):
        new_full = getattr(full, f)[:, :, :, h:h + n]
        np.testing.assert_array_equal(new_full, getattr(temp, f)[:, :, :, kept:kept + n])
        np.testing.assert_array_equal(getattr(full, f)[:, :, :, :h],
                                      getattr(full_before, f)[:, :, :, :h])
    np.testing.assert_array_equal(full.pos[0, 0, 0, h:h + n], np.arange(h, h + n))
    # the conversation's full history after the turn is that reference's
    got = jax.tree.map(np.asarray, conv._history)
    np.testing.assert_array_equal(got.length, full.length)
    np.testing.assert_array_equal(got.pos, full.pos)
    assert_close_scaled(got.k[:, :, :, :h + n], full.k[:, :, :, :h + n])
    assert_close_scaled(got.v[:, :, :, :h + n], full.v[:, :, :, :h + n])
    # the next turn starts from the full history. Turn 3 is shorter than the window (32),
    # so the history's last 32 - 5 tokens are re-prefilled with it (their queries fill the
    # window; their keys and values are recomputed exactly). Reference: the full history
    # cut there, then dense decode steps over it for every token from the cut on
    conv.append(t3)
    tokens = conv.history[0]
    cut = len(tokens) - 32
    keep = np.arange(full.pos.shape[-1]) < cut
    cache = dataclasses.replace(ref.full, pos=jnp.where(keep, ref.full.pos, -1),
                                length=jnp.full_like(ref.full.length, cut))
    for j, t in enumerate(tokens[cut:]):
        logits, cache = forward_decode(PARAMS, CFG, jnp.asarray([t]), jnp.asarray([cut + j]),
                                       cache, DensePlan("full", 0, 0, 0))
    assert_logits_close(_last_logits(conv)[0], np.asarray(logits[0]))


def test_single_turn_rocketkv_evicts_permanently():
    """The baseline: turn 1 compressed once, later tokens fed by decode steps into that
    cache. Reference: forward_prefill with the plan, then forward_decode token by token."""
    t1, t2 = _turns([100, 5], seed=4)
    method = RocketKV(48)
    conv = Conversation(PARAMS, CFG, method, capacity=192, prefill_chunk=16)
    conv.append(t1)
    reply = conv.generate(8).tokens[0]
    assert conv.compressed
    conv.append(t2)
    plan = conv._plan
    size = length_bucket(len(t1))
    tokens = np.zeros((1, size), np.int32)
    tokens[0, :len(t1)] = t1
    logits, cache = forward_prefill(PARAMS, CFG, jnp.asarray(tokens), jnp.asarray([len(t1)]),
                                    plan, chunk=None, all_logits=False)
    assert reply[0] == int(np.argmax(np.asarray(logits[0])))
    for j, t in enumerate(reply[:-1] + reply[-1:] + t2):
        logits, cache = forward_decode(PARAMS, CFG, jnp.asarray([t]),
                                       jnp.asarray([len(t1) + j]), cache, plan)
    assert_logits_close(_last_logits(conv)[0], np.asarray(logits[0]))
    # information is lost: the logits are not those of the full history
    assert np.abs(_last_logits(conv)[0] - _one_shot(conv.history[0])[0]).max() > 1e-3


def test_single_turn_with_budget_covering_everything_is_full():
    t1, t2 = _turns([20, 4], seed=5)
    conv = Conversation(PARAMS, CFG, RocketKV(250), capacity=64, prefill_chunk=None)
    conv.append(t1)
    conv.generate(5)
    conv.append(t2)
    assert_logits_close(_last_logits(conv)[0], _one_shot(conv.history[0])[0])


def test_capacity_empty_turn_and_reset_are_clear():
    conv = Conversation(PARAMS, CFG, Full(), capacity=40, prefill_chunk=None)
    with pytest.raises(ConversationError, match="empty: append a turn"):
        conv.generate(3)
    with pytest.raises(ConversationError, match="turn is empty"):
        conv.append([])
    t1 = _turns([30])[0]
    conv.append(t1)
    with pytest.raises(ConversationError) as e:
        conv.append(_turns([11], seed=1)[0])
    msg = str(e.value)
    for part in ("30 tokens", "11 tokens", "capacity of 40", "--capacity", "reset()"):
        assert part in msg
    assert conv.history[0] == t1  # a refused turn leaves the history as it was
    with pytest.raises(ConversationError, match="a reply of up to 11 tokens"):
        conv.generate(11)
    with pytest.raises(ConversationError, match="vocabulary"):
        conv.append([5, CFG.vocab_size])
    with pytest.raises(ConversationError, match="larger than the model's context"):
        Conversation(PARAMS, CFG, Full(), capacity=1000)
    conv.reset()
    assert conv.history == [[]]
    t2 = _turns([12], seed=6)[0]
    conv.append(t2)
    assert_logits_close(_last_logits(conv)[0], _one_shot(t2)[0])


def test_multi_turn_methods_by_name():
    from rocketkv_jax.methods import make_method
    from rocketkv_jax.methods.multiturn import MULTI_TURN_CLASSES
    from rocketkv_jax.names import MULTI_TURN_METHOD_NAMES

    assert tuple(cls.name for cls in MULTI_TURN_CLASSES) == MULTI_TURN_METHOD_NAMES
    assert make_method("rocketkv-mt", 256, window=16) == RocketKVMT(256, window=16)
    assert make_method("snapkv-mt", 64) == SnapKVMT(64)
    assert RocketKVMT(256) != RocketKV(256)
    plan = make_method("rocketkv-mt", 64).plan(CFG, 200, 8)
    assert plan.name == "rocketkv-mt" and plan == dataclasses.replace(
        RocketKV(64).plan(CFG, 200, 8), name="rocketkv-mt")


def test_batched_rocketkv_mt_rows_equal_each_row_alone():
    """Two rows whose turns and replies differ in length (each row prefills from its own
    start and re-reads its own window) give what each row gives alone; the lengths stay
    in one bucket, so both resolve the same plan."""
    t1 = _turns([90, 84], seed=7)
    t2 = _turns([3, 9], seed=8)
    method = RocketKVMT(48)
    conv = Conversation(PARAMS, CFG, method, capacity=160, batch=2, prefill_chunk=16)
    conv.append(t1)
    first = conv.generate(6).tokens
    conv.append(t2)
    logits = _last_logits(conv)
    second = conv.generate(6).tokens
    for b in range(2):
        alone = Conversation(PARAMS, CFG, method, capacity=160, prefill_chunk=16)
        alone.append(t1[b])
        assert alone.generate(6).tokens[0] == first[b]
        alone.append(t2[b])
        assert_logits_close(logits[b], _last_logits(alone)[0])
        assert alone.generate(6).tokens[0] == second[b]

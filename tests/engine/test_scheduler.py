"""The serving engine on the real model (SmolLM2-135M-Instruct): the same greedy tokens as
generate_ids, whatever shares the engine; prefix reuse that changes nothing but the work;
per-row sampling equal to `sampling.sample`; cancellation, injected faults, a full queue,
draining and bad requests; and no row, prefill or request left behind afterwards."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.engine.scheduler import (
    Engine,
    chunk_sizes,
    common_prefix,
    fit_chunk,
    next_mixed_chunk,
    reuse_point,
)
from rocketkv_jax.engine.serve_programs import sample_rows
from rocketkv_jax.engine.serving_api import (
    EngineStopping,
    QueueFull,
    RequestRejected,
    ServeRequest,
)
from rocketkv_jax.eval.tasks import make_sample
from rocketkv_jax.methods import make_method
from rocketkv_jax.model_store import load_model
from rocketkv_jax.sampling import Sampling, sample

N = 16


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    return load_model(smollm2_checkpoint, progress=False)


@pytest.fixture(scope="module")
def prompts(smol):
    tok = smol.tokenizer
    return [tok.encode(make_sample("niah_single", tok, context_length=n, index=i,
                                   seed=3).prompt) for i, n in enumerate((640, 900, 400))]


class Collect:
    """Events of one request, and a flag when it ended."""

    def __init__(self):
        self.events, self.ended = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.kind != "token":
            self.ended.set()

    @property
    def tokens(self):
        return [e.token for e in self.events if e.kind == "token"]

    @property
    def last(self):
        return self.events[-1]


def run(engine, requests):
    out = [Collect() for _ in requests]
    for r, c in zip(requests, out, strict=True):
        engine.submit(r, c)
    for c in out:
        assert c.ended.wait(600), "request did not finish"
    return out


def assert_clean(engine):
    s = engine.stats()
    assert (s["queued"], s["prefilling"], s["running"]) == (0, 0, 0), s
    assert not engine._all and engine._prefilling is None
    assert all(r is None for p in engine._pools.values() for r in p.rows)
    assert s["kv_bytes"] <= s["kv_memory_bytes"]


def test_reuse_point_keeps_the_window_and_whole_chunks():
    a = np.arange(100)
    assert common_prefix(a, a[:40]) == 40 and common_prefix(a, np.r_[a[:7], -1]) == 7
    assert reuse_point(shared=90, prompt_len=100, window=16, chunk=32) == 64  # 84 -> 64
    assert reuse_point(shared=50, prompt_len=100, window=16, chunk=32) == 32
    assert reuse_point(shared=20, prompt_len=100, window=16, chunk=32) == 0
    # the last token is always recomputed: its hidden state gives the first token
    assert reuse_point(shared=100, prompt_len=100, window=0, chunk=25) == 75
    assert reuse_point(shared=100, prompt_len=101, window=0, chunk=25) == 100


def test_mixed_chunk_sizes_fit_and_adapt():
    assert chunk_sizes(16, 256) == [16, 32, 64, 128, 256]
    assert chunk_sizes(16, 96) == [16, 32, 96] and chunk_sizes(0, 256) == [256]
    sizes = chunk_sizes(16, 256)
    assert fit_chunk(sizes, 256, 0, 512) == 256 and fit_chunk(sizes, 64, 0, 512) == 64
    assert fit_chunk(sizes, 256, 448, 512) == 64  # no more than the buffer holds
    assert fit_chunk(sizes, 256, 496, 512) == 16
    # a plain turn of 1 s, max_stall 2: grow while doubling the chunk's cost still fits
    assert next_mixed_chunk(sizes, 32, 1.4, 1.0, 2.0) == 64  # 2 * 0.4 + 1 = 1.8
    assert next_mixed_chunk(sizes, 32, 1.6, 1.0, 2.0) == 32  # 2.2 would not fit
    assert next_mixed_chunk(sizes, 32, 2.1, 1.0, 2.0) == 16
    assert next_mixed_chunk(sizes, 16, 3.0, 1.0, 2.0) == 16
    assert next_mixed_chunk(sizes, 256, 1.1, 1.0, 2.0) == 256


def test_sample_rows_equals_sample_row_by_row():
    V = 300
    logits = jax.random.normal(jax.random.key(0), (5, V)) * 3
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), 5))
    settings = [Sampling(), Sampling(0.7), Sampling(1.3, top_k=5), Sampling(0.9, top_p=0.6),
                Sampling(1.1, top_k=40, top_p=0.8)]
    got = sample_rows(logits, keys, jnp.asarray([s.temperature for s in settings]),
                      jnp.asarray([s.top_k for s in settings]),
                      jnp.asarray([s.top_p for s in settings]))
    want = [int(sample(logits[i:i + 1], keys[i], s)[0]) for i, s in enumerate(settings)]
    assert np.asarray(got).tolist() == want
    # greedy rows alone take the argmax
    assert np.asarray(sample_rows(logits, keys, jnp.zeros(5), jnp.zeros(5, jnp.int32),
                                  jnp.ones(5))).tolist() == np.argmax(logits, -1).tolist()


def test_concurrent_requests_get_generates_tokens(smol, prompts):
    """Three requests at once, two methods, two pools, interleaved prefill: each gets
    exactly what generate_ids gives it alone."""
    specs = [(prompts[0], "rocketkv", 256), (prompts[1], "full", None),
             (prompts[2], "rocketkv", 256)]
    want = [generate_ids(smol.params, smol.config, [p], make_method(m, b),
                         max_new_tokens=N).tokens[0] for p, m, b in specs]
    engine = Engine(smol.params, smol.config, slots=4, prefill_chunk=128,
                    prefix_cache_bytes=0)
    try:
        out = run(engine, [ServeRequest(tuple(p), N, method=m, token_budget=b)
                           for p, m, b in specs])
        assert [c.tokens for c in out] == want
        for c, (p, _, _) in zip(out, specs, strict=True):
            assert c.last.kind == "done" and c.last.finish_reason in ("length", "stop")
            assert c.last.usage == {"prompt_tokens": len(p), "completion_tokens": len(c.tokens),
                                    "cached_prompt_tokens": 0}
        # a pool per plan: rocketkv at two prompt buckets, and full
        assert engine.stats()["pools"] == len({m.plan for m in engine._pools.values()}) == 3
        # the later prompts prefilled partly in mixed turns (16 tokens beside the running
        # rows' decode step), partly alone (128 at a time) once nothing decoded
        s = engine.stats()
        assert s["mixed_chunks"] > 0 and s["prefill_chunks"] > 0, s
        assert_clean(engine)
    finally:
        engine.close()


def test_prefix_reuse_gives_the_same_tokens(smol, prompts):
    """A prompt that extends an earlier one (a chat's next turn) prefills only past the
    reuse point and answers exactly as without reuse."""
    first = prompts[0]
    tok = smol.tokenizer
    second = first + tok.encode(" And once more: what is the special magic number?")
    plain = Engine(smol.params, smol.config, slots=2, prefill_chunk=128, prefix_cache_bytes=0)
    try:
        want = run(plain, [ServeRequest(tuple(second), N)])[0].tokens
    finally:
        plain.close()
    engine = Engine(smol.params, smol.config, slots=2, prefill_chunk=128)
    try:
        run(engine, [ServeRequest(tuple(first), N)])
        again = run(engine, [ServeRequest(tuple(second), N)])[0]
        s = engine.stats()
        assert s["prefix_hits"] == 1 and s["prefix_lookups"] == 2
        W = make_method("rocketkv", 256).plan(smol.config, 1024, N).query_window
        assert again.last.usage["cached_prompt_tokens"] == reuse_point(
            len(first), len(second), W, 128) > 0
        assert again.tokens == want
        assert s["prefix_entries"] == 1  # the second prompt replaced the one it extends
        assert_clean(engine)
    finally:
        engine.close()


def test_seeded_sampling_does_not_depend_on_company(smol, prompts):
    req = ServeRequest(tuple(prompts[2]), N, sampling=Sampling(0.8, top_p=0.9), seed=7)
    engine = Engine(smol.params, smol.config, slots=4, prefill_chunk=128)
    try:
        alone = run(engine, [req])[0].tokens
        crowd = run(engine, [ServeRequest(tuple(prompts[0]), N, seed=1,
                                          sampling=Sampling(1.0)), req,
                             ServeRequest(tuple(prompts[2]), N, seed=8,
                                          sampling=Sampling(0.8, top_p=0.9))])
        assert crowd[1].tokens == alone
        assert crowd[2].tokens != alone  # another seed, another stream
    finally:
        engine.close()


def test_cancel_fault_and_queue(smol, prompts):
    """A cancelled request frees its row; an exception inside one request fails that
    request only; a full queue refuses at once; nothing leaks."""
    gate, entered = threading.Event(), threading.Event()
    bad = set()

    def hook(stage, rid):
        if rid in bad:
            raise RuntimeError("injected fault")
        if stage == "prefill" and not gate.is_set():
            entered.set()
            gate.wait(60)

    engine = Engine(smol.params, smol.config, slots=1, max_queue=1, prefill_chunk=128,
                    fault_hook=hook)
    try:
        long_run = Collect()
        h = engine.submit(ServeRequest(tuple(prompts[2]), 200), long_run)
        assert entered.wait(120)  # the engine is inside the first request's prefill
        waiting = Collect()
        engine.submit(ServeRequest(tuple(prompts[2]), 4), waiting)  # queued (1 of 1)
        with pytest.raises(QueueFull) as e:
            engine.submit(ServeRequest(tuple(prompts[2]), 4), Collect())
        assert e.value.retry_after > 0
        assert engine.stats()["queue_full"] == 1
        gate.set()
        while len(long_run.tokens) < 2:
            assert not long_run.ended.wait(0.05)
        h.cancel()
        assert long_run.ended.wait(120) and long_run.last.finish_reason == "cancelled"
        assert 2 <= len(long_run.tokens) < 200
        assert waiting.ended.wait(300) and waiting.last.kind == "done"  # got the freed slot

        failing = Collect()
        bad.add(engine.submit(ServeRequest(tuple(prompts[0]), N), failing).id)
        fine = run(engine, [ServeRequest(tuple(prompts[1]), N)])[0]
        assert failing.ended.wait(300) and failing.last.kind == "error"
        assert "injected fault" in failing.last.error
        assert fine.last.kind == "done" and len(fine.tokens) > 0
        s = engine.stats()
        assert (s["cancelled"], s["failed"], s["finished"]) == (1, 1, 2)
        assert_clean(engine)
    finally:
        gate.set()
        engine.close()


def test_a_fault_in_a_mixed_turn_fails_its_request_only(smol, prompts):
    """The prefill of a request that fails inside a mixed turn (its chunk beside another
    request's decode step) ends that request alone: the decoding one gets all of
    generate's tokens."""
    bad = set()

    def hook(stage, rid):
        if rid in bad and stage == "prefill":
            raise RuntimeError("injected fault")

    want = generate_ids(smol.params, smol.config, [prompts[2]], make_method("rocketkv", 256),
                        max_new_tokens=64).tokens[0]
    engine = Engine(smol.params, smol.config, slots=2, prefill_chunk=128, fault_hook=hook)
    try:
        running = Collect()
        engine.submit(ServeRequest(tuple(prompts[2]), 64), running)
        while not running.tokens:
            assert not running.ended.wait(0.05)
        failing = Collect()
        bad.add(engine.submit(ServeRequest(tuple(prompts[0]), N), failing).id)
        assert failing.ended.wait(300) and failing.last.kind == "error"
        assert "injected fault" in failing.last.error
        assert running.ended.wait(300) and running.tokens == want
        assert_clean(engine)
    finally:
        engine.close()
    with pytest.raises(ValueError, match="must divide prefill_chunk"):
        Engine(smol.params, smol.config, prefill_chunk=128, mixed_chunk=48)


def test_stage2_reaches_the_methods_that_have_one(smol, prompts):
    """Engine(stage2=...) is `rocketkv serve --stage2`: rocketkv's plan takes it (here
    "off", which no cost decision gives) and answers as generate_ids with the same method;
    full KV, which has no stage 2, still serves beside it."""
    specs = [(prompts[0], "rocketkv", 256), (prompts[1], "full", None)]
    want = [generate_ids(smol.params, smol.config, [p],
                         make_method(m, b, **({"stage2": "off"} if b else {})),
                         max_new_tokens=N).tokens[0] for p, m, b in specs]
    engine = Engine(smol.params, smol.config, slots=2, prefill_chunk=128,
                    prefix_cache_bytes=0, stage2="off")
    try:
        out = run(engine, [ServeRequest(tuple(p), N, method=m, token_budget=b)
                           for p, m, b in specs])
        assert [c.tokens for c in out] == want
        plans = {pool.plan.name: pool.plan for pool in engine._pools.values()}
        assert plans["rocketkv"].fallback == "off" and plans["rocketkv"].stage2_dense
        assert_clean(engine)
    finally:
        engine.close()
    with pytest.raises(ValueError, match="Engine: stage2 must be one of 'auto', 'on', 'off'"):
        Engine(smol.params, smol.config, stage2="sometimes")


def test_bad_requests_are_refused_with_what_to_fix(smol, prompts):
    engine = Engine(smol.params, smol.config, slots=1, kv_memory_bytes=64 << 20)
    ctx = smol.config.max_position_embeddings
    p = tuple(prompts[2])
    cases = [
        (ServeRequest(tuple([1] * (ctx + 1)), 4), "longer than the model's context"),
        (ServeRequest(p, ctx), "Lower --max-new-tokens"),
        (ServeRequest(p, 0), "max_new_tokens"),
        (ServeRequest(p, 4, method="nope"), "nope"),
        (ServeRequest(p, 4, token_budget=0), "budget"),
        (ServeRequest(p, 4, method="rocketkv-mt"), "'rocketkv'"),
        (ServeRequest(p, 4, token_budget=None), "budget"),
        (ServeRequest(tuple([1] * 6000), 4, method="full"), "--kv-memory"),
        (ServeRequest((smol.config.vocab_size,), 4), "vocabulary"),
    ]
    try:
        for req, words in cases:
            with pytest.raises(RequestRejected, match=words.replace("-", r"\-")
                               .replace("(", r"\(")):
                engine.submit(req, Collect())
        assert engine.stats()["submitted"] == 0
    finally:
        engine.close()


def test_drain_finishes_running_requests_and_refuses_new_ones(smol, prompts):
    engine = Engine(smol.params, smol.config, slots=2, prefill_chunk=128)
    c = Collect()
    engine.submit(ServeRequest(tuple(prompts[2]), N), c)
    done = threading.Thread(target=engine.drain, args=(600,))
    done.start()
    while not engine.draining:
        pass
    with pytest.raises(EngineStopping):
        engine.submit(ServeRequest(tuple(prompts[2]), N), Collect())
    done.join(600)
    assert c.last.kind == "done" and len(c.tokens) > 0
    assert_clean(engine)


def test_the_same_prompt_again_under_full_kv(smol, prompts):
    """Full KV has no observation window: a repeated prompt still prefills its last
    chunk (its last token gives the first logits), and answers as the first time."""
    p = tuple(prompts[2][:384])  # a whole number of chunks: the case that ran empty
    engine = Engine(smol.params, smol.config, slots=2, prefill_chunk=128)
    try:
        a, b = (run(engine, [ServeRequest(p, N, method="full", token_budget=None)])[0]
                for _ in range(2))
        assert b.tokens == a.tokens and b.last.kind == "done"
        assert b.last.usage["cached_prompt_tokens"] == 256
    finally:
        engine.close()

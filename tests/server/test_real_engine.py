"""`rocketkv serve` as a user meets it: OpenAI's official client against the real engine on
SmolLM2-135M-Instruct over a localhost port. Greedy answers equal `generate_ids` (what
`rocketkv generate` runs) for the same prompt ids and method, chat and completions,
streaming and not; 8 concurrent streaming clients each get their own answer; a chat's
next turn reuses the cached prefix and answers as a fresh prefill would."""

from __future__ import annotations

import threading

import openai
import pytest
from live_server import LiveServer

from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.engine.scheduler import Engine
from rocketkv_jax.eval.tasks import make_sample
from rocketkv_jax.methods import make_method
from rocketkv_jax.model_store import load_model
from rocketkv_jax.server import create_app

MODEL = "smollm2"
N = 16


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    return load_model(smollm2_checkpoint, progress=False)


@pytest.fixture(scope="module")
def served(smol):
    engine = Engine(smol.params, smol.config, slots=8, prefill_chunk=128)
    with LiveServer(create_app(engine, smol.tokenizer, MODEL)) as server:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                               max_retries=0, timeout=600)
        yield engine, client
    engine.close()


def questions(tok, n, context=480):
    """n needle-in-a-haystack questions of about `context` tokens, each its own number."""
    return [make_sample("niah_single", tok, context_length=context, index=i, seed=5)
            for i in range(n)]


def reference(smol, ids, method="rocketkv", budget=256, chat=True):
    """What generate_ids answers (greedy), as text, cut at the stop id like the server."""
    tok = smol.tokenizer
    stop = tok.stop_ids(smol.config.eos_token_ids, chat=chat)
    out = generate_ids(smol.params, smol.config, [ids], make_method(method, budget),
                       max_new_tokens=N, stop_ids=stop).tokens[0]
    if out and out[-1] in stop:
        out = out[:-1]
    return tok.decode(out)


def test_chat_and_completions_equal_generate(smol, served):
    _, client = served
    tok = smol.tokenizer
    q = questions(tok, 1)[0].prompt
    want = reference(smol, tok.encode_messages([{"role": "user", "content": q}]))
    msgs = [{"role": "user", "content": q}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=N,
                                       temperature=0)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(tok.encode_messages(msgs))
    streamed = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=N,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want

    want_full = reference(smol, tok.encode(q), method="full", budget=None, chat=False)
    r = client.completions.create(model=MODEL, prompt=q, max_tokens=N, temperature=0,
                                  extra_body={"method": "full", "token_budget": None})
    assert r.choices[0].text == want_full
    streamed = client.completions.create(model=MODEL, prompt=q, max_tokens=N, temperature=0,
                                         stream=True,
                                         extra_body={"method": "full", "token_budget": None})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want_full


def test_eight_concurrent_streams_each_get_their_own_answer(smol, served):
    engine, client = served
    tok = smol.tokenizer
    samples = questions(tok, 8)
    want = [reference(smol, tok.encode_messages([{"role": "user", "content": s.prompt}]))
            for s in samples]
    assert len(set(want)) > 1  # the prompts really differ in what they ask
    got: list[str | None] = [None] * 8

    def client_thread(i):
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": samples[i].prompt}],
            max_tokens=N, temperature=0, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert got == want
    s = engine.stats()
    assert (s["running"], s["queued"], s["prefilling"]) == (0, 0, 0)


def test_next_turn_reuses_the_prefix(smol, served):
    engine, client = served
    tok = smol.tokenizer
    q = questions(tok, 1, context=900)[0].prompt
    turn1 = [{"role": "user", "content": q}]
    first = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=N,
                                           temperature=0)
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "Say that number again, digits only."}]
    hits = engine.stats()["prefix_hits"]
    second = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=N,
                                            temperature=0)
    assert engine.stats()["prefix_hits"] == hits + 1
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.choices[0].message.content == reference(smol, tok.encode_messages(turn2))

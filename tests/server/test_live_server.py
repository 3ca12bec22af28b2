"""The server on a real localhost port: OpenAI's official client against it, a client that
disconnects (the engine sees the cancel), and SIGTERM (503 while the running request
finishes, then exit 0). The engine is the fake of fake_engine.py."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from fake_engine import FakeEngine
from live_server import LiveServer, free_port

from rocketkv_jax.engine.serving_api import QueueFull
from rocketkv_jax.server import create_app

MODEL = "smollm2"
REPLY = "The capital of France is Paris."
KEY = "s3cret"


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture()
def live(smol_tokenizer):
    tok = smol_tokenizer
    eot = tok.token_id("<|im_end|>")
    engine = FakeEngine(lambda r: tok.encode(REPLY, add_special_tokens=False) + [eot],
                        eos_ids=(eot,), cached=5)
    with LiveServer(create_app(engine, tok, MODEL, api_key=KEY)) as server:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY,
                               max_retries=0, timeout=30)
        yield engine, server, client


def test_openai_client_chat_and_completions(live, smol_tokenizer):
    engine, _, client = live
    hello = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=hello, max_tokens=64,
                                       temperature=0, seed=3,
                                       extra_body={"method": "snapkv", "token_budget": 64})
    assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(smol_tokenizer.encode_messages(hello))
    assert r.usage.prompt_tokens_details.cached_tokens == 5
    request = engine.requests[0]
    assert (request.method, request.token_budget, request.seed, request.max_tokens) == (
        "snapkv", 64, 3, 64)

    stream = client.chat.completions.create(model=MODEL, messages=hello, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage.completion_tokens == len(
        smol_tokenizer.encode(REPLY, add_special_tokens=False)) + 1

    c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3)
    assert c.choices[0].text == smol_tokenizer.decode(
        smol_tokenizer.encode(REPLY, add_special_tokens=False)[:3])
    assert c.choices[0].finish_reason == "length"
    text = "".join(p.choices[0].text for p in client.completions.create(
        model=MODEL, prompt="Once upon a time", stream=True, stop=[" Paris"]))
    assert text == "The capital of France is"
    assert [m.id for m in client.models.list()] == [MODEL]


def test_openai_client_sees_the_errors(live):
    engine, server, client = live
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        client.chat.completions.create(model=MODEL, messages=hello, n=2)
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=hello)
    engine.raise_on_submit = QueueFull("queue full", retry_after=1)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=MODEL, messages=hello)
    assert e.value.response.headers["retry-after"] == "1"
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="nope",
                          max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=hello)
    engine.fail_after = 2
    with pytest.raises(openai.APIError, match="injected failure"):
        list(client.chat.completions.create(model=MODEL, messages=hello, stream=True))


def _send(port: int, path: str, body: dict, key: str | None = KEY, timeout: float = 30):
    """The connection, with the request sent and its response not yet read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", path, json.dumps(body), headers)
    return conn


def _post(port: int, path: str, body: dict, key: str | None = KEY, timeout: float = 30):
    conn = _send(port, path, body, key, timeout)
    return conn, conn.getresponse()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_cancels_its_request(smol_tokenizer, stream):
    tok = smol_tokenizer
    ids = tok.encode("word " * 400, add_special_tokens=False)
    engine = FakeEngine(lambda r: ids, delay=0.02)
    with LiveServer(create_app(engine, tok, MODEL)) as server:
        conn = _send(server.port, "/v1/completions", {
            "model": MODEL, "prompt": "x", "stream": stream}, key=None)
        if stream:
            response = conn.getresponse()
            assert response.status == 200
            assert response.readline().startswith(b"data: ")  # it is streaming
        else:
            assert wait_for(lambda: engine.requests, 10)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert wait_for(lambda: engine.cancelled == {"req-0"}, 10), engine.stats()
        assert wait_for(lambda: engine.finished.get("req-0") == "cancelled", 10)


def test_sigterm_drains_then_exits_0(smol_tokenizer_dir, tmp_path):
    port = free_port()
    script = Path(__file__).with_name("serve_fake.py")
    env = {**os.environ, "ROCKETKV_JAX_COMPILE_CACHE": "off"}
    proc = subprocess.Popen([sys.executable, str(script), str(smol_tokenizer_dir), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=tmp_path)
    try:
        def healthy():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/health")
                return conn.getresponse().status
            except OSError:
                return None

        assert wait_for(lambda: healthy() == 200, 120), proc.stderr.read1().decode()
        conn, response = _post(port, "/v1/completions", {"model": MODEL, "prompt": "x",
                                                         "stream": True}, key=None)
        assert response.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: healthy() == 503, 10)
        _, refused = _post(port, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=None)
        assert refused.status == 503
        rest = response.read().decode()  # the running request finishes
        assert rest.rstrip().endswith("data: [DONE]")
        text = "".join(json.loads(line[6:])["choices"][0]["text"]
                       for line in ("data: " + rest).split("\n\n")
                       if line.startswith("data: {"))
        assert text.endswith("twelve")
        conn.close()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert "drained: {'submitted': 1, 'cancelled': 0, 'finished': 1}" in out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

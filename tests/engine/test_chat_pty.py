"""`rocketkv chat` in a terminal (a pty): the prompt, a streamed reply, the stats line,
/reset and /quit, as a user at a keyboard sees them."""

import os
import select
import subprocess
import sys
import time

import pytest
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params

from rocketkv_jax.generate import generate_ids
from rocketkv_jax.methods import Full
from rocketkv_jax.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")
CFG = tiny_checkpoint_config()


def _read_until(fd, buf: bytearray, needle: str, timeout: float = 300.0) -> str:
    end = time.monotonic() + timeout
    while needle not in buf.decode(errors="replace"):
        left = end - time.monotonic()
        assert left > 0, f"no {needle!r} in the terminal; got:\n{buf.decode(errors='replace')}"
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            try:
                buf.extend(os.read(fd, 4096))
            except OSError:  # the child closed the terminal
                break
    return buf.decode(errors="replace")


def test_chat_in_a_terminal(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    tok = Tokenizer(ckpt)
    prompt = "w1 w2 w3 w4"
    reply = generate_ids(tiny_params(CFG), CFG, [tok.encode(prompt)], Full(),
                         max_new_tokens=3).tokens[0]
    master, slave = os.openpty()
    env = {**os.environ, "ROCKETKV_JAX_COMPILE_CACHE": "off"}
    p = subprocess.Popen(
        [sys.executable, "-m", "rocketkv_jax.cli", "chat", "--model", str(ckpt), "--method",
         "full", "--capacity", "40", "--max-new-tokens", "3"],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        _read_until(master, buf, "> ")
        os.write(master, (prompt + "\n").encode())
        out = _read_until(master, buf, "[turn 1]")
        assert tok.decode(reply) in out  # the streamed reply
        _read_until(master, buf, "tok/s")
        os.write(master, b"/reset\n")
        _read_until(master, buf, "(conversation reset)")
        os.write(master, b"/quit\n")
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)

"""`rocketkv chat` in a terminal (a pty): the prompt, a streamed reply, the stats line,
/reset and /quit, as a user at a keyboard sees them."""

import contextlib
import os
import select
import subprocess
import sys
import time

import pytest
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params

from rocketkv_jax.engine.generate import generate_ids
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


@contextlib.contextmanager
def _chat_in_a_terminal(ckpt, *args, **env):
    """`rocketkv chat` on a pty: yields (the terminal's fd, a buffer of what it printed,
    the process); kills the process if the test did not end it."""
    master, slave = os.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "rocketkv_jax.cli", "chat", "--model", str(ckpt), "--method",
         "full", "--capacity", "40", *args],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
        env={**os.environ, "ROCKETKV_JAX_COMPILE_CACHE": "off", **env})
    os.close(slave)
    try:
        yield master, bytearray(), p
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


def test_chat_in_a_terminal(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    tok = Tokenizer(ckpt)
    prompt = "w1 w2 w3 w4"
    reply = generate_ids(tiny_params(CFG), CFG, [tok.encode(prompt)], Full(),
                         max_new_tokens=3).tokens[0]
    with _chat_in_a_terminal(ckpt, "--max-new-tokens", "3") as (fd, buf, p):
        _read_until(fd, buf, "> ")
        os.write(fd, (prompt + "\n").encode())
        out = _read_until(fd, buf, "[turn 1]")
        assert tok.decode(reply) in out  # the streamed reply
        _read_until(fd, buf, "tok/s")
        os.write(fd, b"/reset\n")
        _read_until(fd, buf, "(conversation reset)")
        os.write(fd, b"/quit\n")
        assert p.wait(timeout=60) == 0


def test_a_line_that_is_not_utf8_costs_one_message_in_a_terminal(tmp_path):
    """At a keyboard the line is read by the terminal path of input(), which decodes with
    stdin's error handler: a bad byte is one error, and the next line is answered."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    # stdin strict, as in a UTF-8 locale such as en_US.UTF-8 (a C locale would escape)
    with _chat_in_a_terminal(ckpt, "--max-new-tokens", "2",
                             PYTHONIOENCODING="utf-8:strict") as (fd, buf, p):
        _read_until(fd, buf, "> ")
        os.write(fd, b"w1 \xff w2\n")
        _read_until(fd, buf, "error: input line 1: not UTF-8 text (byte 0xff at character 4)")
        os.write(fd, b"w3 w4\n")
        out = _read_until(fd, buf, "[turn 1]")
        assert "Traceback" not in out
        os.write(fd, b"/quit\n")
        assert p.wait(timeout=60) == 0

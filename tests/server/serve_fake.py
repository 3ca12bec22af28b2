"""Run the server over a fake engine until a signal (tests/server/test_live_server.py):
`python serve_fake.py TOKENIZER_DIR PORT`. The reply is REPLY's tokens, one per DELAY s."""

from __future__ import annotations

import sys

from fake_engine import FakeEngine

from rocketkv_jax.server import create_app
from rocketkv_jax.server.run import serve
from rocketkv_jax.tokenizer import Tokenizer

REPLY = "one two three four five six seven eight nine ten eleven twelve"
DELAY = 0.15


def main(tokenizer_dir: str, port: int) -> int:
    tok = Tokenizer(tokenizer_dir)
    ids = tok.encode(REPLY, add_special_tokens=False)
    engine = FakeEngine(lambda request: ids, delay=DELAY)
    app = create_app(engine, tok, "smollm2")
    serve(app, "127.0.0.1", port, drain_timeout=60, log_level="warning")
    print(f"drained: {engine.stats()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))

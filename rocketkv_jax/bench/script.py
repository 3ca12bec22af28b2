"""What the scripts in benchmarks/ share for their command line."""

from __future__ import annotations

import contextlib
import sys

from ..model_store import load_errors


@contextlib.contextmanager
def model_load_errors_exit():
    """Around a script's load of its --model: a model that cannot load (not found, a
    damaged checkpoint, a bad config or tokenizer) is one `error:` line on stderr and exit
    2, as the `rocketkv` commands say it, instead of a traceback."""
    try:
        yield
    except load_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

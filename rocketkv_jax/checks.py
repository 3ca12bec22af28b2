"""The numbers a user gives, each checked in one place: the library's entry points call
these checks, and the CLI's flags parse with them (`cli.common.flag`), so a flag and the API
argument behind it refuse the same values with the same words.

A check takes the value, the name to call it by (the API argument's name by default) and
the exception class of the entry point that calls it, and returns the value as the type it
stands for. It refuses what is not a number of that kind (bools, strings, floats for
counts), NaN and infinities, and values outside the range where the number means
something. Nothing is clamped.

This module imports nothing heavy: `rocketkv --help` builds its parser from it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

# A seed is any integer in [0, 2**64): `sampling.prng_key` turns its 64 bits into a key
# without dropping any, so two different seeds never share a stream of samples.
SEED_LIMIT = 2**64
# Token counts end up as int32 array sizes and positions.
COUNT_LIMIT = 2**31
MIN_PREFILL_CHUNK = 16


def _subject(name: str | None) -> str:
    return f"{name} " if name else ""


def integer(value, name: str | None, error: type[Exception] = ValueError, *, low: int = 0,
            high: int = COUNT_LIMIT, meaning: str = "") -> int:
    """`value` as an int in [low, high); numpy integers count, bools and floats do not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{_subject(name)}must be an integer{meaning}, got {value!r} "
                    f"({type(value).__name__})")
    value = int(value)
    if value < low:
        raise error(f"{_subject(name)}must be >= {low}{meaning}, got {value}")
    if value >= high:
        limit = "2**64" if high == SEED_LIMIT else "2**31" if high == COUNT_LIMIT else high
        raise error(f"{_subject(name)}must be < {limit}{meaning}, got {value}")
    return value


def real(value, name: str | None, error: type[Exception] = ValueError, *,
         ok: Callable[[float], bool], rule: str, meaning: str = "") -> float:
    """`value` as a finite float for which `ok` holds (`rule` says what that is)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{_subject(name)}must be a number{meaning}, got {value!r} "
                    f"({type(value).__name__})")
    x = float(value)
    if not math.isfinite(x) or not ok(x):
        raise error(f"{_subject(name)}must be {rule}{meaning}, got {value!r}")
    return x


# ------------------------------------------------------------------ named quantities
def seed(value, name: str | None = "seed", error: type[Exception] = ValueError) -> int:
    return integer(value, name, error, low=0, high=SEED_LIMIT,
                   meaning=" (a PRNG seed: any integer in [0, 2**64))")


# Sampling divides the logits by the temperature in float32: under float32's range (about
# 1e-38) the quotient is inf or NaN and the samples garbage, and long before that (1e-6)
# sampling is already greedy. So a positive temperature starts here; 0 is greedy.
MIN_TEMPERATURE = 1e-6


def temperature(value, name: str | None = "temperature",
                error: type[Exception] = ValueError) -> float:
    return real(value, name, error, ok=lambda x: x == 0 or x >= MIN_TEMPERATURE,
                rule=f"0 or a finite number >= {MIN_TEMPERATURE:g}", meaning=" (0 = greedy)")


def top_k(value, name: str | None = "top_k", error: type[Exception] = ValueError) -> int:
    return integer(value, name, error, low=0, meaning=" (0 = off)")


def top_p(value, name: str | None = "top_p", error: type[Exception] = ValueError) -> float:
    return real(value, name, error, ok=lambda x: 0 < x <= 1, rule="in (0, 1]",
                meaning=" (1 = off)")


def max_new_tokens(value, name: str | None = "max_new_tokens",
                   error: type[Exception] = ValueError) -> int:
    return integer(value, name, error, low=1)


def token_budget(value, name: str | None = "token_budget",
                 error: type[Exception] = ValueError) -> int:
    return integer(value, name, error, low=1,
                   meaning=" (KV tokens read per decode step per KV head)")


def skip_layers(value, name: str | None = "skip_layers",
                error: type[Exception] = ValueError) -> int:
    return integer(value, name, error, low=0,
                   meaning=" (leading layers kept dense and unevicted, e.g. 2 as in Quest's "
                   "code)")


def count(value, name: str | None, error: type[Exception] = ValueError, low: int = 1) -> int:
    """A count of things (prompts per batch, layers, steps): an int >= low."""
    return integer(value, name, error, low=low)


def capacity(value, name: str | None = "capacity", error: type[Exception] = ValueError) -> int:
    return integer(value, name, error, low=2, meaning=" (tokens of history per row)")


def prefill_chunk(value, name: str | None = "prefill_chunk",
                  error: type[Exception] = ValueError, off: str = "None") -> int | None:
    """Tokens per prefill chunk: an int >= 16, or None for the whole prompt in one pass
    (0 on the command line, and `off` names it in the message)."""
    if value is None:
        return None
    return integer(value, name, error, low=MIN_PREFILL_CHUNK,
                   meaning=f" (tokens per prefill chunk; {off} = the whole prompt in one "
                   "pass)")


def token_count(text: str, name: str | None, error: type[Exception] = ValueError) -> int:
    """A count of tokens typed as text: '4096' or '4k' (k = 1024) -> 4096, at least 1."""
    raw = str(text).strip().lower()
    scale = 1024 if raw.endswith("k") else 1
    try:
        value = int(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        raise error(f"{_subject(name)}{text!r} is not a whole number (like 512 or 4k)") from None
    if value <= 0:
        raise error(f"{_subject(name)}must be positive, got {text!r}")
    return integer(value, name, error)


def token_counts(text: str, name: str, error: type[Exception] = ValueError) -> tuple[int, ...]:
    """A comma list of token counts ('2k,4k,8k'), each kept once, in the order given."""
    values = tuple(dict.fromkeys(token_count(item, name, error)
                                 for item in str(text).split(",") if item.strip()))
    if not values:
        raise error(f"no {name}s given, got {text!r}")
    return values


def positive_number(value, name: str | None, error: type[Exception] = ValueError) -> float:
    return real(value, name, error, ok=lambda x: x > 0, rule="a finite number > 0")

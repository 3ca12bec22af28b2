"""What a generate request must be, checked before anything compiles, and how its prompts
are packed: padded up to length and batch buckets, so that a new prompt length rarely
means a new compile.

The checks raise `GenerateError` (a ValueError) with a message that says what to change;
the conversation and the shared prefill use the same checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import checks
from .. import sharding as shd
from ..models.config import ModelConfig
from ..sampling import Sampling


class GenerateError(ValueError):
    """Bad input to generate: empty or over-long prompts, a budget past the context."""


def length_bucket(n: int, limit: int | None = None) -> int:
    """Smallest bucket >= n among 16, 24, 32, 48, ... (powers of two and 1.5x them).

    `limit` caps the bucket (never below n) so a prompt near the model's context does
    not pad past it.
    """
    b = 16
    while b < n:
        b = b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3
    return max(n, min(b, limit)) if limit else b


def batch_bucket(n: int) -> int:
    """Batch sizes are padded to powers of two."""
    return 1 << max(0, (n - 1).bit_length())


def check_request(config: ModelConfig, prompts: Sequence[Sequence[int]],
                  max_new_tokens: int) -> None:
    """Raise GenerateError for requests the model cannot serve (before any compile).

    A prompt of P tokens with N new tokens needs P + N - 1 positions: the last sampled
    token is returned, never fed back.
    """
    check_config(config)
    checks.max_new_tokens(max_new_tokens, error=GenerateError)
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence | np.ndarray):
        raise GenerateError(f"prompts must be a list of token-id lists (one per prompt), got "
                            f"{type(prompts).__name__}; tokenize text first "
                            f"(Tokenizer.encode)")
    if not len(prompts):
        raise GenerateError("no prompts given")
    ctx = config.max_position_embeddings
    for i, p in enumerate(prompts):
        if isinstance(p, str | bytes) or not isinstance(p, Sequence | np.ndarray):
            raise GenerateError(f"prompt {i} must be a list of token ids, got "
                                f"{type(p).__name__}")
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty")
        check_token_ids(p, config.vocab_size, f"prompt {i}")
        if len(p) > ctx:
            raise GenerateError(
                f"prompt {i} has {len(p)} tokens, longer than the model's context of {ctx}"
            )
        if len(p) + max_new_tokens - 1 > ctx:
            raise GenerateError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it "
                f"needs {len(p) + max_new_tokens - 1} positions > the model's context of "
                f"{ctx}. Lower --max-new-tokens to at most {ctx - len(p) + 1}."
            )


def check_config(config) -> None:
    if not isinstance(config, ModelConfig):
        raise GenerateError(f"config must be a ModelConfig (Model.config of load_model), got "
                            f"{type(config).__name__}")


def check_method(method) -> None:
    """A KV method object: what `make_method` returns (it plans, names are not methods)."""
    if isinstance(method, str):
        raise GenerateError(f"method must be a KV method, not its name: pass "
                            f"make_method({method!r}, token_budget)")
    if not callable(getattr(method, "plan", None)):
        raise GenerateError(f"method must be a KV method (make_method(name, token_budget)), "
                            f"got {type(method).__name__}")


def check_sampling(sampling) -> None:
    if not isinstance(sampling, Sampling):
        raise GenerateError(f"sampling must be a Sampling(temperature, top_k, top_p), got "
                            f"{type(sampling).__name__}")


def check_stop_ids(stop_ids) -> None:
    """None (the config's EOS ids) or token ids (integers >= 0; an id past the model's
    vocabulary, such as a tokenizer's extra token, is never sampled and so never stops)."""
    if stop_ids is None:
        return
    if isinstance(stop_ids, str | bytes) or not isinstance(
            stop_ids, Sequence | set | frozenset | np.ndarray):
        raise GenerateError(f"stop_ids must be a list of token ids or None, got "
                            f"{type(stop_ids).__name__}")
    for t in stop_ids:
        checks.integer(t, "each of stop_ids", GenerateError)


def check_callbacks(**callbacks) -> None:
    for name, f in callbacks.items():
        if f is not None and not callable(f):
            raise GenerateError(f"{name} must be a function or None, got {type(f).__name__}")


def check_pad_id(pad_id, vocab_size: int) -> int:
    return checks.integer(pad_id, "pad_id", GenerateError, high=vocab_size,
                          meaning=f" (a token id of the vocabulary of {vocab_size})")


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str = "prompt") -> None:
    """Raise GenerateError unless every id is an integer in [0, vocab_size): the embedding
    gather would clamp an id outside it to the last row and answer silently wrong."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise GenerateError(f"{what} must be a sequence of integer token ids")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        j = int(bad[0])
        raise GenerateError(
            f"{what} holds token id {int(arr[j])} at position {j}, outside the model's "
            f"vocabulary of {vocab_size} (valid ids: 0..{vocab_size - 1}); the tokenizer "
            f"and the checkpoint disagree, or the ids are wrong"
        )


def stop_tuple(config: ModelConfig, stop_ids) -> tuple[int, ...]:
    return tuple(sorted({int(t) for t in (config.eos_token_ids if stop_ids is None
                                          else stop_ids)}))


def check_prefill_chunk(prefill_chunk) -> int | None:
    return checks.prefill_chunk(prefill_chunk, error=GenerateError)


def prompt_bucket(n: int, limit: int, prefill_chunk: int | None) -> int:
    """Padded prompt length for a longest prompt of n tokens: a `length_bucket`, or a whole
    number of chunks once the prompt is longer than one chunk."""
    T = length_bucket(n, limit=limit)
    if prefill_chunk is not None and T > prefill_chunk:
        T = max(n, min(-(-n // prefill_chunk) * prefill_chunk, limit))
    return T


def pack_prompts(config, prompts, max_new_tokens, pad_id, mesh=None,
          prefill_chunk=None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts into buckets: tokens [B, T] int32, lengths [B] int32. Padding
    rows (up to the batch bucket) repeat row 0 and are dropped from the results."""
    B = shd.round_batch(batch_bucket(len(prompts)), mesh)  # a multiple of the data axis
    T = prompt_bucket(max(map(len, prompts)), config.max_position_embeddings - max_new_tokens,
                      prefill_chunk)
    tokens = np.full((B, T), pad_id, np.int32)
    lengths = np.ones((B,), np.int32)
    for i, p in enumerate(list(prompts) + [prompts[0]] * (B - len(prompts))):
        tokens[i, : len(p)] = p
        lengths[i] = len(p)
    return tokens, lengths



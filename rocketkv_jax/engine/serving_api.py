"""What a serving engine takes and gives: one request, its events, and the errors of admission.

The HTTP front door (`rocketkv_jax.server`) turns an OpenAI request into a `ServeRequest`
(token ids, already templated), submits it with a callback, and turns the `Event`s the
engine calls it with (from the engine's own thread) into a response or a stream.
`engine.scheduler.Engine` is the engine; tests may stand in a fake with the same surface:

    engine.submit(request, on_event) -> Handle     # raises the errors below, at once
    handle.cancel()                                  # a client went away: frees the slot
    engine.stats() -> dict                           # counters (see Engine.stats)
    engine.drain(timeout) / engine.close()           # stop admitting, finish, stop
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..sampling import Sampling


class RequestRejected(ValueError):
    """The request cannot be served as asked (HTTP 400); the message says what to fix."""


class QueueFull(RuntimeError):
    """More requests wait than the queue holds (HTTP 429); retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopping(RuntimeError):
    """The engine admits nothing more: it is draining or stopped (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class ServeRequest:
    """One generation request in token ids.

    prompt: the prompt's token ids (chat template already applied);
    max_tokens: tokens to generate at most (the stop id, if one ends it, counts);
    method, token_budget: the KV method by registry name and its budget (None: full KV);
    sampling, seed: as `rocketkv generate` takes them; the same seed gives the same tokens;
    stop_ids: token ids that end the request (kept as its last token); None: the model's
    EOS ids, (): none (the request runs to max_tokens).
    """

    prompt: tuple[int, ...]
    max_tokens: int
    method: str = "rocketkv"
    token_budget: int | None = 256
    sampling: Sampling = Sampling()
    seed: int = 0
    stop_ids: tuple[int, ...] | None = None


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclasses.dataclass(frozen=True)
class Event:
    """What the engine reports for one request, in order: "token" events (one id each),
    then exactly one "done" (finish_reason "stop", "length" or "cancelled") or "error"
    (`error` says why; the engine keeps serving the others). `usage` rides on the last
    event: prompt_tokens, completion_tokens, cached_prompt_tokens (reused from the prefix
    cache)."""

    kind: Literal["token", "done", "error"]
    token: int | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    usage: dict | None = None


class Handle:
    """A submitted request: its id, and `cancel()` (safe to call any time, from any
    thread, more than once; a request that already finished ignores it)."""

    def __init__(self, request_id: str, cancel):
        self.id = request_id
        self._cancel = cancel

    def cancel(self) -> None:
        self._cancel(self.id)

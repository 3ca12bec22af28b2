"""A stand-in for `engine.scheduler.Engine` with the surface of `engine.serving_api`: each
request is answered by a thread that sends scripted token ids, honours cancel, and can be
told to raise an admission error or to fail mid-request. It records what it was given."""

from __future__ import annotations

import itertools
import threading
import time
from types import SimpleNamespace

from rocketkv_jax.engine.serving_api import EngineStopping, Event, Handle


class FakeEngine:
    """`reply(request) -> list of token ids` is what every request generates (cut at
    max_tokens, ended by a stop id); `delay` seconds pass before each token."""

    def __init__(self, reply, *, context: int = 512, vocab: int = 49152,
                 eos_ids: tuple[int, ...] = (2,), delay: float = 0.0, cached: int = 0):
        self.config = SimpleNamespace(max_position_embeddings=context, vocab_size=vocab,
                                      eos_token_ids=eos_ids)
        self.reply, self.delay, self.cached = reply, delay, cached
        self.requests: list = []  # every ServeRequest admitted, in order
        self.cancelled: set[str] = set()
        self.finished: dict[str, str] = {}  # id -> finish_reason or "error"
        self.raise_on_submit: Exception | None = None  # raised once by the next submit
        self.fail_after: int | None = None  # an "error" event after this many tokens
        self.stopping = False
        self._ids = itertools.count()
        self._cancel_flags: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, request, on_event):
        if self.raise_on_submit is not None:
            error, self.raise_on_submit = self.raise_on_submit, None
            raise error
        if self.stopping:
            raise EngineStopping("the engine is draining")
        rid = f"req-{next(self._ids)}"
        with self._lock:
            self.requests.append(request)
            self._cancel_flags[rid] = threading.Event()
        t = threading.Thread(target=self._run, args=(rid, request, on_event), daemon=True)
        self._threads.append(t)
        t.start()
        return Handle(rid, self._cancel)

    def _cancel(self, rid: str) -> None:
        with self._lock:
            self.cancelled.add(rid)
            self._cancel_flags[rid].set()

    def _run(self, rid, request, on_event) -> None:
        flag = self._cancel_flags[rid]
        n = 0

        def usage():
            return {"prompt_tokens": len(request.prompt), "completion_tokens": n,
                    "cached_prompt_tokens": self.cached}

        def end(kind, reason=None, error=None):
            self.finished[rid] = reason or kind
            on_event(Event(kind, finish_reason=reason, error=error, usage=usage()))

        for token in self.reply(request)[:request.max_tokens]:
            if flag.wait(self.delay) if self.delay else flag.is_set():
                return end("done", "cancelled")
            if self.fail_after is not None and n == self.fail_after:
                return end("error", error="injected failure in the fake engine")
            n += 1
            on_event(Event("token", token=token))
            if token in request.stop_ids:
                return end("done", "stop")
        return end("done", "length" if n == request.max_tokens else "stop")

    def stats(self) -> dict:
        return {"submitted": len(self.requests), "cancelled": len(self.cancelled),
                "finished": len(self.finished)}

    def drain(self, timeout: float | None = None) -> None:
        self.stopping = True
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in list(self._threads):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.stopping = True

"""One request's reply: submitted to the engine, its events carried from the engine's thread
into the event loop, turned into text pieces (detokenized, stop strings applied), and
cancelled in the engine when the client goes away or a stop string ends it."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator

import anyio
from fastapi.responses import StreamingResponse

from ..engine.serving_api import EngineStopping, Event, QueueFull, RequestRejected, ServeRequest
from .errors import APIError
from .text import IncrementalDecoder, StopMatcher


@dataclasses.dataclass(frozen=True)
class Piece:
    """Text for the client; the last piece also has `finish_reason` and `usage`, or `error`."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: str | None = None


class Reply:
    """A submitted request: `pieces()` yields its text as it comes; `cancel()` frees its
    slot (idempotent; called whenever the reply is left before its end)."""

    def __init__(self, engine, request: ServeRequest, tokenizer, stops: list[str]):
        self.request = request
        self.decoder = IncrementalDecoder(tokenizer, skip_ids=request.stop_ids or ())
        self.matcher = StopMatcher(stops)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False
        loop = asyncio.get_running_loop()

        def on_event(event: Event) -> None:  # the engine's thread
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server has stopped
                pass

        try:
            self.handle = engine.submit(request, on_event)
        except RequestRejected as e:
            raise APIError(400, str(e), code="request_rejected") from None
        except QueueFull as e:
            raise APIError(429, f"{e}; retry in a moment", code="queue_full",
                           headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}
                           ) from None
        except EngineStopping as e:
            raise APIError(503, f"the server is shutting down and takes no new requests "
                           f"({e})", code="shutting_down") from None

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self.handle.cancel()

    async def pieces(self) -> AsyncIterator[Piece]:
        tokens = 0
        while True:
            event = await self.events.get()
            if event.kind == "token":
                tokens += 1
                if self.matcher.stopped:
                    continue
                text = self.matcher.push(self.decoder.add(event.token))
                if self.matcher.stopped:  # the reply ends before the stop string
                    self.handle.cancel()
                if text:
                    yield Piece(text)
                continue
            self.finished = True
            usage = self.usage(event.usage, tokens)
            if event.kind == "error":
                yield Piece(error=event.error or "the engine failed this request",
                            usage=usage)
                return
            text = self.matcher.push(self.decoder.finish())
            text += self.matcher.finish()
            reason = "stop" if self.matcher.stopped else event.finish_reason
            yield Piece(text, finish_reason=reason, usage=usage)
            return

    def usage(self, reported: dict | None, tokens: int) -> dict:
        """OpenAI's usage object from the engine's counts (what it did not report is
        counted here: the prompt, the tokens that arrived)."""
        reported = reported or {}
        prompt = int(reported.get("prompt_tokens", len(self.request.prompt)))
        completion = int(reported.get("completion_tokens", tokens))
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {
                    "cached_tokens": int(reported.get("cached_prompt_tokens", 0))}}


async def until_disconnect(receive) -> None:
    """Returns when the client has gone (the request body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(reply: Reply, receive) -> Piece | None:
    """The whole reply as one piece, or None if the client left first (then the request is
    cancelled in the engine)."""

    async def gather() -> Piece:
        text = []
        async for piece in reply.pieces():
            text.append(piece.text)
        return dataclasses.replace(piece, text="".join(text))

    done = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():
            done.cancel()
            reply.cancel()
    return done.result() if not done.cancelled() else None


class EventStream(StreamingResponse):
    """Server-sent events that stop (and so cancel the reply, through the body iterator's
    `finally`) as soon as the client disconnects, whatever ASGI version the server speaks:
    Starlette watches for the disconnect only below ASGI 2.4, and above it learns of it only
    at the next write, which may be many tokens (or a long prefill) away."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()

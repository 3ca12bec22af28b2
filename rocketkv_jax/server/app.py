"""The HTTP front door: OpenAI's chat and completions endpoints over a serving engine.

`create_app(engine, tokenizer, model_name)` builds the FastAPI application. Each request is
checked (API key, body size, JSON, field types, the model's name, the context, the KV
method), encoded (chat content as plain text: `Tokenizer.encode_messages`), submitted to the
engine as a `ServeRequest`, and answered as one JSON object or as server-sent events. Every
failure is OpenAI's error object with its status (`errors.APIError`); docs/serving.md has
the table.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from ..engine.serving_api import ServeRequest
from ..methods.base import MethodConfigError
from ..names import METHOD_NAMES, METHOD_VARIANTS, MULTI_TURN_METHOD_NAMES
from ..sampling import Sampling
from ..tokenizer import TokenizerError
from .errors import APIError
from .reply import EventStream, Reply, collect
from .schemas import ChatRequest, CompletionRequest, validation_message

DEFAULT_MAX_BODY_BYTES = 8 * 2**20


class FrontDoor:
    """What every route needs: the engine, the tokenizer, the served name, the settings,
    and whether the server is draining (new requests 503, /health 503)."""

    def __init__(self, engine, tokenizer, model_name: str, *, api_key: str | None,
                 max_body_bytes: int, default_method: str, default_budget: int | None):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.default_method, self.default_budget = default_method, default_budget
        self.config = engine.config
        self.created = int(time.time())
        self.draining = False
        eos = tuple(self.config.eos_token_ids)
        self.chat_stop_ids = tokenizer.stop_ids(eos, chat=True)
        self.text_stop_ids = tokenizer.stop_ids(eos, chat=False)

    def begin_drain(self) -> None:
        self.draining = True

    # ------------------------------------------------------------ checks in order
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "no API key: send it as 'Authorization: Bearer KEY' (the "
                           "server was started with --api-key)", code="invalid_api_key")
        if not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def check_open(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests",
                           code="shutting_down")

    async def read_json(self, request: Request) -> object:
        """The body as JSON, at most max_body_bytes (the declared length and the bytes
        that arrive are both checked)."""
        limit = self.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server takes "
                             f"({limit} bytes); send a shorter prompt or start the server with "
                             f"a larger --max-body-mb", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON "
                           f"object with Content-Type: application/json",
                           code="invalid_json") from None

    def parse(self, model, data: object):
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got "
                           f"{type(data).__name__}", code="invalid_json")
        try:
            body = model.model_validate(data)
        except ValidationError as e:
            message, param = validation_message(e)
            raise APIError(400, message, param=param, code="invalid_value") from None
        if body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")
        return body

    def kv_method(self, body) -> tuple[str, int | None]:
        """The request's method and budget (None: full KV), checked by the registry."""
        from ..methods.registry import make_method

        given = body.model_fields_set
        budget = body.token_budget if "token_budget" in given else self.default_budget
        method = body.method or ("full" if budget is None else self.default_method)
        known = (*METHOD_NAMES, *METHOD_VARIANTS, *MULTI_TURN_METHOD_NAMES)
        if method not in known:
            raise APIError(400, f"unknown method {method!r}; use one of {', '.join(known)}",
                           param="method", code="invalid_value")
        try:
            make_method(method, budget)
        except MethodConfigError as e:
            raise APIError(400, f"{e}", param="token_budget", code="invalid_value") from None
        return method, None if method == "full" else budget

    def serve_request(self, ids: list[int], body, max_tokens: int | None,
                      stop_ids: tuple[int, ...], prompt_field: str,
                      max_field: str) -> ServeRequest:
        """The engine's request, after the context check: a prompt of P tokens with N new
        ones needs P + N - 1 positions (the last token is never fed back)."""
        ctx, n = self.config.max_position_embeddings, len(ids)
        if n == 0:
            raise APIError(400, "the prompt is empty", param=prompt_field, code="invalid_value")
        if n > ctx:
            raise APIError(400, f"the prompt has {n} tokens, more than the model's context of "
                           f"{ctx}; shorten it by at least {n - ctx} tokens",
                           param=prompt_field, code="context_length_exceeded")
        room = ctx - n + 1
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"the prompt has {n} tokens and {max_field} is {max_tokens}: "
                           f"together they need {n + max_tokens - 1} positions, more than the "
                           f"model's context of {ctx}; lower {max_field} to at most {room} or "
                           f"shorten the prompt", param=max_field,
                           code="context_length_exceeded")
        method, budget = self.kv_method(body)
        if body.ignore_eos:
            stop_ids = ()
        seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
        sampling = Sampling(temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p)
        return ServeRequest(prompt=tuple(ids), max_tokens=max_tokens, method=method,
                            token_budget=budget, sampling=sampling, seed=seed,
                            stop_ids=stop_ids)

    # ------------------------------------------------------------ answers
    async def answer(self, request: Request, body, serve: ServeRequest, chat: bool):
        reply = Reply(self.engine, serve, self.tok, body.stops())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(self.events(reply, head, chat, usage))
        piece = await collect(reply, request.receive)
        if piece is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        if piece.error is not None:
            raise APIError(500, f"generation failed: {piece.error}", code="generation_failed")
        choice = {"index": 0, "finish_reason": piece.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": piece.text}
        else:
            choice["text"] = piece.text
        return JSONResponse({**head, "choices": [choice], "usage": piece.usage})

    async def events(self, reply: Reply, head: dict, chat: bool, include_usage: bool):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False):
            choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
            if chat:
                delta = {"role": "assistant"} if role else {}
                choice["delta"] = delta if text is None else {**delta, "content": text}
            else:
                choice["text"] = text or ""
            return sse({**head, "choices": [choice], **extra})

        try:
            if chat:
                yield chunk("", role=True)
            async for piece in reply.pieces():
                if piece.error is not None:
                    yield sse(APIError(500, f"generation failed: {piece.error}",
                                       code="generation_failed").body())
                    break
                if piece.text:
                    yield chunk(piece.text)
                if piece.finish_reason is not None:
                    yield chunk(None, piece.finish_reason)
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": piece.usage})
            yield "data: [DONE]\n\n"
        finally:  # the client left, or the loop stopped: free the slot
            reply.cancel()


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(engine, tokenizer, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, default_method: str = "rocketkv",
               default_budget: int | None = 256) -> FastAPI:
    """The server's application. `engine`: an object with the surface of
    `engine.serving_api` (submit, stats, and `config`, the ModelConfig); `model_name`: the
    name clients must send as `model`; `api_key`: if given, every /v1 request must carry
    `Authorization: Bearer <api_key>`; `default_method` / `default_budget`: the KV method of
    a request that names none (budget None: full KV). `app.state.front.begin_drain()` makes
    new requests (and /health) answer 503."""
    front = FrontDoor(engine, tokenizer, model_name, api_key=api_key,
                      max_body_bytes=max_body_bytes, default_method=default_method,
                      default_budget=default_budget)
    app = FastAPI(title="rocketkv serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.front = front

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(e.status_code, message.get(e.status_code, str(e.detail))).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    @app.get("/health")
    async def health():
        if front.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": front.created,
                "owned_by": "rocketkv-jax",
                "context_length": front.config.max_position_embeddings}

    @app.get("/v1/models")
    async def models(request: Request):
        front.authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        front.authorize(request)
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")
        return model_card()

    @app.get("/v1/stats")
    async def stats(request: Request):
        front.authorize(request)
        return engine.stats()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        front.authorize(request)
        front.check_open()
        body = front.parse(ChatRequest, await front.read_json(request))
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.text()} for m in body.messages]
        try:
            ids = front.tok.encode_messages(messages)
        except TokenizerError as e:
            raise APIError(400, f"{e}", param="messages", code="invalid_value") from None
        # OpenAI's newer name wins where both are given
        field = "max_completion_tokens" if body.max_completion_tokens is not None \
            else "max_tokens"
        max_tokens = getattr(body, field)
        serve = front.serve_request(ids, body, max_tokens, front.chat_stop_ids, "messages",
                                    field)
        return await front.answer(request, body, serve, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        front.authorize(request)
        front.check_open()
        body = front.parse(CompletionRequest, await front.read_json(request))
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(
            body.prompt[0], str) else body.prompt
        if isinstance(prompt, str):
            try:
                ids = front.tok.encode(prompt)
            except TokenizerError as e:
                raise APIError(400, f"{e}", param="prompt", code="invalid_value") from None
        else:
            vocab = front.config.vocab_size
            bad = next((i for i in prompt if not 0 <= i < vocab), None)
            if bad is not None:
                raise APIError(400, f"the prompt's token id {bad} is outside the vocabulary "
                               f"(0 to {vocab - 1})", param="prompt", code="invalid_value")
            ids = list(prompt)
        serve = front.serve_request(ids, body, body.max_tokens, front.text_stop_ids, "prompt",
                                    "max_tokens")
        return await front.answer(request, body, serve, chat=False)

    return app

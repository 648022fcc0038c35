"""The HTTP API: OpenAI-style chat and text completions over the ring.

A request's path: the handler below tokenizes it (completion.py), the backend's entry sends
it into the ring (entry.py), the shards run it (shard/runtime.py), and the tail's tokens come
back through the entry to `pieces`, which turns them into text for the answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dnet import __version__
from dnet.api.completion import (
    Backend,
    Job,
    Piece,
    Totals,
    chat_prompt,
    make_job,
    pieces,
    text_prompt,
)
from dnet.api.entry import RingError
from dnet.api.schema import ApiError, ChatRequest, CompletionRequest
from dnet.web import mount_dashboard

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
DISCONNECT_POLL_S = 0.5


class BodyLimit:
    """Refuse request bodies over `max_bytes` with a 413, counting what really arrives.

    Pure ASGI rather than an @app.middleware: Starlette's BaseHTTPMiddleware hides client
    disconnects from the handler, and a declared content-length can be absent (chunked).
    The body is read here (FastAPI reads it whole anyway) and replayed to the app; later
    messages (the disconnect) reach the app through one pump.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # One reader of the connection from here on: the handler's disconnect checks and the
        # streaming response's both read this queue, and the pump keeps the transport read,
        # so a client that goes away is noticed even while the handler only computes.
        inbox: asyncio.Queue[Message] = asyncio.Queue()

        async def pump() -> None:
            while True:
                message = await receive()
                await inbox.put(message)
                if message["type"] == "http.disconnect":
                    return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await inbox.get()

        pumping = asyncio.ensure_future(pump())
        try:
            await self.app(scope, replay, send)
        finally:
            pumping.cancel()

    async def _too_large(self, send: Send) -> None:
        error = ApiError(413, f"request body over {self.max_bytes} bytes")
        payload = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


class ApiKeyGuard:
    """Bearer-token auth for /v1/ when the node runs with --api-key (OpenAI's 401 shape)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "missing or incorrect API key: send "
                                      "'Authorization: Bearer <key>'", code="invalid_api_key")
                payload = json.dumps(error.body()).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": payload})
                return
        await self.app(scope, receive, send)


def create_app(backend: Backend, *, extra_health: Callable[[], dict] | None = None,
               api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="dnet", version=__version__)
    app.add_middleware(BodyLimit)
    if api_key:
        app.add_middleware(ApiKeyGuard, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own errors (unknown route, wrong method, unreadable body) in OpenAI's shape.
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get(
            "msg", "invalid request")
        return ApiError(400, message, param=where or None).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        status = {"status": "ok", "role": "api", "model": backend.model_name,
                  "version": __version__}
        if extra_health is not None:
            status.update(extra_health())
        return status

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [backend.model_name] if backend.model_name else []
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "dnet"} for name in names]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        ensure_available(backend)
        job = make_job(backend, body, chat_prompt(backend, body), logprobs=body.logprobs,
                       top_logprobs=body.top_logprobs or 0)
        return await _answer(request, backend, job, body.stream, body.include_usage(), "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ensure_available(backend)
        job = make_job(backend, body, text_prompt(backend, body),
                       logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0)
        return await _answer(request, backend, job, body.stream, body.include_usage(), "text")

    mount_dashboard(app)
    return app


def ensure_available(backend: Backend) -> None:
    """A backend that cannot serve now (a mesh with no ring) answers its 503 here, before any
    templating or validation against a model it may not have."""
    check = getattr(backend, "ensure_available", None)
    if check is not None:
        check()


async def _answer(request: Request, backend: Backend, job: Job, stream: bool,
                  include_usage: bool, kind: str):
    totals = Totals(prompt_tokens=len(job.prompt))
    source = pieces(backend, job, totals)
    if stream:
        # Wait for the first piece before answering, so a dead ring is a 503, not a 200
        # whose stream breaks.
        try:
            first = await anext(source)
        except RingError as exc:
            raise ring_error(exc) from exc
        return StreamingResponse(_sse(backend, job, kind, first, source, totals, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    collect = asyncio.ensure_future(_collect(source))
    try:
        while not collect.done():
            await asyncio.wait({collect}, timeout=DISCONNECT_POLL_S)
            if not collect.done() and await request.is_disconnected():
                collect.cancel()  # frees the request's KV caches through the entry
                return JSONResponse(status_code=499, content={})
        parts = collect.result()
    except RingError as exc:
        raise ring_error(exc) from exc
    finally:
        if not collect.done():
            collect.cancel()
    return _full_response(backend, job, kind, parts, totals)


def ring_error(exc: RingError) -> ApiError:
    kind = "rate_limit_error" if exc.status == 429 else "server_error"
    return ApiError(exc.status, exc.message, kind=kind)


async def _collect(source: AsyncIterator[Piece]) -> list[Piece]:
    return [piece async for piece in source]


def _full_response(backend: Backend, job: Job, kind: str, parts: list[Piece],
                   totals: Totals) -> dict[str, Any]:
    text = "".join(p.text for p in parts)
    finish = parts[-1].finish_reason if parts else "stop"
    ids = [t for p in parts for t in p.token_ids]
    logprobs = [e for p in parts for e in p.logprobs]
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": {"content": logprobs} if job.logprobs else None,
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish,
                  "logprobs": _text_logprobs(logprobs) if job.logprobs else None}
        obj = "text_completion"
    if job.return_token_ids:
        choice["token_ids"] = ids
    return {"id": _response_id(job, kind), "object": obj, "created": job.created,
            "model": backend.model_name, "choices": [choice], "usage": totals.usage()}


async def _sse(backend: Backend, job: Job, kind: str, first: Piece,
               rest: AsyncIterator[Piece], totals: Totals,
               include_usage: bool) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    base = {"id": _response_id(job, kind), "object": obj, "created": job.created,
            "model": backend.model_name}

    def chunk(piece: Piece, role: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if piece.text or role:
                delta["content"] = piece.text
            choice: dict[str, Any] = {
                "index": 0, "delta": delta, "finish_reason": piece.finish_reason,
                "logprobs": {"content": piece.logprobs} if job.logprobs else None}
        else:
            choice = {"index": 0, "text": piece.text, "finish_reason": piece.finish_reason,
                      "logprobs": _text_logprobs(piece.logprobs) if job.logprobs else None}
        if job.return_token_ids:
            choice["token_ids"] = piece.token_ids
        body = {**base, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk(first, role=True)
        async for piece in rest:
            yield chunk(piece)
    except RingError as exc:
        log.warning("request %s failed mid-stream: %s", job.id, exc.message)
        error = ring_error(exc).body()
        yield f"data: {json.dumps(error)}\n\n"
    else:
        if include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': totals.usage()})}\n\n"
    yield "data: [DONE]\n\n"


def _text_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The legacy completions shape of log-probabilities."""
    offsets, position = [], 0
    for entry in entries:
        offsets.append(position)
        position += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                         for e in entries],
        "text_offset": offsets,
    }


def _response_id(job: Job, kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{job.id}"

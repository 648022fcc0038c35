"""ASGI middleware of the HTTP API: a body-size limit and the API key.

Pure ASGI rather than @app.middleware: Starlette's BaseHTTPMiddleware hides client
disconnects from the handler. Errors come in the shape of the path's API surface.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dnet.api.errors import ApiError, surface_of

MAX_BODY_BYTES = 16 * 1024 * 1024


async def send_error(send: Send, error: ApiError, path: str,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(error.body(surface_of(path))).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


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
                await self._too_large(send, scope["path"])
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

    async def _too_large(self, send: Send, path: str) -> None:
        await send_error(send, ApiError(413, f"request body over {self.max_bytes} bytes"), path)


class ApiKeyGuard:
    """The API key on /v1/ when the node runs with --api-key: `Authorization: Bearer KEY`
    (OpenAI's clients) or `x-api-key: KEY` (Anthropic's). CORS preflights pass (they carry
    no credentials by design)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.bearer = f"Bearer {api_key}".encode()
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"].startswith("/v1/")
                and scope["method"] != "OPTIONS"):
            headers = dict(scope["headers"])
            bearer = headers.get(b"authorization", b"")
            key = headers.get(b"x-api-key", b"")
            if not (hmac.compare_digest(bearer, self.bearer) or hmac.compare_digest(key, self.key)):
                error = ApiError(401, "missing or incorrect API key: send 'Authorization: "
                                      "Bearer <key>' or 'x-api-key: <key>'",
                                 code="invalid_api_key")
                await send_error(send, error, scope["path"], [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)

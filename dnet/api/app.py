"""The HTTP API: OpenAI chat and text completions, OpenAI Responses and Anthropic Messages.

A request's path: a surface module turns it into a Job (`openai_chat`, `openai_text`,
`anthropic`, `responses`, all over the shared core in `generation.py`), the backend's entry
sends it into the ring (entry.py), the shards run it, and the tail's tokens come back
through the entry as steps of text, reasoning and tool calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from dnet import __version__
from dnet.api import anthropic, openai_chat, openai_text, responses
from dnet.api.errors import ApiError, surface_of
from dnet.api.generation import Backend
from dnet.api.middleware import ApiKeyGuard, BodyLimit
from dnet.api.schema import ChatRequest, CompletionRequest
from dnet.api.streaming import ClientGone, off_the_loop
from dnet.web import mount_dashboard


@dataclass(frozen=True)
class HttpOptions:
    """How a node's HTTP API behaves (`dnet api` / `dnet join` flags)."""

    api_key: str | None = None
    cors_origins: tuple[str, ...] = ("*",)  # permissive by default, as mlx-lm's server
    # The old behaviour: special-token strings in message text become control tokens.
    special_tokens_in_messages: bool = False


def validation_message(exc: RequestValidationError) -> ApiError:
    """A 400 that says what is wrong in the client's terms."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "malformed JSON")
        position = first.get("loc", ("body", None))[-1]
        where = f" at character {position}" if isinstance(position, int) else ""
        return ApiError(400, f"the request body is not valid JSON: {reason}{where}")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request")
    if not where:
        return ApiError(400, f"the request body: {message}")
    return ApiError(400, f"{where}: {message}", param=where)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response(surface_of(request.url.path))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's own errors (unknown route, wrong method, unreadable body).
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind=kind).response(
            surface_of(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_message(exc).response(surface_of(request.url.path))

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, __: ClientGone) -> JSONResponse:
        return JSONResponse(status_code=499, content={})


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "dnet"}


def create_app(backend: Backend, *, extra_health: Callable[[], dict] | None = None,
               api_key: str | None = None, options: HttpOptions | None = None) -> FastAPI:
    options = options or HttpOptions(api_key=api_key)
    escape = not options.special_tokens_in_messages
    app = FastAPI(title="dnet", version=__version__)
    app.add_middleware(BodyLimit)
    if options.api_key:
        app.add_middleware(ApiKeyGuard, api_key=options.api_key)
    # Outermost, so preflights and every answer (errors included) carry the CORS headers.
    app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                       allow_methods=["*"], allow_headers=["*"])
    _install_errors(app)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        status = {"status": "ok", "role": "api", "model": backend.model_name,
                  "version": __version__}
        if extra_health is not None:
            status.update(extra_health())
        return status

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict[str, Any]:
        names = [backend.model_name] if backend.model_name else []
        return {"object": "list", "data": [model_object(name) for name in names]}

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "HEAD"])
    async def model(model_id: str) -> dict[str, Any]:
        if not backend.model_name or not backend.accepts_model(model_id):
            raise ApiError(404, f"the model {model_id!r} does not exist; this node serves "
                                f"{backend.model_name!r}", param="model",
                           code="model_not_found")
        return model_object(backend.model_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        await backend.ensure_available()
        return await openai_chat.serve(request, backend, body, escape=escape)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        await backend.ensure_available()
        return await openai_text.serve(request, backend, body)

    @app.post("/v1/messages")
    async def messages(body: anthropic.MessagesRequest, request: Request):
        await backend.ensure_available()
        return await anthropic.serve(request, backend, body, escape=escape)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: anthropic.CountTokensRequest) -> dict[str, int]:
        await backend.ensure_available()
        return await off_the_loop(anthropic.count_tokens, backend, body, escape=escape)

    @app.post("/v1/responses")
    async def create_response(body: responses.ResponsesRequest, request: Request):
        await backend.ensure_available()
        return await responses.serve(request, backend, body, escape=escape)

    mount_dashboard(app)
    return app

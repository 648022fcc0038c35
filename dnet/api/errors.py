"""Errors as each API surface's clients expect them: OpenAI's or Anthropic's shape.

`/v1/messages` (Anthropic) answers `{"type": "error", "error": {"type", "message"}}`; every
other path OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from fastapi.responses import JSONResponse


class Surface(Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


ANTHROPIC_PREFIX = "/v1/messages"

# Anthropic's error types by HTTP status (docs.anthropic.com, "Errors").
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error",
                   529: "overloaded_error"}


def surface_of(path: str) -> Surface:
    return Surface.ANTHROPIC if path.startswith(ANTHROPIC_PREFIX) else Surface.OPENAI


class ApiError(Exception):
    """An error answered with an HTTP status in the shape of the surface it happened on."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def response(self, surface: Surface = Surface.OPENAI) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body(surface))

    def body(self, surface: Surface = Surface.OPENAI) -> dict[str, Any]:
        if surface is Surface.ANTHROPIC:
            kind = ANTHROPIC_TYPES.get(self.status, "api_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def ring_error(status: int, message: str) -> ApiError:
    """A failure of the ring (RingError's status and message) as an API error."""
    kind = "rate_limit_error" if status == 429 else "server_error"
    return ApiError(status, message, kind=kind)

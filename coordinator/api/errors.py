"""Rendering errors in the shape each API family's clients expect."""

from __future__ import annotations

import enum
import json
from typing import Any

from coordinator.errors import ApiError


class Family(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


_ANTHROPIC_PREFIX = "/v1/messages"


def family_of(path: str) -> Family:
    """The error shape a request to ``path`` expects: Anthropic's under ``/v1/messages``
    (``/v1/messages/count_tokens`` too, were it asked for), OpenAI's elsewhere."""
    if path == _ANTHROPIC_PREFIX or path.startswith(_ANTHROPIC_PREFIX + "/"):
        return Family.ANTHROPIC
    return Family.OPENAI


# Anthropic's documented error types, by status.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "api_error",
    504: "api_error",
}


def error_body(error: ApiError, family: Family) -> dict[str, Any]:
    if family is Family.ANTHROPIC:
        kind = _ANTHROPIC_TYPES.get(error.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}
    return {"error": {"message": error.message, "type": error.type, "code": error.code,
                      "param": error.param}}


def error_headers(error: ApiError) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **(error.headers or {})}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return headers


def render(error: ApiError, family: Family) -> tuple[int, dict[str, str], bytes]:
    """The one rendering of an error: status, headers and body, in the family's shape."""
    return error.status, error_headers(error), json.dumps(error_body(error, family)).encode()

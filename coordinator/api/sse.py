"""Server-sent-event framing per endpoint family."""

from __future__ import annotations

import json

from coordinator.dispatch.chunks import Endpoint, event_type
from coordinator.dispatch.relay import End, InBandError, RelayItem

DONE = b"data: [DONE]\n\n"
_NAMED_EVENTS = (Endpoint.RESPONSES, Endpoint.MESSAGES)


def frame(endpoint: Endpoint, item: RelayItem) -> bytes:
    """The bytes for one relay item; End and errors carry each family's terminator."""
    match item:
        case str():
            if endpoint in _NAMED_EVENTS:
                name = event_type(item) or "message"
                return f"event: {name}\ndata: {item}\n\n".encode()
            return f"data: {item}\n\n".encode()
        case End():
            return DONE if endpoint not in _NAMED_EVENTS else b""
        case InBandError():
            return _error(endpoint, item)


def _error(endpoint: Endpoint, error: InBandError) -> bytes:
    body: dict[str, object]
    if endpoint is Endpoint.MESSAGES:
        body = {"type": "error", "error": {"type": "api_error", "message": error.message}}
        return f"event: error\ndata: {json.dumps(body)}\n\n".encode()
    if endpoint is Endpoint.RESPONSES:
        body = {"type": "error", "code": "provider_error", "message": error.message,
                "param": None}
        return f"event: error\ndata: {json.dumps(body)}\n\n".encode()
    body = {"error": {"message": error.message, "type": "provider_error", "code": error.reason,
                      "param": None}}
    return f"data: {json.dumps(body)}\n\n".encode() + DONE

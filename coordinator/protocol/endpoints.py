"""The inference endpoints, and the request body a provider decrypts. Pure.

Part of the protocol because a provider learns which endpoint it is serving
from the ``"endpoint"`` field of the body it decrypts, and answers in that
endpoint's native streaming events.
"""

from __future__ import annotations

import enum
import json
from typing import Any


class Endpoint(enum.Enum):
    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    RESPONSES = "/v1/responses"
    MESSAGES = "/v1/messages"


def inner_request(body: dict[str, Any], endpoint: Endpoint) -> bytes:
    """What the provider decrypts: the consumer's body plus the target endpoint."""
    return json.dumps({**body, "endpoint": endpoint.value}, separators=(",", ":")).encode()

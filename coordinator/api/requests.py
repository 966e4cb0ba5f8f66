"""Parsing and validating consumer bodies, per endpoint. Pure.

Every problem becomes an ``ApiError`` with status 400 and a message naming
the field, never a traceback.
"""

from __future__ import annotations

from typing import Any

import attrs

from coordinator.errors import bad_request
from coordinator.protocol import boundedjson
from coordinator.protocol.endpoints import Endpoint

# Request fields the coordinator consumes itself and does not forward.
ALLOWLIST_FIELD = "provider_ids"
# Providers may not declare longer model ids either (providers/admission.py).
MAX_MODEL_CHARS = 256


@attrs.frozen
class ParsedRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    max_tokens: int
    allowlist: frozenset[str] | None


def parse_body(raw: bytes, max_depth: int = 64) -> dict[str, Any]:
    if not raw.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        body = boundedjson.loads(raw, max_depth=max_depth)
    except boundedjson.JsonLimitError as exc:
        raise bad_request(f"request body is not valid JSON: {str(exc)[:200]}",
                          "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", "invalid_json")
    return body


def _require(body: dict[str, Any], field: str, kinds: type | tuple[type, ...], what: str) -> Any:
    if field not in body:
        raise bad_request(f"missing required field '{field}'", "missing_required_parameter")
    value = body[field]
    # bool is an int in Python; JSON true is not an integer.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
        raise bad_request(f"'{field}' must be {what}", "invalid_type")
    return value


def _optional(body: dict[str, Any], field: str, kinds: type | tuple[type, ...], what: str) -> Any:
    if body.get(field) is None:
        return None
    return _require(body, field, kinds, what)


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def validate(endpoint: Endpoint, body: dict[str, Any], default_max_tokens: int = 256, *,
             max_tokens_limit: int = 1_000_000) -> ParsedRequest:
    model = _require(body, "model", str, "a string")
    if not model:
        raise bad_request("'model' must not be empty", "invalid_value")
    if len(model) > MAX_MODEL_CHARS:
        raise bad_request(f"'model' must be at most {MAX_MODEL_CHARS} characters",
                          "invalid_value")
    match endpoint:
        case Endpoint.CHAT:
            messages = _require(body, "messages", list, "an array of message objects")
            if not messages or not all(isinstance(m, dict) for m in messages):
                raise bad_request("'messages' must be a non-empty array of message objects")
        case Endpoint.MESSAGES:
            messages = _require(body, "messages", list, "an array of message objects")
            if not messages or not all(isinstance(m, dict) for m in messages):
                raise bad_request("'messages' must be a non-empty array of message objects")
            _require(body, "max_tokens", int, "an integer")
            _optional(body, "system", (str, list), "a string or an array of content blocks")
        case Endpoint.COMPLETIONS:
            prompt = _require(body, "prompt", (str, list), "a string or an array of strings")
            if isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt):
                raise bad_request("'prompt' must be a string or an array of strings")
        case Endpoint.RESPONSES:
            _require(body, "input", (str, list), "a string or an array of input items")
            _optional(body, "instructions", str, "a string")
    stream = _optional(body, "stream", bool, "a boolean") or False
    _optional(body, "tools", list, "an array of tools")
    max_tokens = default_max_tokens
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = _optional(body, field, int, "an integer")
        if value is not None:
            if value < 1:
                raise bad_request(f"'{field}' must be at least 1", "invalid_value")
            if value > max_tokens_limit:
                raise bad_request(f"'{field}' must be at most {max_tokens_limit}",
                                  "invalid_value")
            max_tokens = value
    allowlist = _optional(body, ALLOWLIST_FIELD, list, "an array of provider ids")
    if allowlist is not None and not all(isinstance(p, str) for p in allowlist):
        raise bad_request(f"'{ALLOWLIST_FIELD}' must be an array of strings")
    return ParsedRequest(
        body={k: v for k, v in body.items() if k != ALLOWLIST_FIELD},
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        allowlist=frozenset(allowlist) if allowlist is not None else None,
    )

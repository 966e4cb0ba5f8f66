"""Parsing and validating consumer bodies, per endpoint. Pure.

Every problem becomes an ``ApiError`` with status 400 and a message naming
the field (and OpenAI's ``param``), never a traceback. A parameter the
coordinator cannot honour is refused, not ignored: a consumer asking for two
choices must not silently get one.
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
    max_tokens_given: bool = False  # the consumer set it (else: the routing default)


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
        raise bad_request(f"missing required field '{field}'", "missing_required_parameter",
                          field)
    value = body[field]
    # bool is an int in Python; JSON true is not an integer.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
        raise bad_request(f"'{field}' must be {what}", "invalid_type", field)
    return value


def _optional(body: dict[str, Any], field: str, kinds: type | tuple[type, ...], what: str) -> Any:
    if body.get(field) is None:
        return None
    return _require(body, field, kinds, what)


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _only_one_choice(body: dict[str, Any], endpoint: Endpoint) -> None:
    """Refuse what asks for several choices, or the best of several: the coordinator
    relays one provider's one stream, and assembling several would merge them into one."""
    n = _optional(body, "n", int, "an integer")
    if n is not None and n != 1:
        raise bad_request("'n' must be 1: the coordinator returns one choice per request "
                          "(send one request per choice)", "unsupported_value", "n")
    if endpoint is not Endpoint.COMPLETIONS:
        return
    best_of = _optional(body, "best_of", int, "an integer")
    if best_of is not None and best_of != 1:
        raise bad_request("'best_of' must be 1: the coordinator streams one completion per "
                          "request and cannot choose the best of several",
                          "unsupported_value", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("'prompt' must be a string or an array of one string: the "
                          "coordinator returns one choice per request (send one request per "
                          "prompt)", "unsupported_value", "prompt")


def validate(endpoint: Endpoint, body: dict[str, Any], default_max_tokens: int = 256, *,
             max_tokens_limit: int = 1_000_000) -> ParsedRequest:
    model = _require(body, "model", str, "a string")
    if not model:
        raise bad_request("'model' must not be empty", "invalid_value", "model")
    if len(model) > MAX_MODEL_CHARS:
        raise bad_request(f"'model' must be at most {MAX_MODEL_CHARS} characters",
                          "invalid_value", "model")
    match endpoint:
        case Endpoint.CHAT:
            messages = _require(body, "messages", list, "an array of message objects")
            if not messages or not all(isinstance(m, dict) for m in messages):
                raise bad_request("'messages' must be a non-empty array of message objects",
                                  param="messages")
        case Endpoint.MESSAGES:
            messages = _require(body, "messages", list, "an array of message objects")
            if not messages or not all(isinstance(m, dict) for m in messages):
                raise bad_request("'messages' must be a non-empty array of message objects",
                                  param="messages")
            _require(body, "max_tokens", int, "an integer")
            _optional(body, "system", (str, list), "a string or an array of content blocks")
        case Endpoint.COMPLETIONS:
            prompt = _require(body, "prompt", (str, list), "a string or an array of strings")
            if isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt):
                raise bad_request("'prompt' must be a string or an array of strings",
                                  param="prompt")
        case Endpoint.RESPONSES:
            _require(body, "input", (str, list), "a string or an array of input items")
            _optional(body, "instructions", str, "a string")
    if endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS):
        _only_one_choice(body, endpoint)
    stream = _optional(body, "stream", bool, "a boolean") or False
    _optional(body, "tools", list, "an array of tools")
    max_tokens, given = default_max_tokens, False
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = _optional(body, field, int, "an integer")
        if value is not None:
            if value < 1:
                raise bad_request(f"'{field}' must be at least 1", "invalid_value", field)
            if value > max_tokens_limit:
                raise bad_request(f"'{field}' must be at most {max_tokens_limit}",
                                  "invalid_value", field)
            max_tokens, given = value, True
    allowlist = _optional(body, ALLOWLIST_FIELD, list, "an array of provider ids")
    if allowlist is not None and not all(isinstance(p, str) for p in allowlist):
        raise bad_request(f"'{ALLOWLIST_FIELD}' must be an array of strings",
                          param=ALLOWLIST_FIELD)
    return ParsedRequest(
        body={k: v for k, v in body.items() if k != ALLOWLIST_FIELD},
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        allowlist=frozenset(allowlist) if allowlist is not None else None,
        max_tokens_given=given,
    )

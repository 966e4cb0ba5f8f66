"""Chunk classification: boilerplate, content or terminal. Pure.

A chunk is the JSON payload of one streamed event, as the provider sends it.
Classification reads the *parsed* ``type`` and fields, never substrings, so a
content delta whose text merely contains ``response.created`` is content.
Anything that does not parse is content: it cannot be proven harmless to drop.
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


class ChunkKind(enum.Enum):
    BOILERPLATE = "boilerplate"
    CONTENT = "content"
    TERMINAL = "terminal"  # a provider's own end marker; the coordinator writes its own


_RESPONSES_BOILERPLATE = frozenset({"response.created", "response.in_progress"})
_MESSAGES_BOILERPLATE = frozenset({"message_start", "ping"})
_CHAT_DELTA_CONTENT_KEYS = ("content", "tool_calls", "function_call", "refusal",
                            "reasoning_content", "reasoning", "audio")


def classify(endpoint: Endpoint, payload: str) -> ChunkKind:
    if payload.strip() == "[DONE]":
        return ChunkKind.TERMINAL
    try:
        event = json.loads(payload)
    except ValueError:
        return ChunkKind.CONTENT
    if not isinstance(event, dict):
        return ChunkKind.CONTENT
    match endpoint:
        case Endpoint.CHAT:
            return _chat(event)
        case Endpoint.COMPLETIONS:
            return _completions(event)
        case Endpoint.RESPONSES | Endpoint.MESSAGES:
            return _typed_event(endpoint, event)


def _choices(event: dict[str, Any]) -> list[dict[str, Any]] | None:
    choices = event.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        return None
    return choices


def _chat(event: dict[str, Any]) -> ChunkKind:
    choices = _choices(event)
    if choices is None:
        return ChunkKind.CONTENT
    for choice in choices:
        if choice.get("finish_reason") is not None:
            return ChunkKind.CONTENT
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return ChunkKind.CONTENT
        if any(delta.get(key) not in (None, "", []) for key in _CHAT_DELTA_CONTENT_KEYS):
            return ChunkKind.CONTENT
    # A role-only delta, or a usage-only chunk with no choices.
    return ChunkKind.BOILERPLATE


def _completions(event: dict[str, Any]) -> ChunkKind:
    choices = _choices(event)
    if choices is None:
        return ChunkKind.CONTENT
    for choice in choices:
        if choice.get("finish_reason") is not None or choice.get("text") not in (None, ""):
            return ChunkKind.CONTENT
    return ChunkKind.BOILERPLATE


# Events that announce content to come: boilerplate while the announced object is
# empty. (A function_call item or a tool_use block is the model's decision to
# call a tool, which is content, so the object's own type must match.)
_ANNOUNCEMENTS: dict[tuple[Endpoint, str], tuple[str, str, str]] = {
    # (endpoint, event type): (field, object type, the object's content key)
    (Endpoint.RESPONSES, "response.output_item.added"): ("item", "message", "content"),
    (Endpoint.RESPONSES, "response.content_part.added"): ("part", "output_text", "text"),
    (Endpoint.MESSAGES, "content_block_start"): ("content_block", "text", "text"),
}
_LIFECYCLE = {Endpoint.RESPONSES: _RESPONSES_BOILERPLATE, Endpoint.MESSAGES: _MESSAGES_BOILERPLATE}


def _typed_event(endpoint: Endpoint, event: dict[str, Any]) -> ChunkKind:
    """Responses and Anthropic events: classified by their parsed ``type``."""
    kind = event.get("type")
    if not isinstance(kind, str):
        return ChunkKind.CONTENT
    if kind in _LIFECYCLE[endpoint]:
        return ChunkKind.BOILERPLATE
    announced = _ANNOUNCEMENTS.get((endpoint, kind))
    if announced is not None:
        field, object_type, content_key = announced
        obj = event.get(field)
        if isinstance(obj, dict) and obj.get("type") == object_type and not obj.get(content_key):
            return ChunkKind.BOILERPLATE
    return ChunkKind.CONTENT

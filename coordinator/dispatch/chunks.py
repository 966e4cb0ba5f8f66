"""Chunk parsing and classification: boilerplate, content or terminal. Pure.

A chunk's payload is one streamed event as a bare JSON object, or — as
providers that frame their output as SSE send it — one or more SSE events
(``data: {...}`` blocks, ``[DONE]`` among them). It is parsed once, with limits
(:mod:`coordinator.protocol.boundedjson`), and from then on only the parsed
events travel: the consumer gets them re-encoded, never the provider's raw
text, so no provider can break the SSE framing. Anything else is a provider
error.

Classification reads the *parsed* ``type`` and fields, never substrings, so a
content delta whose text merely contains ``response.created`` is content.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs

from coordinator.protocol import boundedjson
from coordinator.protocol.endpoints import Endpoint


class ChunkKind(enum.Enum):
    BOILERPLATE = "boilerplate"
    CONTENT = "content"
    TERMINAL = "terminal"  # a provider's own end marker; the coordinator writes its own


_RESPONSES_BOILERPLATE = frozenset({"response.created", "response.in_progress"})
_MESSAGES_BOILERPLATE = frozenset({"message_start", "ping"})
_CHAT_DELTA_CONTENT_KEYS = ("content", "tool_calls", "function_call", "refusal",
                            "reasoning_content", "reasoning", "audio")


Event = dict[str, Any]
MAX_EVENT_DEPTH: Final = 64


class ChunkError(ValueError):
    """A payload that is not an event of the endpoint's stream: a provider error."""


@attrs.frozen
class Chunk:
    kind: ChunkKind  # CONTENT if any event is content; TERMINAL when there is no event
    events: tuple[Event, ...]


TERMINAL_CHUNK: Final = Chunk(ChunkKind.TERMINAL, ())
_SSE_FIELDS: Final = ("event:", "id:", "retry:", ":")


def parse_chunk(endpoint: Endpoint, payload: str, *, max_depth: int = MAX_EVENT_DEPTH,
                classify: bool = True) -> Chunk:
    """Parse and classify one payload; :class:`ChunkError` when it is not made of events.

    Without ``classify`` (after the commit, when only the events matter) a chunk with
    events is reported as CONTENT without looking at them."""
    text = payload.strip()
    if text == "[DONE]":
        return TERMINAL_CHUNK
    framed = text.startswith(("data:", *_SSE_FIELDS))
    datas = _sse_data(text) if framed else [text]
    events = tuple(_event(data, max_depth) for data in datas if data.strip() != "[DONE]")
    if not events:
        return TERMINAL_CHUNK
    if not classify or any(classify_event(endpoint, e) is ChunkKind.CONTENT for e in events):
        return Chunk(ChunkKind.CONTENT, events)
    return Chunk(ChunkKind.BOILERPLATE, events)


def _sse_data(text: str) -> list[str]:
    """The data of each SSE event in ``text`` (multi-line data joined with newlines)."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = []
        for line in block.split("\n"):
            if line.startswith("data:"):
                lines.append(line[6:] if line.startswith("data: ") else line[5:])
            elif line and not line.startswith(_SSE_FIELDS):
                raise ChunkError("chunk mixes SSE framing with other text")
        if lines:
            out.append("\n".join(lines))
    return out


def _event(data: str, max_depth: int) -> Event:
    try:
        event = boundedjson.loads_fast(data, max_depth=max_depth)
    except boundedjson.JsonLimitError as exc:
        raise ChunkError(f"chunk is not a JSON event: {str(exc)[:200]}") from None
    if not isinstance(event, dict):
        raise ChunkError("chunk is not a JSON object")
    return event


def classify_event(endpoint: Endpoint, event: Event) -> ChunkKind:
    match endpoint:
        case Endpoint.CHAT:
            return _chat(event)
        case Endpoint.COMPLETIONS:
            return _completions(event)
        case Endpoint.RESPONSES | Endpoint.MESSAGES:
            return _typed_event(endpoint, event)


def is_delta(endpoint: Endpoint, event: Event) -> bool:
    """Does ``event`` carry a piece of the answer (text, a tool call's arguments)?

    Engines stream about a token a piece: what a stream cut short is charged for.
    """
    match endpoint:
        case Endpoint.CHAT:
            return any(isinstance(delta := choice.get("delta"), dict) and any(
                delta.get(key) not in (None, "", []) for key in _CHAT_DELTA_CONTENT_KEYS)
                for choice in _choices(event) or ())
        case Endpoint.COMPLETIONS:
            return any(choice.get("text") not in (None, "") for choice in _choices(event) or ())
        case Endpoint.RESPONSES:
            kind = event.get("type")
            return isinstance(kind, str) and kind.endswith(".delta")
        case Endpoint.MESSAGES:
            return event.get("type") == "content_block_delta"


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

"""Server-sent-event framing per endpoint family.

One :class:`SseWriter` per stream. It frames each relay item and makes sure the
stream ends the way the family's clients expect exactly once: ``data: [DONE]``
for chat and completions, ``response.completed`` for Responses, ``message_stop``
for Anthropic. A provider that closes cleanly without sending its family's
final event (an empty completion after boilerplate) gets one written for it.

Every event is re-encoded from its parsed form, and an event name is used only
when it is a plain identifier: nothing a provider sends can add an SSE line,
an event or a terminator of its own.
"""

from __future__ import annotations

import re
from typing import Any, Final

import attrs
import orjson

from coordinator.dispatch.chunks import Event
from coordinator.dispatch.items import End, InBandError, RelayItem
from coordinator.protocol.endpoints import Endpoint

DONE = b"data: [DONE]\n\n"
_FINAL_EVENTS = {
    Endpoint.RESPONSES: frozenset({"response.completed", "response.failed", "response.incomplete"}),
    Endpoint.MESSAGES: frozenset({"message_stop"}),
}


_EVENT_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _data(body: Any) -> bytes:
    # orjson: events were parsed by orjson (no lone surrogates, integers within 64 bits),
    # so they always re-encode, as valid UTF-8, several times faster than json.dumps.
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _event(name: str, body: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\n" + _data(body)


@attrs.define
class SseWriter:
    endpoint: Endpoint
    ended: bool = False
    _response: dict[str, Any] | None = None  # from response.created, to complete it

    def frame(self, item: RelayItem) -> bytes:
        if self.ended:
            return b""
        match item:
            case dict():
                return self._chunk(item)
            case End():
                self.ended = True
                return self._end(item)
            case InBandError():
                self.ended = True
                return self._error(item)

    def _chunk(self, event: Event) -> bytes:
        if self.endpoint not in _FINAL_EVENTS:
            return _data(event)
        name = event.get("type")
        if not isinstance(name, str) or not _EVENT_NAME.fullmatch(name):
            name = "message"
        if name == "response.created" and isinstance(event.get("response"), dict):
            self._response = event["response"]
        if name in _FINAL_EVENTS[self.endpoint]:
            self.ended = True
        return _event(name, event)

    def _end(self, end: End) -> bytes:
        if self.endpoint not in _FINAL_EVENTS:
            return DONE
        # The provider closed cleanly without its final event: write one.
        if self.endpoint is Endpoint.MESSAGES:
            return _event("message_delta", {
                "type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                   "stop_sequence": None},
                "usage": {"output_tokens": end.usage.completion_tokens}}) + _event(
                "message_stop", {"type": "message_stop"})
        response = dict(self._response or {"object": "response", "output": []})
        response.update(status="completed", usage={
            "input_tokens": end.usage.prompt_tokens, "output_tokens": end.usage.completion_tokens,
            "total_tokens": end.usage.prompt_tokens + end.usage.completion_tokens})
        return _event("response.completed", {"type": "response.completed", "response": response})

    def _error(self, error: InBandError) -> bytes:
        if self.endpoint is Endpoint.MESSAGES:
            return _event("error", {"type": "error", "error": {"type": "api_error",
                                                               "message": error.message}})
        if self.endpoint is Endpoint.RESPONSES:
            return _event("error", {"type": "error", "code": "provider_error",
                                    "message": error.message, "param": None})
        body = {"error": {"message": error.message, "type": "provider_error",
                          "code": error.reason.value, "param": None}}
        return _data(body) + DONE

"""Server-sent events from an engine's byte stream, bounded. Pure (sans-IO).

An engine answers a streamed request with ``data: {...}\\n\\n`` blocks (and, for
Anthropic-style streams, ``event:`` lines). :class:`EventSplitter` is fed the bytes
as they arrive and gives back each complete block, as sent; it holds at most
``limit`` bytes of an unfinished one, so an engine that never ends a line cannot
grow the agent without bound.
"""

from __future__ import annotations

from typing import Any

import orjson


class EventTooLarge(Exception):
    """An engine event longer than the agent relays."""


class EventSplitter:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The events ``data`` completes, each a whole block ending with a blank line."""
        self._pending += data.replace(b"\r\n", b"\n") if b"\r" in data else data
        events = []
        start = 0
        while (end := self._pending.find(b"\n\n", start)) >= 0:
            events.append(bytes(self._pending[start:end + 2]))
            start = end + 2
        del self._pending[:start]
        if len(self._pending) > self._limit:
            raise EventTooLarge(f"an engine event over {self._limit} bytes")
        return events

    @property
    def pending(self) -> bytes:
        """An unfinished event at the end of the stream (engines should not leave one)."""
        return bytes(self._pending)


def event_data(event: bytes) -> Any:
    """The parsed JSON of an event's ``data:`` lines; ``"[DONE]"``; or None (no data)."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    payload = b"\n".join(lines)
    if payload.strip() == b"[DONE]":
        return "[DONE]"
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None

"""HTTP/2 responses wait for the consumer's flow-control window: a bounded stream buffer.

hypercorn (0.18) keeps each HTTP/2 response stream's body in a ``StreamBuffer``
that its connection task drains into DATA frames as the consumer's window
allows. A push is meant to wait while the buffer is above a high-water mark,
but the buffer lets it go whenever the connection task pops fewer bytes than
the low-water mark — and with no window it pops *zero* bytes, so every push
returns at once. A consumer that opens streams and never grants a window then
has the coordinator buffer every answer whole (20 streams of 64 KiB chunks:
RSS 52 -> 829 MB), and since no write ever waits, ``write_timeout`` never
fires: the provider's slot was held until the answer ended, which was then
logged as delivered.

:class:`BoundedStreamBuffer` lets a push go only once the buffer has really
drained below the low-water mark, so each stream holds at most the high-water
mark plus one message; the push's wait is what the edge bounds by
``write_timeout`` (``exchange.Exchange.send``), after which the request is cut and
its provider told to stop.

This is the coordinator's one reach into hypercorn's protocol internals, made
in one place (:func:`install`), checked against the real hypercorn by
``tests/test_h2flow.py``.
"""

from __future__ import annotations

import hypercorn.protocol.h2 as h2_protocol

_STOCK = h2_protocol.StreamBuffer


class BoundedStreamBuffer(_STOCK):
    """hypercorn's stream buffer, with pushes that wait for bytes to actually leave."""

    async def push(self, data: bytes) -> None:
        if self._complete:
            raise h2_protocol.BufferCompleteError()
        self.buffer.extend(data)
        await self._is_empty.clear()
        # Until the connection task has sent enough, or the stream is closed (close()
        # completes the buffer and sets the event).
        while len(self.buffer) >= h2_protocol.BUFFER_HIGH_WATER and not self._complete:
            await self._paused.clear()
            await self._paused.wait()

    async def pop(self, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if len(self.buffer) < h2_protocol.BUFFER_LOW_WATER:  # what is left, not what went
            await self._paused.set()
        if not self.buffer:
            await self._is_empty.set()
        return data


def install() -> None:
    """Have hypercorn's HTTP/2 protocol use :class:`BoundedStreamBuffer` (idempotent).

    Raises ``RuntimeError`` when hypercorn's buffer is not the one this was written
    for: better no start than an unbounded buffer behind the operator's back.
    """
    if h2_protocol.StreamBuffer is BoundedStreamBuffer:
        return
    probe = _STOCK(_NoEvent)  # type: ignore[arg-type]
    expected = ("buffer", "_complete", "_is_empty", "_paused", "push", "pop", "close")
    if not all(hasattr(probe, name) for name in expected) or not isinstance(
            probe.buffer, bytearray):
        raise RuntimeError("hypercorn's HTTP/2 StreamBuffer has changed: "
                           "coordinator/api/h2flow.py needs a look before this version is used")
    h2_protocol.StreamBuffer = BoundedStreamBuffer  # type: ignore[misc]


class _NoEvent:
    """Stands in for hypercorn's event class when probing the buffer's shape."""

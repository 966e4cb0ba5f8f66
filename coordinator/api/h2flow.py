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

A response the application ends before its end — a stream cut at
``write_timeout``, an application error after the head — is left open by
hypercorn: it forgets the stream but never tells the consumer, who waits on
it until the whole connection closes (no RST_STREAM, no END_STREAM), while
what the buffer held is still sent as the window opens, and the stream stays
open in the connection's state, counted against its concurrent streams.
:func:`_reset_unfinished` resets such a stream (CANCEL) and drops what its
buffer held.

A stream that closes before its response is whole — the consumer reset it,
the connection went, the application left it, or the stream died under the
application's last write (a consumer's flow-control error) — is marked in its
request's scope (:func:`response_cut` reads it): hypercorn lets that last write
return as if it had left (the buffer it waited on was closed, or silently
gone), and the request log must not call such an answer a success. For the
same reason that last write waits until the bytes taken out of the buffer
have been written, not only taken out (:meth:`BoundedStreamBuffer.sent`): a
write that then fails (the consumer gone) drops them with the connection.

A consumer may also keep its window tiny and give back each byte it reads
(CVE-2019-9511, "data dribble"): hypercorn then writes one DATA frame per byte, a
frame and a window update per byte of the answer, its task never waiting — the
whole process busy for one consumer. A stream whose window is below
:data:`MIN_DATA_FRAME` while more than the window waits is held instead
(:func:`_dribble`), as if its window were shut, until a window update makes
room: a consumer that never does is cut at ``write_timeout`` like one that
never reads.

This is the coordinator's one reach into hypercorn's protocol internals, made
in one place (:func:`install`), checked against the real hypercorn by
``tests/test_h2flow.py``.
"""

from __future__ import annotations

from typing import Any

import h2.errors
import h2.exceptions
import hypercorn.protocol.h2 as h2_protocol
from hypercorn.protocol.events import EndBody, StreamClosed
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream

_STOCK = h2_protocol.StreamBuffer
_STOCK_STREAM_SEND = h2_protocol.H2Protocol.stream_send
_STOCK_CLOSE_STREAM = h2_protocol.H2Protocol._close_stream
_STOCK_SEND_DATA = h2_protocol.H2Protocol._send_data

# The smallest DATA frame sent while more is waiting than the window allows (a 9-byte
# frame head is then under 1 % of it); a window below it counts as shut.
MIN_DATA_FRAME = 1024

# Set (True) in an HTTP/2 request's ASGI scope when its stream closed before its
# response was whole: whatever its last write said, the end never left. The scope is
# the one thing hypercorn's stream and the request's exchange both hold.
_RESPONSE_CUT_KEY = "coordinator.h2_response_cut"


def response_cut(scope: dict[str, Any]) -> bool:
    """Whether the request's HTTP/2 stream closed before its response's end left."""
    return bool(scope.get(_RESPONSE_CUT_KEY))


class BoundedStreamBuffer(_STOCK):
    """hypercorn's stream buffer, with pushes that wait for bytes to actually leave.

    ``dropped``: closed, which hypercorn does only when the stream or the connection
    went before the stream's end was sent (bytes it had taken out to send may have
    gone with it) — something its waits do not tell from a buffer sent whole.

    The buffer counts as empty (what the response's last write waits for) only once
    the bytes taken out of it have been written (:meth:`sent`, after hypercorn's
    ``_send_data``), not when they are taken out: the write may still fail.
    """

    dropped = False

    async def close(self) -> None:
        self.dropped = True
        await super().close()

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
        return data

    async def sent(self) -> None:
        """What was taken out has been written: an empty buffer now counts as empty."""
        if not self.buffer:
            await self._is_empty.set()


async def _send_data(self: Any, stream_id: int) -> None:
    """hypercorn's ``H2Protocol._send_data`` (take a stream's next bytes out of its buffer
    and write them); the buffer is told once they are written, or dropped with the
    connection when the write failed (hypercorn then closes the connection, quietly)."""
    buffer = self.stream_buffers.get(stream_id)
    if isinstance(buffer, BoundedStreamBuffer) and _dribble(self, stream_id, buffer):
        self.priority.block(stream_id)  # until a window update unblocks it
        return
    await _STOCK_SEND_DATA(self, stream_id)
    if isinstance(buffer, BoundedStreamBuffer):
        if self.closed:
            await buffer.close()
        else:
            await buffer.sent()


def _dribble(protocol: Any, stream_id: int, buffer: BoundedStreamBuffer) -> bool:
    """Whether the stream's window would only let a sliver of what waits go (hold it)."""
    try:
        window: int = protocol.connection.local_flow_control_window(stream_id)
    except h2.exceptions.ProtocolError:  # no such stream, or closed
        return False  # hypercorn's own send finds it closed and lets the buffer go
    return 0 < window < MIN_DATA_FRAME and window < len(buffer.buffer)


async def _stream_send(self: Any, event: Any) -> None:
    """hypercorn's ``H2Protocol.stream_send``; a response left unfinished is reset, and
    one whose end did not leave (its buffer dropped, or gone) is marked cut."""
    if isinstance(event, EndBody):
        stream = self.streams.get(event.stream_id)
        buffer = self.stream_buffers.get(event.stream_id)
        await _STOCK_STREAM_SEND(self, event)
        if isinstance(stream, HTTPStream) and (buffer is None or getattr(buffer, "dropped", False)):
            _mark_cut(stream)
        return
    unfinished = isinstance(event, StreamClosed) and _unfinished(self, event.stream_id)
    if unfinished:
        await _reset_unfinished(self, event.stream_id)
    await _STOCK_STREAM_SEND(self, event)
    if unfinished:
        await self._flush()  # the RST_STREAM


async def _close_stream(self: Any, stream_id: int) -> None:
    """hypercorn's ``H2Protocol._close_stream`` (every way a stream closes goes through
    it); a response not whole by then is marked cut in its request's scope."""
    if _unfinished(self, stream_id):
        _mark_cut(self.streams[stream_id])
    await _STOCK_CLOSE_STREAM(self, stream_id)


def _mark_cut(stream: HTTPStream) -> None:
    scope: dict[str, Any] = stream.scope  # type: ignore[assignment]  # the app's own dict
    scope[_RESPONSE_CUT_KEY] = True


def _unfinished(protocol: Any, stream_id: int) -> bool:
    """Whether the stream's application ended without ending its response.

    hypercorn's HTTP stream reports itself closed when its application ends; its state
    is CLOSED by then only when the response was complete (or when hypercorn answered
    an application that ended before its head with a 500 of its own)."""
    stream = protocol.streams.get(stream_id)
    return (isinstance(stream, HTTPStream) and stream.state is not ASGIHTTPState.CLOSED
            and hasattr(stream, "scope"))  # no scope: its request head was never handled


async def _reset_unfinished(protocol: Any, stream_id: int) -> None:
    """Reset the stream (CANCEL) and drop what its buffer held; the send task, woken,
    forgets the buffer (its next look at the stream finds it closed)."""
    buffer = protocol.stream_buffers.get(stream_id)
    if buffer is not None:
        await buffer.close()
    try:
        protocol.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    except h2.exceptions.ProtocolError:
        return  # already closed on the wire (the consumer reset it, or the connection went)
    await protocol._window_updated(stream_id)


def install() -> None:
    """Have hypercorn's HTTP/2 protocol use :class:`BoundedStreamBuffer` and reset the
    streams its applications leave unfinished (idempotent).

    Raises ``RuntimeError`` when hypercorn's buffer or protocol is not the one this was
    written for: better no start than an unbounded buffer behind the operator's back.
    """
    if h2_protocol.StreamBuffer is BoundedStreamBuffer:
        return
    probe = _STOCK(_NoEvent)  # type: ignore[arg-type]
    expected = ("buffer", "_complete", "_is_empty", "_paused", "push", "pop", "close")
    methods = ("stream_send", "_send_data", "_flush", "_window_updated", "_close_stream")
    if not all(hasattr(probe, name) for name in expected) or not isinstance(
            probe.buffer, bytearray) or not all(
            hasattr(h2_protocol.H2Protocol, name) for name in methods):
        raise RuntimeError("hypercorn's HTTP/2 protocol has changed: "
                           "coordinator/api/h2flow.py needs a look before this version is used")
    h2_protocol.StreamBuffer = BoundedStreamBuffer  # type: ignore[misc]
    h2_protocol.H2Protocol.stream_send = _stream_send  # type: ignore[method-assign]
    h2_protocol.H2Protocol._close_stream = _close_stream  # type: ignore[method-assign]
    h2_protocol.H2Protocol._send_data = _send_data  # type: ignore[method-assign]


class _NoEvent:
    """Stands in for hypercorn's event class when probing the buffer's shape."""

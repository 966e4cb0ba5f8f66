"""One admitted provider connection and the per-request streams routed through it.

The reader task (``edge.read_frames``) turns frames into events and hands each
to the stream of the request it belongs to, without going through the
registry actor: the per-chunk path is the hot path. Streams are bounded
channels; a consumer too slow to keep up overflows its *own* stream (which
then ends) instead of stalling every other request on the provider.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

import attrs
import nacl.public
import trio
import trio_websocket

from coordinator.protocol import (
    Cancel,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    encode_frame,
)
from coordinator.untrusted import printable

log = logging.getLogger(__name__)

ProviderEvent = InferenceAccepted | InferenceResponseChunk | InferenceComplete | InferenceError


class ProviderGone(Exception):
    """The provider's socket is closed; nothing more can be sent to it."""


class Transport(Protocol):
    """Where a connection's writes go: the provider's socket here, or a link to the
    instance it is connected to (``cluster/peer.py``'s ``PeerRoute``).

    The rest of a connection — its streams, their buffers, how they end — is the
    same either way, so the engine never asks which it has.
    """

    @property
    def instance(self) -> str:
        """The instance the provider is connected to; "" for this one."""
        ...

    async def send(self, connection: ProviderConnection, message: InferenceRequest | Cancel) -> None:
        """Write ``message`` whole (cancelled, only before its first byte), or raise
        :class:`ProviderGone`."""
        ...


@attrs.frozen
class ProviderSocket:
    """A provider connected here: its WebSocket, whose every write is whole (wsio.py)."""

    ws: trio_websocket.WebSocketConnection

    @property
    def instance(self) -> str:
        return ""

    async def send(self, connection: ProviderConnection, message: InferenceRequest | Cancel) -> None:
        try:
            await self.ws.send_message(encode_frame(message))
        except trio_websocket.ConnectionClosed:
            raise ProviderGone(connection.provider_id) from None


def _weight(event: ProviderEvent) -> int:
    """Bytes an event holds while buffered (chunks carry the payload; the rest is small)."""
    if isinstance(event, InferenceResponseChunk):
        if event.encrypted_data is not None:
            return len(event.encrypted_data.ciphertext)
        return len(event.data or "")
    return 0


@attrs.define(eq=False)
class _Buffer:
    """The connection's end of one request's stream, with the bytes it holds."""

    send: trio.MemorySendChannel[ProviderEvent]
    held: int = 0


@attrs.define(eq=False)
class EventStream:
    """The request's end of its stream: events from the provider, in order.

    Receiving gives the bytes back to the stream's budget, so the budget
    bounds what a slow consumer leaves buffered, in bytes as well as frames.
    """

    _receive: trio.MemoryReceiveChannel[ProviderEvent]
    _buffer: _Buffer

    async def receive(self) -> ProviderEvent:
        event = await self._receive.receive()
        self._buffer.held -= _weight(event)
        return event

    def receive_nowait(self) -> ProviderEvent:
        event = self._receive.receive_nowait()
        self._buffer.held -= _weight(event)
        return event

    async def next(self) -> ProviderEvent | None:
        """The next event, or None when the stream has ended."""
        try:
            return await self.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    def ready(self, first: ProviderEvent | None, limit: int) -> list[ProviderEvent | None]:
        """``first`` and every event already delivered after it (None once the stream ends).

        A fast provider's burst is then one write to the consumer, not one each.
        """
        batch = [first]
        while first is not None and len(batch) < limit:
            try:
                batch.append(self.receive_nowait())
            except trio.WouldBlock:
                break
            except (trio.EndOfChannel, trio.ClosedResourceError):
                batch.append(None)
                break
        return batch

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ProviderEvent:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


def ended_stream() -> EventStream:
    """A stream that is already over (the provider went before it could open)."""
    send, receive = trio.open_memory_channel[ProviderEvent](0)
    send.close()
    return EventStream(receive, _Buffer(send))


@attrs.define(eq=False)
class Directory:
    """Live provider connections by (provider id, session): where sockets are found.

    The provider edge owns it; the registry's table holds only ids, and the
    dispatcher looks a lease's connection up here. A session that has gone is
    simply not found.
    """

    # Keyed by instance too: session numbers are counted per instance, so a
    # provider that moved here may reuse the number it had on another.
    _by_session: dict[tuple[str, str, int], ProviderConnection] = attrs.field(factory=dict)

    def add(self, connection: ProviderConnection) -> None:
        self._by_session[_key(connection)] = connection

    def remove(self, connection: ProviderConnection) -> None:
        key = _key(connection)
        if self._by_session.get(key) is connection:
            del self._by_session[key]

    def get(self, provider_id: str, session: int, instance: str = "") -> ProviderConnection | None:
        return self._by_session.get((instance, provider_id, session))

    def live(self) -> list[ProviderConnection]:
        return list(self._by_session.values())

    def __len__(self) -> int:
        return len(self._by_session)


@attrs.define(eq=False)
class ProviderConnection:
    """A provider the engine can send to, here or on another instance (``transport``)."""

    provider_id: str
    session: int
    transport: Transport
    public_key: nacl.public.PublicKey
    encrypted_chunks: bool = True
    stream_buffer: int = 256
    stream_buffer_bytes: int = 8 * 1024 * 1024
    _streams: dict[str, _Buffer] = attrs.field(factory=dict)
    # Why a stream ended early, for streams the connection closed on its own.
    _ended: dict[str, str] = attrs.field(factory=dict)
    closed: bool = False
    rejected: int = 0  # frames rejected this session (the edge logs only the first few)
    superseded: trio.Event = attrs.field(factory=trio.Event)

    @property
    def instance(self) -> str:
        """The instance the provider is connected to; "" for this one."""
        return self.transport.instance

    # -- per-request streams
    def open_stream(self, request_id: str) -> EventStream:
        if self.closed:
            raise ProviderGone(self.provider_id)
        send, receive = trio.open_memory_channel[ProviderEvent](self.stream_buffer)
        buffer = _Buffer(send)
        self._streams[request_id] = buffer
        return EventStream(receive, buffer)

    def close_stream(self, request_id: str) -> None:
        buffer = self._streams.pop(request_id, None)
        if buffer is not None:
            buffer.send.close()
        self._ended.pop(request_id, None)

    def end_reason(self, request_id: str) -> str:
        """Why the stream ended without a terminal frame."""
        return self._ended.get(request_id, "provider disconnected")

    def deliver(self, request_id: str, event: ProviderEvent) -> bool:
        """Hand an event to its request; False when no such request is pending."""
        buffer = self._streams.get(request_id)
        if buffer is None:
            return False
        weight = _weight(event)
        if buffer.held + weight > self.stream_buffer_bytes:
            self._overflow(request_id)
            return True
        try:
            buffer.send.send_nowait(event)
        except trio.WouldBlock:
            self._overflow(request_id)
        except trio.BrokenResourceError:
            self._streams.pop(request_id, None)
        else:
            buffer.held += weight
        return True

    def _overflow(self, request_id: str) -> None:
        log.warning("request %s on %s overflowed its stream buffer", request_id,
                    printable(self.provider_id))  # a peer instance's provider, too
        self._end(request_id, "consumer too slow: stream buffer overflowed")

    def _end(self, request_id: str, reason: str) -> None:
        buffer = self._streams.pop(request_id, None)
        if buffer is not None:
            self._ended[request_id] = reason
            buffer.send.close()

    def close_all(self) -> None:
        """The socket is gone: end every pending stream, exactly once each."""
        self.closed = True
        for request_id in list(self._streams):
            self._end(request_id, "provider disconnected")

    @property
    def pending(self) -> int:
        return len(self._streams)

    def supersede(self) -> None:
        """A newer session registered under the same id: this one must go."""
        self.superseded.set()

    # -- writes (trio-websocket serializes a socket's with its own lock)
    async def send(self, message: InferenceRequest | Cancel) -> None:
        """Write ``message`` whole. Cancelled, it raises only before its first byte
        (coordinator/wsio.py): the engine counts a request as sent when this returns."""
        if self.closed:
            raise ProviderGone(self.provider_id)
        await self.transport.send(self, message)

    async def send_cancel(self, request_id: str) -> None:
        with contextlib.suppress(ProviderGone):
            await self.send(Cancel(request_id))


def _key(connection: ProviderConnection) -> tuple[str, str, int]:
    return connection.instance, connection.provider_id, connection.session

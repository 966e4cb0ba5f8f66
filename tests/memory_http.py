"""One consumer connection served by the coordinator's real HTTP stack, in memory.

hypercorn's ``TCPServer``, the transport's ``ConsumerConnection`` and the edge
run exactly as ``coordinator serve`` runs them (``transport.serve_connection``); only
the socket under them is an in-memory stream. So virtual time works, and every
write that reaches the "socket" is counted.

The in-memory stream is trio's (it takes every write at once), or a :class:`Pipe`
pair (:func:`socket_pair`) whose server-to-consumer direction holds a bounded
number of bytes, as a socket's buffers do: a consumer that stops reading then
blocks the server's writes.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import h11
import trio
import trio.testing

from coordinator.api.exchange import Edge
from coordinator.api.transport import (
    Connections,
    ConsumerConnection,
    hypercorn_config,
    serve_connection,
)

from .harness import make_config

PEER = ("127.0.0.1", 40000)
# Sees each byte the server sends as it enters the connection, and None at its end.
Observer = Callable[[bytes | None], object]


class _Addresses:
    """What hypercorn and the listener read off a TCP socket: its family and its ends."""

    family = socket.AF_INET

    def getpeername(self) -> tuple[str, int]:
        return PEER

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 8000)


class MemorySocketStream(trio.abc.HalfCloseableStream):
    """The server's end of an in-memory TCP connection; records each write reaching it."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.socket = _Addresses()
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Pipe:
    """One direction of an in-memory connection, holding at most ``capacity`` bytes
    (None: any number) that the reader has not taken yet; a write waits for room.

    ``observe`` sees every byte as it enters, in order (what the writer really sent:
    a write cut short by a cancellation counts only what went in), and None when the
    writer closes its end. Once the reader
    closes, writes fail (a reset); once the writer closes, reads end (end of file).
    """

    def __init__(self, capacity: int | None = None, observe: Observer | None = None) -> None:
        self.capacity = capacity
        self.observe = observe
        self.data = bytearray()
        self.eof = False  # the writer closed its end
        self.reset = False  # the reader closed its end
        self.closed_at: float | None = None  # when the writer closed
        self._moved = trio.Event()

    def _touch(self) -> None:
        self._moved.set()
        self._moved = trio.Event()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        view = memoryview(bytes(data))
        while view:
            if self.eof:
                raise trio.ClosedResourceError("this end is closed")
            if self.reset:
                raise trio.BrokenResourceError("the peer closed its end")
            room = len(view) if self.capacity is None else self.capacity - len(self.data)
            if room <= 0:
                await self._moved.wait()
                continue
            part, view = view[:room], view[room:]
            self.data += part
            if self.observe is not None:
                self.observe(bytes(part))
            self._touch()

    async def read(self, max_bytes: int | None) -> bytes:
        while not self.data:
            if self.eof or self.reset:
                await trio.lowlevel.checkpoint()
                return b""
            await self._moved.wait()
        size = len(self.data) if max_bytes is None else min(max_bytes, len(self.data))
        part = bytes(self.data[:size])
        del self.data[:size]
        self._touch()
        await trio.lowlevel.checkpoint()
        return part

    def close_writer(self) -> None:
        if not self.eof:
            self.eof = True
            self.closed_at = trio.current_time()
            if self.observe is not None:
                self.observe(None)
            self._touch()

    def close_reader(self) -> None:
        self.reset = True
        self.data.clear()
        self._touch()


class PipeStream(trio.abc.HalfCloseableStream):
    """One end of an in-memory connection made of two pipes (:class:`Pipe`)."""

    def __init__(self, outgoing: Pipe, incoming: Pipe) -> None:
        self.outgoing = outgoing
        self.incoming = incoming

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.outgoing.write(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self.outgoing.close_writer()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.incoming.read(max_bytes)

    async def aclose(self) -> None:
        self.outgoing.close_writer()
        self.incoming.close_reader()
        await trio.lowlevel.checkpoint()


def socket_pair(capacity: int | None = None,
                observe: Observer | None = None) -> tuple[PipeStream, PipeStream]:
    """(consumer's end, server's end): the server's writes wait once ``capacity`` bytes
    are unread (None: never), and ``observe`` sees each byte the server sends."""
    down = Pipe(capacity, observe)  # server -> consumer
    up = Pipe()  # consumer -> server
    return PipeStream(up, down), PipeStream(down, up)


@attrs.define(eq=False)
class Connection:
    """The consumer's end (``client``), what reached the server's socket, and its slot."""

    client: trio.abc.HalfCloseableStream
    socket: MemorySocketStream
    table: Connections
    slots: trio.Semaphore
    closed: trio.Event

    @property
    def writes(self) -> list[bytes]:
        return self.socket.writes

    async def response(self) -> tuple[h11.Response, bytes]:
        """Read one HTTP/1.1 response (head and whole body) off the client's end."""
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        parser.send(h11.EndOfMessage())
        head: h11.Response | None = None
        body = b""
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                parser.receive_data(bytes(await self.client.receive_some(65536)))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                assert head is not None, "the connection closed before a response head"
                return head, body

    async def rest(self) -> bytes:
        """Everything the server still writes, until it closes its end."""
        data = b""
        while chunk := await self.client.receive_some(65536):
            data += chunk
        return data


@asynccontextmanager
async def open_connection(edge: Edge, table: Connections | None = None, *,
                          write_timeout: float = 30.0,
                          pair: Callable[[], tuple[trio.abc.HalfCloseableStream,
                                                   trio.abc.HalfCloseableStream]]
                          = trio.testing.memory_stream_pair) -> AsyncIterator[Connection]:
    """Serve one connection with ``edge`` (the coordinator's, or one around a test's ASGI
    app) until the server closes it; the block's end waits for that.

    ``pair()`` makes the (consumer's end, server's end) of the connection."""
    config = make_config()
    table = table if table is not None else Connections(config.keep_alive_timeout)
    hconfig = hypercorn_config(config)
    client, ours = pair()
    sock = MemorySocketStream(ours)
    slots = trio.Semaphore(1)
    slots.acquire_nowait()  # as the listener does for each connection it accepts
    connection = Connection(client, sock, table, slots, trio.Event())

    async def serve() -> None:
        try:
            await serve_connection(edge, hconfig, {}, ConsumerConnection(
                sock, table, write_timeout, slots))  # type: ignore[arg-type]
        finally:
            connection.closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield connection
        await connection.closed.wait()

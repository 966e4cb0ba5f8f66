"""WebSocket I/O shared by every end of the system: whole writes, message limits, connecting.

Theory of operation. A WebSocket frame is a header announcing a length, then
that many bytes. trio-websocket writes each message with one
``stream.send_all``; if the writing task is cancelled half-way (a consumer
hangs up while a slow-reading provider takes a 2 MB request), the frame is
cut, and the next frame written on the socket lands *inside* the payload the
peer still expects. The peer is out of step for good: it fails the stream as
bad UTF-8, or waits in silence until its liveness budget runs out, while
every request routed to it fails.

So every socket under a WebSocket here is a :class:`WholeWriteStream`: a
write is whole, or the socket is closed. A caller cancelled *before* its
write starts writes nothing (the frame never existed for the peer). Once the
first byte may be on the wire the write finishes shielded from the caller's
cancellation, bounded by ``write_timeout``; a peer that does not take it in
that time loses its socket, not its framing. Finishing is better than closing:
one consumer hanging up must not cost a provider its other streams.

The coordinator's provider and peer listeners, its links to other instances
and the provider clients (simulator, agent) all write through here.

Importing this module also mends one trio-websocket bug (:func:`_mend_closing_sends`):
every module that opens or serves a WebSocket imports it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import trio
import trio_websocket
from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError

log = logging.getLogger(__name__)

DEFAULT_WRITE_TIMEOUT = 30.0


def _mend_closing_sends() -> None:
    """Make trio-websocket's sends on a closing connection end it, never the process.

    trio-websocket 0.12's reader task answers what it reads also once this end has sent
    its Close: a Pong to a Ping, a Close (1009) to a message over the size limit.
    wsproto refuses to send either then (``LocalProtocolError``), and the reader task's
    failure ends the nursery it runs in: for a listener, the whole server. So anyone who
    could open a socket could end the process: send a frame the server closes the socket
    for, then answer its Close with a Ping or a large message (python-trio/trio-websocket
    issue 184, unfixed in 0.12.2). Now a ping is answered only on an open connection (RFC
    6455 lets it go unanswered once a Close is out), and any event the connection's state
    no longer allows is ``ConnectionClosed``, which every caller and the reader handle.
    """
    connection = trio_websocket.WebSocketConnection
    answer, send = connection._handle_ping_event, connection._send

    async def handle_ping(self: trio_websocket.WebSocketConnection, event: Any) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            await answer(self, event)

    async def send_while_open(self: trio_websocket.WebSocketConnection, event: Any) -> None:
        try:
            await send(self, event)
        except LocalProtocolError:
            reason = self._close_reason or trio_websocket.CloseReason(1006, "closing")
            raise trio_websocket.ConnectionClosed(reason) from None

    connection._handle_ping_event = handle_ping  # type: ignore[method-assign]
    connection._send = send_while_open  # type: ignore[method-assign]


_mend_closing_sends()


class WholeWriteStream(trio.abc.Stream):
    """A stream whose every ``send_all`` is written whole, or the stream is closed."""

    def __init__(self, inner: trio.abc.Stream, write_timeout: float = DEFAULT_WRITE_TIMEOUT) -> None:
        self.inner = inner
        self.write_timeout = write_timeout

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # Cancelled before the first byte: nothing was written, nothing is cut.
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True), trio.move_on_after(self.write_timeout) as bound:
            await self.inner.send_all(data)
        if bound.cancelled_caught:
            # Part of the frame may be out: the only safe end for the peer is no socket.
            await trio.aclose_forcefully(self.inner)
            raise trio.BrokenResourceError(
                f"a write did not finish within {self.write_timeout:g}s; socket closed")

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class WholeWriteListener(trio.abc.Listener[WholeWriteStream]):
    """A listener whose streams write whole frames (see :class:`WholeWriteStream`)."""

    def __init__(self, inner: trio.abc.Listener[Any], write_timeout: float) -> None:
        self.inner = inner
        self.write_timeout = write_timeout

    async def accept(self) -> WholeWriteStream:
        return WholeWriteStream(await self.inner.accept(), self.write_timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()


def whole_writes(listeners: Sequence[trio.abc.Listener[Any]], write_timeout: float) -> list[Any]:
    """``listeners`` whose accepted streams write whole, for ``trio_websocket.WebSocketServer``.

    Typed ``Any`` as :func:`coordinator.providers.handshakes.capped` is: trio-websocket
    annotates its listeners as socket listeners but serves any listener.
    """
    return [WholeWriteListener(listener, write_timeout) for listener in listeners]


def allow_large_messages(ws: trio_websocket.WebSocketConnection, limit: int) -> None:
    """Set the largest message ``ws`` accepts from now on.

    Listeners start small (an unadmitted peer may make us buffer only a little)
    and raise the limit once the peer is admitted. trio-websocket has no public
    setter; its reader checks this attribute on every message fragment
    (tests/test_security.py pins that behaviour). The one place that touches it.
    """
    ws._max_message_size = limit


async def connect(
    nursery: trio.Nursery,
    url: str,
    *,
    max_message_size: int,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    receive_buffer_size: int | None = 4096,
) -> trio_websocket.WebSocketConnection:
    """Open a client WebSocket to ``url`` (``ws://`` or ``wss://``) that writes whole frames.

    Its reader task runs in ``nursery``. Raises ``OSError`` (unreachable),
    ``trio_websocket.HandshakeError`` (refused) or ``ValueError`` (not a WebSocket URL).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{url!r} is not a ws:// or wss:// URL")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{port}"
    stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
    try:
        if secure:
            context = ssl_context or ssl.create_default_context()
            stream = trio.SSLStream(stream, context, server_hostname=parts.hostname,
                                    https_compatible=True)
        # Typed for trio's own streams, but any stream works (it only reads and writes).
        whole: Any = WholeWriteStream(stream, write_timeout)
        return await trio_websocket.wrap_client_stream(
            nursery, whole, host_header, resource,
            extra_headers=extra_headers, max_message_size=max_message_size,
            receive_buffer_size=receive_buffer_size)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


@asynccontextmanager
async def open_websocket(
    url: str,
    *,
    max_message_size: int,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    connect_timeout: float = 10.0,
    close_timeout: float = 1.0,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """:func:`connect` as a context manager: the connection and its reader end with the block.

    Raises what :func:`connect` raises, and ``trio.TooSlowError`` for a handshake slower
    than ``connect_timeout``, as themselves (not in an exception group: the reader task
    is an implementation detail). Closing waits at most ``close_timeout`` for the peer.
    """
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await connect(nursery, url, max_message_size=max_message_size,
                                   write_timeout=write_timeout, extra_headers=extra_headers,
                                   ssl_context=ssl_context)
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(close_timeout):
                    await ws.aclose()
                nursery.cancel_scope.cancel(reason="websocket closed")
    except BaseExceptionGroup as group:
        only = group.exceptions[0] if len(group.exceptions) == 1 else None
        if only is None or isinstance(only, trio.Cancelled | BaseExceptionGroup):
            raise
        raise only  # noqa: B904 (its own cause chain says why; the group adds nothing)

"""The HTTP transport: one object per consumer connection, under hypercorn.

hypercorn parses HTTP and runs the ASGI application; the coordinator owns the
TCP stream under it, one :class:`ConsumerConnection` per connection, and hands
that object to every request on it explicitly: the application hypercorn runs
for a connection is the edge bound to it (:func:`serve_connection`), so nothing
is matched by address and nothing rides in the ASGI scope. What each request
does with it is ``exchange.py``'s business; here is what a connection keeps:

* **Keep-alive idle timeout.** hypercorn re-arms its idle timer from inside
  the application's task, which quart-trio cancels when the response is done,
  so a connection that has served a request is never closed. Here a
  connection with no request in flight for ``keep_alive_timeout`` seconds is
  closed: its read returns end-of-file, which hypercorn treats as the peer
  leaving. Once the first byte of a request arrives, its head must be
  complete within ``request_head_timeout`` seconds (however slowly it
  trickles in), so no connection is held by a request that never starts.
* **Write timeout.** hypercorn shields its writes, so a consumer that stops
  reading blocks the response forever. A write that cannot finish within
  ``write_timeout`` breaks the stream; hypercorn then reports a disconnect to
  the application, which cancels the request (the dispatcher releases the
  provider's slot and tells it to stop).
* **Connection cap.** At most ``max_connections`` consumer connections are
  open; further ones wait in the kernel's accept backlog. So do connections
  while the process is out of file descriptors: ``accept`` failing for want of
  them is waited out and logged rarely (``coordinator.descriptors``).
* **Close after an early answer.** A response sent before the request body was
  read (401, 413) says ``Connection: close``; hypercorn does not always close
  such a connection (its close runs in the application's task, which
  quart-trio may cancel first), so the connection ends it here once the request
  is over — otherwise the client's next request on it would never be answered.
* **HTTP/1 framing h11 gets wrong.** The connection follows each request's framing
  (``framing.RequestFraming``): nothing after a request that ends its connection
  reaches the HTTP layer (h11 answered two pipelined HTTP/1.0 requests with one bare
  400, the first unanswered), and a chunk announcing more than the body limit fails
  its request's body at once (:meth:`ConsumerConnection.guard_body`: a 413, not the
  body timeout).
* **Coalesced writes: the one place.** hypercorn writes a response's head, each
  body part and the chunked terminator separately, each a system call and
  scheduler passes. While :meth:`ConsumerConnection.hold` is on, writes are kept
  back and go out with the next one, as one write: the exchange holds a head for
  its first body part and a stream's last part for its terminator, so a short
  streamed answer goes out in one write.

hypercorn's serving internals (its per-connection ``TCPServer`` and lifespan)
are used in one function, :func:`_hypercorn_connection`, and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import attrs
import hypercorn.config
import trio
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr, wrap_app

from coordinator import errors
from coordinator.api import h2flow
from coordinator.config import Config
from coordinator.descriptors import AcceptErrors
from coordinator.untrusted import printable

from .framing import RequestFraming, Stage


class Edge(Protocol):
    """What the transport serves (``exchange.Edge``): the application, and each request
    handed the connection it came on."""

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None: ...

    async def handle(self, connection: ConsumerConnection | None, scope: dict[str, Any],
                     receive: Any, send: Any) -> None: ...

log = logging.getLogger(__name__)

Peer = tuple[str, int]
# The edge, bound to one connection: what hypercorn runs for it (an ASGI application).
BoundApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class ListenError(Exception):
    """A listener that cannot be opened; the message names it and says why."""


@attrs.define(eq=False)
class Connections:
    """The open consumer connections, and the door they come in by."""

    keep_alive_timeout: float
    request_head_timeout: float = 10.0
    body_limit: int = 10 * 1024 * 1024  # max_body_bytes: no chunk may announce more
    open: set[ConsumerConnection] = attrs.field(factory=set)
    # The accept loop runs in this scope: cancelling it stops taking connections.
    accepting: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def add(self, connection: ConsumerConnection) -> None:
        self.open.add(connection)
        self._touch()

    def remove(self, connection: ConsumerConnection) -> None:
        self.open.discard(connection)
        self._touch()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def stop_accepting(self) -> None:
        """Close the door: new connections are refused by the kernel, open ones carry on."""
        self.accepting.cancel(reason="draining")

    async def wait_all_closed(self) -> None:
        while self.open:
            await self._changed.wait()

    def close_idle(self, after: float) -> None:
        """Close connections once idle for ``after`` seconds (the coordinator is draining).

        Not at once: a client that reuses its connection right after a response
        still gets an answer (503, ``Connection: close``) instead of a reset.
        """
        self.keep_alive_timeout = min(self.keep_alive_timeout, after)
        for connection in list(self.open):
            connection.move_deadline()


class FramingRefused(Exception):
    """The listener refused the request's body (its framing): answer with ``error``."""

    def __init__(self, error: errors.ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class WriteLock:
    """A lock around socket writes that costs no scheduler pass when it is free.

    ``trio.Lock`` passes through the scheduler on every acquire. Everything
    done under this one is a write to a socket, which is a checkpoint itself:
    a second pass per write buys nothing (it was two of a streamed response's
    every three passes through the scheduler, per body part).
    """

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


# How long after its read deadline a connection whose HTTP layer is not reading is cut.
STALLED_GRACE = 1.0


class ConsumerConnection(trio.abc.HalfCloseableStream):
    """One consumer's TCP connection: what hypercorn reads and writes, and the requests on it.

    A stream with an idle deadline on reads and a deadline on writes; requests tell it
    when they begin and end (:meth:`begin_request`, :meth:`end_request`).
    """

    def __init__(self, inner: trio.SocketStream, table: Connections, write_timeout: float,
                 on_close: trio.Semaphore) -> None:
        self.inner = inner
        self.socket = inner.socket  # hypercorn reads the peer and local addresses from it
        self.in_flight = 0
        self.started = 0  # requests that began on this connection
        self.closing = False  # a response said "Connection: close": end after it
        self._table = table
        self.write_timeout = write_timeout  # also what an HTTP/2 stream may stall (exchange)
        self._on_close = on_close
        self._idle_since = trio.current_time()
        self._head_since: float | None = None  # when the next request's first byte came
        self._reading: trio.CancelScope | None = None
        # hypercorn locks its sends but not its send_eof: one stream, one writer at a time.
        self._writing = WriteLock()
        self._broken = False
        self._closed = False
        # While set, writes are kept back and go out with the next one, as one
        # write: a response head with its first body, a stream's last event
        # with its terminator (:meth:`hold`, from the request's exchange).
        self.holding = False
        self._held: list[bytes] = []
        # The whole connection's budget (set by serve_connection): it ends a connection whose
        # HTTP layer stopped reading — hypercorn can wait forever on some pipelined input
        # from a peer that then reset — shortly after the read deadline would have.
        self.watchdog: trio.CancelScope | None = None
        # HTTP/1 framing, followed until the connection turns out to be something else.
        self._framing: RequestFraming | None = RequestFraming(table.body_limit)
        self.refused: tuple[int, errors.ApiError] | None = None  # request number, why
        # Requests reading their body now (guard_body), by their number on the connection.
        self._body_waits: dict[int, trio.CancelScope] = {}
        self.peer: Peer | None = _peer(inner.socket)
        table.add(self)

    def begin_request(self) -> int:
        """A request began on this connection; its number (for :meth:`guard_body`)."""
        self.in_flight += 1
        self.started += 1
        self.rearm()
        return self.started

    def end_request(self, *, close: bool = False) -> None:
        """A request is over; ``close`` ends the connection once nothing else is in flight."""
        self.in_flight -= 1
        self.closing |= close
        self.rearm()

    def hold(self, on: bool) -> None:
        """Keep writes back (``on``), or let the next one carry them out (``off``)."""
        self.holding = on

    def _deadline(self) -> float:
        if self.in_flight > 0:
            return math.inf
        if self.closing:
            return -math.inf
        if self._head_since is not None:
            return self._head_since + self._table.request_head_timeout
        return self._idle_since + self._table.keep_alive_timeout

    def rearm(self) -> None:
        """A request started or ended: move the deadline of the read in progress."""
        self._head_since = None
        if self.in_flight == 0:
            self._idle_since = trio.current_time()
        self.move_deadline()

    def move_deadline(self) -> None:
        deadline = self._deadline()
        if self._reading is not None:
            self._reading.deadline = deadline
        if self.watchdog is not None:
            self.watchdog.deadline = max(deadline, trio.current_time()) + STALLED_GRACE

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        with trio.CancelScope(deadline=self._deadline()) as scope:
            self._reading = scope
            try:
                data = await self._receive_framed(max_bytes)
            finally:
                self._reading = None
            if data and self.in_flight == 0 and self._head_since is None:
                self._head_since = trio.current_time()  # a request is on its way
            return data
        return b""  # idle, or a request head too slow: hypercorn sees the peer leave

    async def _receive_framed(self, max_bytes: int | None) -> bytes | bytearray:
        """The next bytes the HTTP layer may see: what framing holds back is read and
        dropped (so the peer is not reset for unread data), and the peer's end of
        the connection still comes through."""
        while True:
            data = await self.inner.receive_some(max_bytes)
            framing = self._framing
            if not data or framing is None:
                return data
            passed = framing.feed(data)
            if framing.stage is Stage.PASS:
                self._framing = None  # not HTTP/1 as h11 frames it: hands off from now on
            elif framing.refusal is not None:
                self._refuse(framing.requests, framing.refusal)
            if passed:
                return data if passed == len(data) else data[:passed]

    def _refuse(self, request: int, error: errors.ApiError) -> None:
        """Request number ``request``'s body will never come whole: fail its reading."""
        self.refused = (request, error)
        waiting = self._body_waits.get(request)
        if waiting is not None:
            waiting.cancel(reason="request body refused")

    def guard_body(self, request: int, receive: Callable[[], Awaitable[dict[str, Any]]]
                   ) -> Callable[[], Awaitable[dict[str, Any]]]:
        """``receive`` (ASGI) for request number ``request``, failing with
        :class:`FramingRefused` once the listener refuses that request's body."""

        async def receive_body() -> dict[str, Any]:
            if self.refused is None or self.refused[0] != request:
                with trio.CancelScope() as waiting:
                    self._body_waits[request] = waiting
                    try:
                        return await receive()
                    finally:
                        if self._body_waits.get(request) is waiting:
                            del self._body_waits[request]
            assert self.refused is not None
            raise FramingRefused(self.refused[1])

        return receive_body

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken:
            raise trio.BrokenResourceError("consumer stopped reading")
        if self.holding:
            self._held.append(bytes(data))
            return
        if self._held:
            data = b"".join([*self._held, data])
            self._held.clear()
        with trio.move_on_after(self.write_timeout) as scope:
            # hypercorn's own send lock is held here; ours only keeps send_eof out.
            async with self._writing:
                await self.inner.send_all(data)
        if scope.cancelled_caught:
            self._broken = True
            log.info("consumer %s stopped reading for %gs; closing", self.peer,
                     self.write_timeout)
            await self.inner.aclose()  # also ends the read in progress
            raise trio.BrokenResourceError("consumer stopped reading")

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def flush(self) -> None:
        """Write what :meth:`hold` kept back, if anything still is.

        Called by the request's exchange, not by hypercorn, so a peer gone by now is not
        an error here: hypercorn learns of it from its own next read or write.
        """
        if self._held:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.send_all(b"")
            self._held.clear()

    async def send_eof(self) -> None:
        await self.flush()
        async with self._writing:
            await self.inner.send_eof()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._table.remove(self)
            self._on_close.release()
        await self.inner.aclose()


class ConnectionListener(trio.abc.Listener[ConsumerConnection]):
    """Accepts at most ``slots`` concurrent connections; the rest wait in the backlog."""

    def __init__(self, inner: trio.SocketListener, table: Connections, slots: int,
                 write_timeout: float) -> None:
        self.inner = inner
        self._table = table
        self._slots = trio.Semaphore(slots)
        self._write_timeout = write_timeout
        self._errors = AcceptErrors("HTTP")

    async def accept(self) -> ConsumerConnection:
        while True:
            await self._slots.acquire()
            try:
                stream = await self.inner.accept()
            except OSError as exc:
                self._slots.release()
                await self._errors.failed(exc)  # out of descriptors: waited out, logged rarely
                continue
            except BaseException:
                self._slots.release()
                raise
            self._errors.recovered()
            return ConsumerConnection(stream, self._table, self._write_timeout, self._slots)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _peer(sock: trio.socket.SocketType) -> Peer | None:
    try:
        address = parse_socket_addr(sock.family, sock.getpeername())
    except OSError:
        return None  # already reset by the peer
    return (address[0], address[1]) if address is not None else None


def hypercorn_config(config: Config) -> hypercorn.config.Config:
    h2flow.install()  # HTTP/2 answers wait for the consumer's window (api/h2flow.py)
    hconfig = hypercorn.config.Config()
    hconfig.bind = [f"{config.http_host}:{config.http_port}"]
    hconfig.accesslog = None
    # hypercorn's own errors through the coordinator's logging: one format, one place
    # to look, and no handlers replaced behind the operator's back.
    hconfig.errorlog = logging.getLogger("coordinator.http")
    hconfig.keep_alive_timeout = config.keep_alive_timeout
    return hconfig


def bind_http(config: Config) -> socket.socket:
    """The consumer listener's socket; :class:`ListenError` when it cannot be had."""
    try:
        return _bind(config.http_host, config.http_port, hypercorn.config.Config().backlog)
    except OSError as exc:
        raise ListenError(f"cannot listen for HTTP on {config.http_host}:{config.http_port}: "
                          f"{exc.strerror or exc}") from None


async def serve_http(
    edge: Edge,
    config: Config,
    table: Connections,
    sock: socket.socket,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``edge`` on ``sock`` (from :func:`bind_http`) until cancelled; report the URL."""
    hconfig = hypercorn_config(config)
    listener = ConnectionListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                                  table, config.max_connections, config.write_timeout)
    host, port = sock.getsockname()[:2]
    async with trio.open_nursery() as nursery, _hypercorn_lifespan(
            nursery, edge.asgi, hconfig) as state:
        task_status.started(f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}")
        # Connections live in the outer nursery, so they outlast the accept loop.
        with table.accepting:
            await trio.serve_listeners(partial(serve_connection, edge, hconfig, state),
                                       [listener], handler_nursery=nursery)
        await listener.aclose()
        log.info("HTTP listener closed; %d connection(s) still open", len(table.open))
        await trio.sleep_forever()  # until the coordinator stops: its connections finish


async def serve_connection(edge: Edge, hconfig: hypercorn.config.Config,
                           state: dict[str, Any], connection: ConsumerConnection) -> None:
    """One consumer connection, isolated: whatever ends it ends only it. Its requests get
    the edge bound to it: each is handed the connection, explicitly."""
    try:
        with trio.CancelScope() as connection.watchdog:
            connection.move_deadline()
            await _hypercorn_connection(partial(edge.handle, connection), hconfig, state,
                                        connection)
        if connection.watchdog.cancelled_caught:
            log.info("consumer connection %s stalled in the HTTP layer; closed",
                     connection.peer)
    except Exception as exc:
        # Hostile bytes can trip the HTTP layer itself (hypercorn 0.18 raises on some
        # pipelined HTTP/1.0 input); the connection is gone, the listener carries on.
        log.warning("consumer connection %s ended by %s: %s", connection.peer,
                    type(exc).__name__, printable(str(exc)))  # may quote the bytes sent
    finally:
        with trio.CancelScope(shield=True):
            await connection.aclose()


# ---- hypercorn's serving internals: here and nowhere else ------------------------------


@contextlib.asynccontextmanager
async def _hypercorn_lifespan(nursery: trio.Nursery, app: BoundApp,
                              hconfig: hypercorn.config.Config) -> AsyncIterator[dict[str, Any]]:
    """Run the application's lifespan (startup) in ``nursery``; the state it leaves."""
    state: dict[str, Any] = {}
    lifespan = Lifespan(wrap_app(app, hconfig.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                        hconfig, state)
    await nursery.start(lifespan.handle_lifespan)
    await lifespan.wait_for_startup()
    yield state


async def _hypercorn_connection(app: BoundApp, hconfig: hypercorn.config.Config,
                                state: dict[str, Any], connection: ConsumerConnection) -> None:
    """hypercorn's HTTP/1 and HTTP/2 machinery over ``connection``, running ``app``.

    hypercorn's public ``serve`` opens its own sockets; the coordinator's limits live on
    the stream under it, so its per-connection server is used directly (checked against
    the real hypercorn by tests/test_writes.py and tests/test_h2flow.py).
    """
    stream: Any = connection  # typed by hypercorn for its own TLS stream; any stream serves
    tcp = TCPServer(wrap_app(app, hconfig.wsgi_max_body_size, "asgi"), hconfig,  # type: ignore[arg-type]
                    WorkerContext(None), ConnectionState(state), stream)
    tcp.send_lock = WriteLock()  # type: ignore[assignment]  # only ever held around a write
    await tcp


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    sock.setblocking(False)
    return sock

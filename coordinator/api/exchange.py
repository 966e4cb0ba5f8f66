"""One request on its way through the HTTP edge: what every request gets, whatever its route.

hypercorn runs :meth:`Edge.handle` for each request, bound to the request's
connection (``transport.serve_connection``). The edge makes the request's
:class:`Exchange` — its ASGI messages between hypercorn and the application —
and makes it the request's *current* exchange (:func:`current`), where the
route that answers it finds it, as quart's own ``request`` is found.

* **The request owns its winner.** A committed winner's relay is given to the
  exchange (:meth:`Exchange.own`) and closed when the request is over if its
  stream did not close it: read to the end, abandoned between the headers and
  the body, cut by a write timeout — however the response ends.
* **Coalesced writes.** Over HTTP/1 the exchange holds its connection's writes
  (``transport.ConsumerConnection.hold``) from a head to the first body part, and
  from a stream's last part (:meth:`Exchange.last_part_next`) to the end, so each
  pair leaves in one write.
* **HTTP/2 flow control.** A response message that waits on the consumer's window
  for ``write_timeout`` cuts the request (:class:`ConsumerStalled`); a head, once
  begun, is finished (it is in the connection's shared header table already).
* **Close after an early answer**, and when the client asked for it; refuse
  WebSocket upgrades (the API has none; providers use their own port); while the
  coordinator drains, answer 503 (``/healthz`` says "draining", ``/metrics`` still
  answers) and count requests in flight, so the drain knows when they are done.
* **What escapes the application** becomes an error answer in the family's shape,
  never a crash (:func:`_isolated`); and the log line of a stream, or of a whole
  answer, is written when the response is over, saying what the consumer got: a
  success only once the answer's end has left.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

import h11
import quart.wrappers.base
import trio
from werkzeug.exceptions import HTTPException

from coordinator import errors
from coordinator.dispatch.relay import Relay
from coordinator.lifecycle import Drain
from coordinator.untrusted import printable

from . import h2flow
from .errors import Family, family_of, render
from .requestlog import RequestRecord, Result
from .transport import ConsumerConnection, FramingRefused

log = logging.getLogger(__name__)

# quart 0.23 (with quart-trio 0.13, Python >= 3.13) raises this when the consumer
# hangs up before the response's first write; quart 0.22 has no such error.
_gone = getattr(quart.wrappers.base, "ClientDisconnectedError", None)
_CONSUMER_GONE: tuple[type[Exception], ...] = (_gone,) if _gone is not None else ()
_WHILE_DRAINING = frozenset({"/healthz", "/metrics"})

_current: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar(
    "coordinator_exchange", default=None)


def current() -> Exchange | None:
    """The exchange of the request being handled (None when the app runs without the edge)."""
    return _current.get()


class ConsumerStalled(Exception):
    """An HTTP/2 consumer gave its stream no flow-control window for ``write_timeout``."""


class Edge:
    """The ASGI application hypercorn runs: ``app`` (quart) behind the edge's rules."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The edge as a plain ASGI application, with no connection (in-process clients)."""
        await self.handle(None, scope, receive, send)

    async def handle(self, connection: ConsumerConnection | None, scope: dict[str, Any],
                     receive: Any, send: Any) -> None:
        kind = scope.get("type")
        if kind == "websocket":
            try:
                await send({"type": "websocket.close", "code": 1008})
            except h11.LocalProtocolError:
                # The peer broke HTTP/1 framing after the upgrade request (hypercorn's
                # h11 is in its ERROR state): there is no one to refuse any more.
                log.debug("websocket upgrade refused on a broken connection")
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(connection, scope, receive, send, self.drain)
        token = _current.set(exchange)
        try:
            with self.drain.request():
                if self.drain.draining and scope.get("path") not in _WHILE_DRAINING:
                    await exchange.error(errors.shutting_down())
                elif _both_lengths(scope):
                    await exchange.error(_BOTH_LENGTHS)  # and closed: never read
                else:
                    stalled = False
                    try:
                        stalled = await _isolated(self.app, scope, exchange)
                    finally:
                        await exchange.finish(stalled=stalled)
        finally:
            _current.reset(token)
            exchange.end()


async def _isolated(app: Any, scope: dict[str, Any], exchange: Exchange) -> bool:
    """Run the application; what escapes it becomes an error response, not a crash.

    Quart raises some HTTP errors outside its handlers (werkzeug's ``BadHost``
    for a Host header that does not encode); they get their own status. A
    consumer that left is not an error: quart 0.23 raises
    ``ClientDisconnectedError`` when the hang-up lands between the handler's
    return and the response's first write, and there is no one to answer.
    Anything else is a bug: logged, and a 500 in the family's shape. Returns
    whether the consumer stalled its HTTP/2 stream (and was cut).
    """
    stalled = False
    try:
        await app(scope, exchange.receive, exchange.send)
    except* _CONSUMER_GONE:
        log.debug("consumer left before its answer was sent")
    except* ConsumerStalled as group:
        log.info("%s; its stream is cut", group.exceptions[0])
        stalled = True
    except* FramingRefused as group:
        refused = group.exceptions[0]
        assert isinstance(refused, FramingRefused)
        log.info("request body refused by the listener: %s", refused.error.message)
        await exchange.error(refused.error)
    except* HTTPException as group:
        exc = group.exceptions[0]
        assert isinstance(exc, HTTPException)
        log.warning("request refused outside the routes: %s", printable(exc.description))
        await exchange.error(errors.ApiError(exc.code or 400, exc.description or exc.name,
                                             "invalid_request_error", "bad_request"))
    except* Exception:
        log.error("unhandled error in the application", exc_info=True)
        await exchange.error(errors.ApiError(500, "internal error", "server_error",
                                             "internal_error"))
    return stalled


class Exchange:
    """One request's ASGI messages on their way between hypercorn and the application."""

    def __init__(self, connection: ConsumerConnection | None, scope: dict[str, Any],
                 receive: Any, send: Any, drain: Drain) -> None:
        self.connection = connection
        self._drain = drain
        self.family: Family = family_of(str(scope.get("path", "")))
        http2 = scope.get("http_version") == "2"
        has_body = _has_body(scope)
        if connection is not None:
            number = connection.begin_request()
            if has_body:  # a body the listener refuses fails here
                receive = connection.guard_body(number, receive)
        self._receive = receive
        self._send = send
        # Over HTTP/2 a stalled consumer blocks no socket write: hypercorn waits for the
        # stream's window. With no bound, one consumer advertising a window of 0 held each
        # connection (and its handler) for good (see _pass).
        self._stall_limit = connection.write_timeout if http2 and connection else None
        # Over HTTP/2 writes of many streams interleave: there is no pair to coalesce.
        self._coalesce = connection is not None and not http2
        # Where hypercorn marks an HTTP/2 stream closed before its response's end left
        # (h2flow.response_cut): the application's last write returned all the same.
        self._h2_scope = scope if http2 else None
        self._last_next = False
        self._relays: list[Relay] = []
        self._at_finish: list[Callable[[], object]] = []
        self._if_delivered: list[Callable[[], object]] = []
        self.body_read = not has_body
        # A client that asked for the connection to close (it would otherwise wait
        # keep_alive_timeout for it), or, once the response starts, an early answer.
        self.closing = _asks_to_close(scope)
        self.started = False
        self.finished = False  # the response's last part was handed to the server
        # A stream's, or a whole answer's success: logged when the response is over.
        self.record: RequestRecord | None = None

    def own(self, relay: Relay) -> None:
        """The request owns this committed winner until the response is over."""
        self._relays.append(relay)

    def on_finish(self, close: Callable[[], object]) -> None:
        """Call ``close`` (synchronous, idempotent) when the response is over."""
        self._at_finish.append(close)

    def on_delivered(self, settle: Callable[[], object]) -> None:
        """Call ``settle`` when the response is over if its end left (before the
        :meth:`on_finish` closers): a whole answer is charged once the consumer has it."""
        self._if_delivered.append(settle)

    def last_part_next(self) -> None:
        """The next body part is the last before the end: it leaves with the end."""
        self._last_next = True

    async def receive(self) -> dict[str, Any]:
        message: dict[str, Any] = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_read = True
        return message

    async def error(self, error: errors.ApiError) -> None:
        """Answer with ``error``, unless the response has already begun."""
        if self.started:
            return
        status, headers, body = render(error, self.family)
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [(k.lower().encode(), v.encode())
                                     for k, v in headers.items()]})
        await self.send({"type": "http.response.body", "body": body})

    async def send(self, message: dict[str, Any]) -> None:
        if self._stall_limit is None:
            return await self._pass(message)
        with trio.move_on_after(self._stall_limit) as stalled:
            await self._pass(message)
        if stalled.cancelled_caught:
            raise ConsumerStalled(f"consumer gave its HTTP/2 stream no window for "
                                  f"{self._stall_limit:g}s")

    async def _pass(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            if not self.body_read or self._drain.draining:
                self.closing = True
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"connection", b"close")]}
            if self._coalesce:
                self._hold(True)  # the head leaves with the first body part
            # A head, once begun, is finished: over HTTP/2 hypercorn encodes it into the
            # connection's shared header table before it waits for the connection's
            # writer, and a head cut on its way leaves the consumer's decoder out of
            # step for every later answer on the connection. It waits on no window,
            # only on that writer, whose every write is bounded by write_timeout.
            with trio.CancelScope(shield=True):
                await self._send(message)
            return
        last = kind == "http.response.body" and not message.get("more_body", False)
        if last:
            # Handed over: HTTP/1 writes it whole or not at all, and a consumer that
            # closes as soon as it has read it may cancel the rest of the call.
            self.finished = True
        if self._coalesce and self._last_next and not last:
            self._last_next = False
            self._hold(True)  # this part leaves with the end
            await self._send(message)
            return
        self._hold(False)
        try:
            await self._send(message)
        finally:
            if self._coalesce:
                # Nothing stays held: not when hypercorn wrote nothing for ``message`` (an
                # empty part), nor when its write never came (cancelled on the way).
                with trio.CancelScope(shield=True):
                    await self._flush()

    def _hold(self, on: bool) -> None:
        if self._coalesce:
            assert self.connection is not None
            self.connection.hold(on)

    async def _flush(self) -> None:
        assert self.connection is not None
        await self.connection.flush()

    async def finish(self, *, stalled: bool) -> None:
        """The application is done: close what the response left open, write the log line."""
        for relay in self._relays:  # a stream nobody read to its end
            await relay.abandon()
        if self._coalesce:
            self._hold(False)
            with trio.CancelScope(shield=True):
                await self._flush()
        delivered = not stalled and self._end_left()
        if delivered:
            for settle in self._if_delivered:
                settle()
        for close in self._at_finish:
            close()
        if self.record is not None:
            if stalled:
                self.record.result = Result.CONSUMER_STALLED  # whatever it had got to
            elif not delivered and self.record.result is Result.SUCCESS:
                self.record.result = Result.CLIENT_GONE
            self.record.write()

    def _end_left(self) -> bool:
        """Whether the response's end left: handed to the server, and over HTTP/2 not
        dropped with its stream (the consumer reset it, the connection went)."""
        return self.finished and not (self._h2_scope is not None
                                      and h2flow.response_cut(self._h2_scope))

    def end(self) -> None:
        if self.connection is not None:
            self.connection.end_request(close=self.closing)


def _has_body(scope: dict[str, Any]) -> bool:
    """Whether an HTTP/1 request's framing announces a body (HTTP/2 needs no help here)."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        return False
    for name, value in scope.get("headers", ()):
        if name.lower() == b"transfer-encoding":
            return True
        if name.lower() == b"content-length":
            return bool(value.strip() != b"0")
    return False


def _asks_to_close(scope: dict[str, Any]) -> bool:
    """HTTP/1.1 with ``Connection: close``, or any HTTP/1.0 request.

    HTTP/1.0 even with ``Connection: keep-alive``: hypercorn's h11 keeps no HTTP/1.0
    connection alive (its answer says ``Connection: close``), so waiting
    ``keep_alive_timeout`` for another request only kept the client waiting.
    """
    version = scope.get("http_version")
    if version == "1.0":
        return True
    if version != "1.1":
        return False
    return any(token.strip().lower() == b"close" for name, value in scope.get("headers", ())
               if name.lower() == b"connection" for token in value.split(b","))


# RFC 9112 §6.3: a request with both may be a smuggling attempt (a proxy in front may
# have framed it by the other header); refused, and its connection closed.
_BOTH_LENGTHS = errors.bad_request(
    "a request may not carry both Content-Length and Transfer-Encoding", "bad_request")


def _both_lengths(scope: dict[str, Any]) -> bool:
    """An HTTP/1 request framed both by ``Content-Length`` and ``Transfer-Encoding``."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        return False
    names = {name.lower() for name, _ in scope.get("headers", ())}
    return b"content-length" in names and b"transfer-encoding" in names

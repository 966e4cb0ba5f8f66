"""The places for sockets still in their WebSocket handshake, kept by the listener.

trio-websocket reads a new socket's HTTP upgrade request before the edge
sees it (within ``register_timeout``), so the edge's own cap on sockets in
admission (``max_pending_providers``) cannot count those. Unbounded, anyone
who can reach the provider port could hold thousands of half-sent upgrade
requests and run the process out of file descriptors — which would refuse
consumers too. Here at most ``places`` sockets are in the handshake at once;
further ones wait in the kernel's accept backlog, costing the process nothing.

A socket leaves the handshake with the first byte the server sends on it (the
101 that accepts it, or the rejection), when its peer closes or resets it, or when
it is closed (trio-websocket closes it at ``register_timeout``), whichever is first.

**No starving.** Half-sent upgrade requests held every place until
``register_timeout``: 150 of them kept a real provider in the backlog for 20 s.
When every place is taken and a connection waits in the backlog, the oldest socket
that has not proven itself and has been in the handshake for :data:`GRACE` seconds is
closed to make room for it: a real
client sends its upgrade request at once, so a socket still in its handshake after
that is slow or idle on purpose. A socket proves itself with a configured provider
token in its upgrade request (``Authorization: Bearer <token>``, docs/protocol.md);
it is never closed to make room.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from coordinator.credentials import bearer_token, matches_any
from coordinator.descriptors import AcceptErrors

# How long an unproven socket keeps its place in the handshake when another needs it.
GRACE = 1.0
# An upgrade request longer than this proves nothing (trio-websocket refuses it anyway).
MAX_HEAD_BYTES = 16 * 1024


class Handshakes:
    """The places shared by one kind of listener, and who holds them, oldest first."""

    def __init__(self, places: int, tokens: Sequence[str] = ()) -> None:
        self.places = places
        self.tokens = tuple(tokens)
        self.held = 0
        self._unproven: dict[HandshakeStream, float] = {}  # insertion order: oldest first
        self._freed = trio.Event()

    async def enter(self, newcomer: Callable[[], Awaitable[object]]) -> None:
        """Take a place: a free one, or one an unproven socket held past its grace.

        ``newcomer`` returns once a connection waits to be accepted: a place is made
        only for someone.
        """
        while self.held >= self.places:
            await newcomer()
            if self.held < self.places:
                break
            oldest, since = next(iter(self._unproven.items()), (None, math.inf))
            if oldest is not None and trio.current_time() >= since + GRACE:
                oldest.close_now()  # gives its place back
                continue
            with trio.move_on_at(since + GRACE):
                await self._freed.wait()
        self.held += 1

    def joined(self, stream: HandshakeStream) -> None:
        self._unproven[stream] = trio.current_time()

    def proven(self, stream: HandshakeStream) -> None:
        self._unproven.pop(stream, None)

    def leave(self, stream: HandshakeStream | None = None) -> None:
        self.held -= 1
        if stream is not None:
            self._unproven.pop(stream, None)
        self._freed.set()
        self._freed = trio.Event()


class HandshakeStream(trio.abc.Stream):
    """A provider socket that gives its handshake place back once answered or closed."""

    def __init__(self, inner: trio.SocketStream, places: Handshakes) -> None:
        self.inner = inner
        self._places: Handshakes | None = places
        self._head: bytearray | None = bytearray()  # the upgrade request, until whole
        places.joined(self)

    def _leave(self) -> None:
        if self._places is not None:
            self._places.leave(self)
            self._places = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._leave()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except BaseException:
            self.close_now()  # reset by the peer, or torn down
            raise
        if not data:
            self.close_now()
        elif self._head is not None and self._places is not None:
            self._read_head(data, self._places)
        return data

    def _read_head(self, data: bytes | bytearray, places: Handshakes) -> None:
        """Prove the socket once its upgrade request carries a provider token."""
        assert self._head is not None
        searched = max(0, len(self._head) - 3)  # a head trickled in is searched once
        self._head += data
        end = self._head.find(b"\r\n\r\n", searched)
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self._head = None
            return
        lines = bytes(self._head[:end]).split(b"\r\n")[1:]
        self._head = None
        token = bearer_token(line.partition(b":")[::2] for line in lines)
        if token is not None and matches_any(token, places.tokens):
            places.proven(self)

    def close_now(self) -> None:
        """The peer left mid-handshake, or its place is needed: its place and its
        descriptor go now.

        trio-websocket notices a peer gone only at its timeout. Leaving is free for
        the peer, so waiting that long would let anyone connecting and closing in a
        loop hold every place (or, were the place given back alone, every file
        descriptor). Not once the server has answered: the socket is its own then.
        """
        if self._places is not None:
            self._leave()
            self.inner.socket.close()

    async def aclose(self) -> None:
        self._leave()
        await self.inner.aclose()


class HandshakeListener(trio.abc.Listener[HandshakeStream]):
    """Accepts a socket only while a place is free; the places may be shared by listeners."""

    def __init__(self, inner: trio.SocketListener, places: Handshakes,
                 what: str = "providers") -> None:
        self.inner = inner
        self._places = places
        self._errors = AcceptErrors(what)

    @property
    def in_handshake(self) -> int:
        """Sockets in their handshake on every listener sharing the places."""
        return self._places.held

    async def _newcomer(self) -> None:
        """Until a connection waits in the backlog (the listening socket is readable)."""
        sock = getattr(self.inner, "socket", None)
        if sock is not None:
            await trio.lowlevel.wait_readable(sock)

    async def accept(self) -> HandshakeStream:
        while True:
            await self._places.enter(self._newcomer)
            try:
                stream = await self.inner.accept()
            except OSError as exc:
                self._places.leave()
                await self._errors.failed(exc)  # out of descriptors: waited out, logged rarely
                continue
            except BaseException:
                self._places.leave()
                raise
            self._errors.recovered()
            return HandshakeStream(stream, self._places)

    async def aclose(self) -> None:
        await self.inner.aclose()


def capped(listeners: Sequence[trio.SocketListener], places: int,
           tokens: Sequence[str] = (), what: str = "providers") -> list[Any]:
    """``listeners`` sharing ``places`` handshake places, for ``trio_websocket.WebSocketServer``.

    Shared, so that a host name bound twice (IPv4 and IPv6) does not double the cap.
    ``tokens``: what proves a socket (none for cluster peers: they prove themselves in
    their first frame); ``what`` names the listener in the log. Typed ``Any``:
    trio-websocket annotates its listeners as socket listeners, but serves any
    :class:`trio.abc.Listener` (it only accepts).
    """
    shared = Handshakes(places, tokens)
    return [HandshakeListener(listener, shared, what) for listener in listeners]


"""A cap on sockets still in their WebSocket handshake, kept by the listener.

trio-websocket reads a new socket's HTTP upgrade request before the edge
sees it (within ``register_timeout``), so the edge's own cap on sockets in
admission (``max_pending_providers``) cannot count those. Unbounded, anyone
who can reach the provider port could hold thousands of half-sent upgrade
requests and run the process out of file descriptors — which would refuse
consumers too. Here at most ``slots`` sockets are in the handshake at once;
further ones wait in the kernel's accept backlog, costing the process nothing.

A socket leaves the handshake with the first byte the server sends on it (the
101 that accepts it, or the rejection), when its peer closes or resets it, or when
it is closed (trio-websocket closes it at ``register_timeout``), whichever is first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio


class HandshakeStream(trio.abc.Stream):
    """A provider socket that gives its handshake slot back once answered or closed."""

    def __init__(self, inner: trio.SocketStream, slots: trio.Semaphore) -> None:
        self.inner = inner
        self._slots: trio.Semaphore | None = slots

    def _leave(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._leave()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except BaseException:
            self._gone()  # reset by the peer, or torn down
            raise
        if not data:
            self._gone()
        return data

    def _gone(self) -> None:
        """The peer left mid-handshake: its slot and its descriptor go now.

        trio-websocket notices only at its timeout. Leaving is free for the peer, so
        waiting that long would let anyone connecting and closing in a loop hold every
        slot (or, were the slot given back alone, every file descriptor).
        """
        if self._slots is not None:  # not once the server has answered: its own to close
            self._leave()
            self.inner.socket.close()

    async def aclose(self) -> None:
        self._leave()
        await self.inner.aclose()


class HandshakeListener(trio.abc.Listener[HandshakeStream]):
    """Accepts a socket only while a slot is free; the slots may be shared by listeners."""

    def __init__(self, inner: trio.SocketListener, slots: trio.Semaphore) -> None:
        self.inner = inner
        self._slots = slots

    @property
    def in_handshake(self) -> int:
        """Sockets in their handshake on every listener sharing the slots."""
        assert self._slots.max_value is not None
        return self._slots.max_value - self._slots.value

    async def accept(self) -> HandshakeStream:
        await self._slots.acquire()
        try:
            stream = await self.inner.accept()
        except BaseException:
            self._slots.release()
            raise
        return HandshakeStream(stream, self._slots)

    async def aclose(self) -> None:
        await self.inner.aclose()


def capped(listeners: Sequence[trio.SocketListener], slots: int) -> list[Any]:
    """``listeners`` sharing ``slots`` handshake slots, for ``trio_websocket.WebSocketServer``.

    Shared, so that a host name bound twice (IPv4 and IPv6) does not double the cap.
    Typed ``Any``: trio-websocket annotates its listeners as socket listeners, but
    serves any :class:`trio.abc.Listener` (it only accepts from them).
    """
    shared = trio.Semaphore(slots, max_value=slots)
    return [HandshakeListener(listener, shared) for listener in listeners]

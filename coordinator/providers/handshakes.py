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
            self._leave()  # reset by the peer, or torn down: it holds nothing back
            raise
        if not data:
            # The peer left mid-handshake. trio-websocket notices only at its timeout,
            # and the slot must not wait that long: leaving is free, so an attacker
            # connecting and closing could otherwise hold every slot.
            self._leave()
        return data

    async def aclose(self) -> None:
        self._leave()
        await self.inner.aclose()


class HandshakeListener(trio.abc.Listener[HandshakeStream]):
    """Accepts a socket only while fewer than ``slots`` are in their handshake."""

    def __init__(self, inner: trio.SocketListener, slots: int) -> None:
        self.inner = inner
        self.capacity = slots
        self._slots = trio.Semaphore(slots, max_value=slots)

    @property
    def in_handshake(self) -> int:
        return self.capacity - self._slots.value

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
    """``listeners`` with the handshake cap, for ``trio_websocket.WebSocketServer``.

    Typed ``Any``: trio-websocket annotates its listeners as socket listeners, but
    serves any :class:`trio.abc.Listener` (it only accepts from them).
    """
    return [HandshakeListener(listener, slots) for listener in listeners]

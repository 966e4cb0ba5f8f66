"""A write to a WebSocket is whole, or the socket is closed (issue 22, item 1).

A frame cut by a cancelled write leaves the peer reading the next frame as the
rest of the cut one: out of step for good (1007, or silence until its liveness
budget ends).
"""

from __future__ import annotations

import contextlib
from typing import Any

import nacl.public
import pytest
import trio
import trio.testing
import trio_websocket

from coordinator.cluster.peer import PeerLink, PeerRoute
from coordinator.providers.connection import ProviderConnection
from coordinator.registry.table import Lease
from coordinator.wsio import WholeWriteStream

from .harness import open_harness


class SlowReader(trio.abc.Stream):
    """A stream whose reader takes ``pause`` seconds per read: a provider slow to read."""

    def __init__(self, inner: trio.abc.Stream, pause: float) -> None:
        self.inner, self.pause = inner, pause

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.sleep(self.pause)
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _read_all(stream: trio.abc.Stream, pause: float, into: bytearray) -> None:
    while data := await stream.receive_some(4096):
        into += data
        await trio.sleep(pause)


async def test_a_write_cancelled_half_way_is_finished_whole(autojump_clock):
    writer_end, reader_end = trio.testing.lockstep_stream_pair()
    stream = WholeWriteStream(writer_end, write_timeout=30.0)
    received = bytearray()
    payload = bytes(range(256)) * 400  # 100 KiB: 25 reads of 4 KiB, 0.1 s apart
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_all, reader_end, 0.1, received)
        with trio.move_on_after(1.0) as cancelled:
            await stream.send_all(payload)
            assert received == payload  # the write went out whole, past the deadline ...
            assert 2.4 <= trio.current_time() < 3.0
            await trio.lowlevel.checkpoint()
        assert cancelled.cancelled_caught  # ... and the cancellation arrives at the next turn
        await stream.send_all(b"next")  # and the stream is usable: nothing is cut
        await stream.aclose()
    assert received == payload + b"next"


async def test_a_write_cancelled_before_it_starts_writes_nothing(autojump_clock):
    writer_end, reader_end = trio.testing.lockstep_stream_pair()
    stream = WholeWriteStream(writer_end, write_timeout=30.0)
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.send_all(b"never")
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_all, reader_end, 0.0, received)
        await stream.send_all(b"first")
        await stream.aclose()
    assert received == b"first"


async def test_a_write_the_peer_does_not_take_in_time_closes_the_socket(autojump_clock):
    writer_end, reader_end = trio.testing.lockstep_stream_pair()
    stream = WholeWriteStream(writer_end, write_timeout=30.0)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_all, reader_end, 10.0, received)  # 4 KiB every 10 s
        with pytest.raises(trio.BrokenResourceError, match="30s"):
            await stream.send_all(b"x" * 100_000)
        assert trio.current_time() == pytest.approx(30.0)
    # The nursery ended: the reader saw the end of the stream after what was written
    # (nothing more can follow a cut frame).
    assert received == b"x" * len(received)
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"more")


def _slow_provider_pair(pause: float) -> Any:
    def pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        provider_end, coordinator_end = trio.testing.lockstep_stream_pair()
        return SlowReader(provider_end, pause), coordinator_end
    return pair


async def test_a_consumer_leaving_mid_write_leaves_the_provider_socket_in_step(autojump_clock):
    """The probe: a consumer hung up while a slow-reading provider took a ~2 MB request;
    the cancel was written inside the cut frame and the provider closed with 1007.

    (200 kB here, read 4 KiB every 0.1 s: bodies over 256 KiB are parsed in a worker
    thread, during which virtual time would race ahead.)"""
    with trio.fail_after(120):  # fail, rather than spin in virtual time, when wedged
        await _leave_mid_write()


async def _leave_mid_write() -> None:
    async with open_harness(speculative_backup=False) as h:
        slow = await h.add_provider("slow", stream_pair=_slow_provider_pair(0.1))
        gone = trio.Event()
        outcomes: list[Any] = []

        async def big_request() -> None:
            outcomes.append(await h.request("/v1/chat/completions", {
                "model": "m1", "stream": True,
                "messages": [{"role": "user", "content": "x" * 200_000}]}, disconnect=gone))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(big_request)
            await trio.sleep(1.0)  # the request is a fifth written (it takes 7 s)
            assert not slow.received
            gone.set()
        assert slow.closed_with is None
        await h.until(lambda: slow.cancelled)
        assert len(slow.received) == 1 and len(slow.received[0]["messages"][0]["content"]) \
            == 200_000  # the frame arrived whole, then the cancel, each in its place
        after = await h.chat()
        assert after.status == 200 and after.headers["x-provider-id"] == "slow"
        assert slow.closed_with is None
        await h.assert_quiescent()


async def test_a_relay_cancelled_before_it_is_written_leaves_nothing_on_the_link(
        autojump_clock):
    """The engine takes a send cancelled before its first byte for a request that never
    left, and sends no cancel for it (tests/test_routing.py, the late backup): so the
    link must not wait for one. A retired link closes only once idle."""
    link = PeerLink("b", "ws://b.invalid/", me="a", token="t")
    other = ProviderConnection("p", 1, PeerRoute(link, lambda _: None),
                               nacl.public.PrivateKey.generate().public_key)

    def lease(request_id: str) -> Lease:
        return Lease(request_id, "p", 1, "m1", "base", "1", 1.0, instance="b")

    with trio.fail_after(120):  # fail, rather than spin in virtual time, when wedged
        async with trio.open_nursery() as nursery:
            link._ws = await _slow_link(nursery, pause=0.1)
            async with trio.open_nursery() as running:
                await running.start(link.run)
                # A 200 kB relay takes the link for ~5 s; the next waits behind it and
                # is cancelled there, unwritten.
                running.start_soon(link.relay, other, lease("big"), "x" * 200_000)
                await trio.sleep(1.0)
                with trio.move_on_after(1.0) as waited:
                    await link.relay(other, lease("queued"), "{}")
                assert waited.cancelled_caught
                await link.cancel(other, "big")  # as the engine does for a request that left
                link.retire()
            nursery.cancel_scope.cancel()


async def _slow_link(nursery: trio.Nursery, pause: float) -> Any:
    """A client WebSocket (writing whole frames) to a peer that reads 4 KiB per ``pause``
    and drains every message."""
    client_end, peer_end = trio.testing.lockstep_stream_pair()

    async def peer() -> None:
        request = await trio_websocket.wrap_server_stream(nursery, SlowReader(peer_end, pause))
        ws = await request.accept()
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                await ws.get_message()

    nursery.start_soon(peer)
    return await trio_websocket.wrap_client_stream(
        nursery, WholeWriteStream(client_end), "b", "/")  # type: ignore[arg-type]

"""A response's head goes out with its first body part, a stream's last part with its end.

Driven the way hypercorn drives them: each ASGI message the edge passes on
becomes one ``send_all`` on the consumer's stream (or none, for a part it
suppresses); the writes are counted on the socket underneath.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio.testing

from coordinator.api.routes import _BodyWatch
from coordinator.api.server import ConnectionTable, GuardedStream, WriteLock
from coordinator.lifecycle import Drain

START = {"type": "http.response.start", "status": 200, "headers": []}


def _body(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


class _Wire:
    """A consumer connection: the guarded stream, what reached the socket, and the peer."""

    def __init__(self) -> None:
        ours, self.peer = trio.socket.socketpair()
        self.stream = GuardedStream(trio.SocketStream(ours), ConnectionTable(5.0), 5.0,
                                    trio.Semaphore(1))
        self.writes: list[bytes] = []
        inner_send = self.stream.inner.send_all

        async def counted(data: Any) -> None:
            if data:
                self.writes.append(bytes(data))
            await inner_send(data)

        self.stream.inner.send_all = counted  # type: ignore[method-assign]

    async def hypercorn_send(self, message: dict[str, Any]) -> None:
        """As hypercorn 0.18: a write per message (HEAD: none for the body), errors caught."""
        if "cancel" in message:  # the request is cancelled while this part waits for the lock
            message["cancel"].cancel()
        await trio.lowlevel.checkpoint()  # its send lock
        if message["type"] == "http.response.start":
            data = b"HEAD\r\n\r\n"
        elif message.get("suppressed"):
            return
        else:
            data = message["body"] + (b"" if message["more_body"] else b"END")
        # hypercorn: a peer gone is no error here, the connection closes
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(data)


def _watch(wire: _Wire) -> _BodyWatch:
    return _BodyWatch(None, wire.hypercorn_send, False, Drain(), wire.stream)


async def test_a_stream_is_written_head_with_first_part_and_last_part_with_end():
    wire = _Wire()
    watch = _watch(wire)
    await watch.send(START)
    assert wire.writes == []  # held for the first part
    await watch.send(_body(b"one "))
    await watch.send(_body(b"two "))
    watch.last_part_next()
    await watch.send(_body(b"three "))
    assert wire.writes == [b"HEAD\r\n\r\none ", b"two "]  # the last part waits for the end
    await watch.send(_body(b"", more=False))
    assert wire.writes == [b"HEAD\r\n\r\none ", b"two ", b"three END"]


async def test_a_short_answer_is_one_write():
    wire = _Wire()
    watch = _watch(wire)
    await watch.send(START)
    watch.last_part_next()
    await watch.send(_body(b"all of it "))
    await watch.send(_body(b"", more=False))
    assert wire.writes == [b"HEAD\r\n\r\nall of it END"]


async def test_a_head_whose_body_writes_nothing_still_goes_out():
    wire = _Wire()
    watch = _watch(wire)
    await watch.send(START)
    await watch.send({**_body(b"body"), "suppressed": True})  # HEAD request: no body written
    assert wire.writes == [b"HEAD\r\n\r\n"]


async def test_a_head_is_written_even_when_its_body_is_cancelled_on_the_way():
    wire = _Wire()
    watch = _watch(wire)
    await watch.send(START)
    with trio.CancelScope() as scope, pytest.raises(trio.Cancelled):
        await watch.send({**_body(b"never"), "cancel": scope})
    assert wire.writes == [b"HEAD\r\n\r\n"]


async def test_a_peer_gone_before_the_held_write_is_no_error():
    wire = _Wire()
    watch = _watch(wire)
    wire.peer.close()
    await watch.send(START)
    await watch.send({**_body(b"body"), "suppressed": True})  # only the flush writes
    await watch.send(_body(b"", more=False))  # hypercorn's own writes fail quietly


async def test_without_a_stream_nothing_is_held():
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    watch = _BodyWatch(None, send, False, Drain(), None)
    await watch.send(START)
    watch.last_part_next()
    await watch.send(_body(b"x"))
    assert sent == [START, _body(b"x")]


async def test_a_free_write_lock_is_taken_without_a_scheduler_pass():
    lock = WriteLock()
    ran = []

    async def other() -> None:
        ran.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        async with lock:
            assert ran == []  # nobody else ran: no pass through the scheduler
        await trio.testing.wait_all_tasks_blocked()
    assert ran == [True]


async def test_a_held_write_lock_makes_the_next_writer_wait_its_turn():
    lock = WriteLock()
    order: list[str] = []
    release = trio.Event()

    async def writer(name: str, hold: trio.Event | None) -> None:
        async with lock:
            order.append(f"{name} in")
            if hold is not None:
                await hold.wait()
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, "first", release)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(writer, "second", None)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["first in"]
        release.set()
    assert order == ["first in", "first out", "second in", "second out"]

"""A response's head goes out with its first body part, a stream's last part with its end.

Each response is served by the real stack — hypercorn's ``TCPServer`` over the
transport's ``ConsumerConnection``, the edge (``Edge`` and each request's
``Exchange``) — over an in-memory connection (tests/memory_http.py), and the
writes that reach the socket are counted. The applications are scripted ASGI
apps, so each test says exactly which parts a response has.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
import trio.testing

from coordinator.api import exchange
from coordinator.api.exchange import Edge
from coordinator.api.sse import DONE
from coordinator.api.transport import Connections, WriteLock
from coordinator.lifecycle import Drain
from provider_sim.behaviours import Behaviour

from .harness import API_KEY, MODEL, open_harness
from .memory_http import Connection, open_connection

START = {"type": "http.response.start", "status": 200, "headers": []}
CHUNKED_END = b"0\r\n\r\n"


def _body(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _request(method: bytes = b"GET") -> bytes:
    return method + b" /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _is_head(write: bytes) -> bool:
    return write.startswith(b"HTTP/1.1 200 ") and write.count(b"\r\n\r\n") >= 1


class _Script:
    """An ASGI app that answers with ``parts`` (``"last"`` marks the next part as the
    stream's last) and notes how many writes had reached the socket after each send."""

    def __init__(self, *parts: dict[str, Any] | str) -> None:
        self.parts = parts
        self.connection: Connection | None = None
        self.writes_after: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # the request (no body)
        assert self.connection is not None
        for part in self.parts:
            if part == "last":
                current = exchange.current()
                assert current is not None
                current.last_part_next()
                continue
            await send(part)
            self.writes_after.append(len(self.connection.writes))


async def _serve(script: _Script, request: bytes, *,
                 table: Connections | None = None) -> tuple[Connection, bytes]:
    """Serve one request through the edge; the whole response as the client read it."""
    table = table if table is not None else Connections(5.0)
    async with open_connection(Edge(script, Drain()), table) as connection:
        script.connection = connection
        await connection.client.send_all(request)
        received = await connection.rest()
    assert connection.slots.value == 1 and not table.open  # closed, its slot given back
    return connection, received


async def test_a_stream_is_written_head_with_first_part_and_last_part_with_end(autojump_clock):
    script = _Script(START, _body(b"one "), _body(b"two "), "last", _body(b"three "),
                     _body(b"", more=False))
    connection, received = await _serve(script, _request())
    head, middle, end = connection.writes
    assert _is_head(head) and head.endswith(b"\r\n\r\n" + _chunk(b"one "))
    assert (middle, end) == (_chunk(b"two "), _chunk(b"three ") + CHUNKED_END)
    # After each send: the head waits for "one "; "three " waits for the end.
    assert script.writes_after == [0, 1, 2, 2, 3]
    assert received == b"".join(connection.writes)


async def test_a_short_answer_is_one_write(autojump_clock):
    script = _Script(START, "last", _body(b"all of it "), _body(b"", more=False))
    connection, received = await _serve(script, _request())
    [write] = connection.writes
    assert _is_head(write) and write.endswith(_chunk(b"all of it ") + CHUNKED_END)
    assert received == write


async def test_a_streamed_chat_answer_leaves_head_with_content_and_done_with_end(
        autojump_clock):
    # The same through the whole coordinator: a provider's short answer, streamed.
    async with open_harness() as h:
        await h.add_provider("p", events_per_frame=64, decode_tps=1e6,
                             behaviour=Behaviour(tokens=3))
        body = json.dumps({"model": MODEL, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (API_KEY.encode(), len(body), body))
        async with open_connection(h.coordinator.http_edge, h.coordinator.connections) as connection:
            await connection.client.send_all(request)
            received = await connection.rest()
    first, *_, last = connection.writes
    assert _is_head(first) and b"x-provider-id: p\r\n" in first
    assert b'"content":"Hello' in first.partition(b"\r\n\r\n")[2]
    assert last.endswith(_chunk(DONE) + CHUNKED_END)
    assert received == b"".join(connection.writes)


async def test_a_head_whose_body_writes_nothing_still_goes_out(autojump_clock):
    # A HEAD request: hypercorn writes no body, so nothing would carry the held head
    # until the stream's end; it goes out as soon as the first (empty) part has passed.
    script = _Script(START, _body(b"never written"), _body(b"nor this"),
                     _body(b"", more=False))
    connection, received = await _serve(script, _request(b"HEAD"))
    [write] = connection.writes
    assert _is_head(write) and write.endswith(b"\r\n\r\n")
    assert script.writes_after == [0, 1, 1, 1]
    assert received == write


async def test_a_peer_gone_before_the_held_write_is_no_error(autojump_clock, caplog):
    table = Connections(5.0)
    sent: list[str] = []

    async def answer_after_the_hang_up(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()  # the request
        assert (await receive())["type"] == "http.disconnect"  # the consumer left
        for part in (START, _body(b"suppressed"), _body(b"", more=False)):  # (HEAD)
            await send(part)  # the head's write (the edge's flush) meets a closed peer
            sent.append(part["type"])

    async with open_connection(Edge(answer_after_the_hang_up, Drain()), table) as connection:
        await connection.client.send_all(_request(b"HEAD"))
        await connection.client.aclose()
    assert sent == ["http.response.start", "http.response.body", "http.response.body"]
    [write] = connection.writes  # the attempt, refused by the closed peer
    assert _is_head(write)
    assert connection.slots.value == 1 and not table.open
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_each_request_is_handed_its_own_connection(autojump_clock):
    # Requests were matched to their connections by peer address: two connections the
    # same address (a proxy reusing a port) shared one entry, and one request's writes
    # were held on the other connection. Here both come from the same address.
    table = Connections(5.0)
    scripts = [_Script(START, "last", _body(name), _body(b"", more=False))
               for name in (b"first ", b"second ")]
    async with open_connection(Edge(scripts[0], Drain()), table) as one, \
            open_connection(Edge(scripts[1], Drain()), table) as two:
        for script, connection in zip(scripts, (one, two), strict=True):
            script.connection = connection
            await connection.client.send_all(_request())
        answers = [await one.rest(), await two.rest()]
    for connection, name, answer in zip((one, two), (b"first ", b"second "), answers,
                                        strict=True):
        [write] = connection.writes  # each answer in one write, on its own connection
        assert _is_head(write) and write.endswith(_chunk(name) + CHUNKED_END)
        assert answer == write


async def test_a_head_is_written_even_when_its_body_is_cancelled_on_the_way(autojump_clock):
    # HTTP/2, the consumer giving no window: hypercorn buffers the first part and
    # waits, and the request is cancelled there. The held head must not wait with it.
    table = Connections(5.0)
    cut, checked = trio.Event(), trio.Event()

    async def cancelled_while_sending(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send(START)  # held for the first part
        with trio.CancelScope() as request:
            request.cancel()  # e.g. its consumer left: cancelled as the part goes out
            await send(_body(b"x" * 65536))
        assert request.cancelled_caught
        cut.set()
        await checked.wait()  # the request's cleanup is still running

    async with open_connection(Edge(cancelled_while_sending, Drain()), table) as connection:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        await connection.client.send_all(client.data_to_send())
        # The settings exchanged first, so the response's writes are the only ones.
        await _h2_events(connection, client, h2.events.SettingsAcknowledged)
        client.send_headers(1, [(":method", "GET"), (":path", "/stream"), (":scheme", "http"),
                                (":authority", "x")], end_stream=True)
        await connection.client.send_all(client.data_to_send())
        await cut.wait()
        with trio.fail_after(1):  # (virtual) the head is on its way already
            [head] = await _h2_events(connection, client, h2.events.ResponseReceived)
        assert dict(head.headers)[b":status"] == b"200"
        checked.set()
        await connection.client.aclose()


async def _h2_events(connection: Connection, client: h2.connection.H2Connection,
                     kind: type[Any]) -> list[Any]:
    """Read until an event of ``kind`` arrives; the events of that kind."""
    while True:
        events = client.receive_data(bytes(await connection.client.receive_some(65536)))
        if found := [e for e in events if isinstance(e, kind)]:
            return found


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

"""HTTP/2 consumers that never open their flow-control window (issue 22, item 2).

Against the real hypercorn (tests/memory_http.py) and the real coordinator: a stream
buffers a bounded amount, is cut at ``write_timeout`` (its provider told to stop, its
slot freed), is logged as what it was, and a connection that goes frees everything.
"""

from __future__ import annotations

import gc
import json
import logging
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio

from coordinator.api import h2flow
from coordinator.api.exchange import Edge
from provider_sim.behaviours import HEALTHY, Behaviour

from .harness import API_KEY, Harness, model, open_harness
from .memory_http import Connection, open_connection, socket_pair

CHUNK = 64 * 1024
# 200 chunks of 64 KiB, one every 0.5 s: a 100-second, 12.8 MB answer.
SLOW_BIG = Behaviour(text=" ".join(["y" * CHUNK] * 200), token_interval=0.5)
STREAMS = 10


class _CountingEdge:
    """``edge`` with the body bytes handed to hypercorn for each answer counted (they sit
    in hypercorn's buffer from the moment they are handed over, sent or not)."""

    def __init__(self, edge: Edge, accepted: dict[int, int]) -> None:
        self.edge, self.accepted = edge, accepted

    async def handle(self, connection: Any, scope: dict[str, Any], receive: Any,
                     send: Any) -> None:
        key = id(scope)

        async def send_counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                self.accepted[key] = self.accepted.get(key, 0) + len(message.get("body", b""))
            await send(message)

        await self.edge.handle(connection, scope, receive, send_counted)


async def _open_streams(connection: Connection, count: int = 1, *, window: int = 0,
                        stream: bool = True) -> h2.connection.H2Connection:
    """``count`` chat requests on one HTTP/2 connection whose streams get a ``window``-byte
    window (none, by default)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    for _ in range(count):
        _open_stream(client, "m1", stream)
    await connection.client.send_all(client.data_to_send())
    return client


def _open_stream(client: h2.connection.H2Connection, model_id: str, stream: bool = True) -> int:
    """A chat request for ``model_id`` on a new stream (its id returned)."""
    stream_id = client.get_next_available_stream_id()
    body = json.dumps({"model": model_id, "stream": stream,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    client.send_headers(stream_id, [
        (":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "http"),
        (":authority", "x"), ("authorization", f"Bearer {API_KEY}"),
        ("content-type", "application/json"), ("content-length", str(len(body)))])
    client.send_data(stream_id, body, end_stream=True)
    return stream_id


class _Events(list[Any]):
    """The client's h2 events, and a way to wait for one."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = trio.Event()

    def add(self, events: list[Any]) -> None:
        self.extend(events)
        self.arrived.set()
        self.arrived = trio.Event()

    async def wait_for(self, predicate: Any) -> None:
        while not any(predicate(e) for e in self):
            await self.arrived.wait()


async def _read_events(connection: Connection, client: h2.connection.H2Connection,
                       into: _Events) -> None:
    while data := await connection.client.receive_some(65536):
        into.add(client.receive_data(bytes(data)))
        if outgoing := client.data_to_send():  # settings acknowledged, and so on
            await connection.client.send_all(outgoing)


def _in_use(h: Harness) -> int:
    return sum(len(r.leases) for r in h.state.providers.values())


async def test_a_stream_without_window_buffers_a_bounded_amount_and_is_cut_at_write_timeout(
        autojump_clock, caplog):
    async with open_harness(write_timeout=30.0, speculative_backup=False) as h:
        provider = await h.add_provider("big", behaviour=SLOW_BIG, max_concurrency=STREAMS)
        accepted: dict[int, int] = {}
        edge: Any = _CountingEdge(h.coordinator.http_edge, accepted)
        async with open_connection(edge, h.coordinator.connections) as connection, \
                trio.open_nursery() as nursery:
            client = await _open_streams(connection, STREAMS)
            events = _Events()
            nursery.start_soon(_read_events, connection, client, events)
            await h.until(lambda: _in_use(h) == STREAMS)
            start = trio.current_time()
            await trio.sleep(20)  # the consumer keeps its window shut
            # Each answer would be 12.8 MB; what waits for the window is its first part.
            assert len(accepted) == STREAMS and max(accepted.values()) <= 2 * CHUNK
            await h.until(lambda: _in_use(h) == 0)
            assert 30.0 <= trio.current_time() - start < 31.0  # write_timeout, per stream
            await h.until(lambda: len(provider.cancelled) == STREAMS)  # each told to stop
            assert len(provider.completed) == 0
            nursery.cancel_scope.cancel()
            await connection.client.aclose()
        await h.assert_quiescent()
    logged = [json.loads(r.getMessage()) for r in caplog.records
              if r.name == "coordinator.requests"]
    assert [r["result"] for r in logged] == ["consumer_stalled"] * STREAMS  # not "success"


async def test_a_stream_cut_at_write_timeout_is_reset_and_its_connection_serves_on(
        autojump_clock):
    """The consumer learns of the cut (RST_STREAM, CANCEL), not only when the connection
    closes: hypercorn left a stream its application ended unfinished open for good."""
    async with open_harness(write_timeout=30.0, speculative_backup=False) as h:
        await h.add_provider("big", model(), model("quick"), behaviour=SLOW_BIG,
                             model_behaviours={"quick": HEALTHY}, max_concurrency=STREAMS)
        async with open_connection(h.coordinator.http_edge, h.coordinator.connections) as connection, \
                trio.open_nursery() as nursery:
            client = await _open_streams(connection, 2)
            events = _Events()
            nursery.start_soon(_read_events, connection, client, events)
            await h.until(lambda: _in_use(h) == 2)
            start = trio.current_time()
            await h.until(lambda: _in_use(h) == 0)
            await trio.testing.wait_all_tasks_blocked()
            resets = {e.stream_id: e.error_code for e in events
                      if isinstance(e, h2.events.StreamReset)}
            assert resets == {1: h2.errors.ErrorCodes.CANCEL, 3: h2.errors.ErrorCodes.CANCEL}
            assert trio.current_time() - start < 31.0
            # The connection serves on: a stream with a window gets its whole answer.
            stream_id = _open_stream(client, "quick")
            client.increment_flow_control_window(65535, stream_id)
            await connection.client.send_all(client.data_to_send())
            with trio.fail_after(5):
                await events.wait_for(lambda e: isinstance(e, h2.events.StreamEnded)
                                      and e.stream_id == stream_id)
            body = b"".join(e.data for e in events
                            if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id)
            assert body.endswith(b"data: [DONE]\n\n")
            nursery.cancel_scope.cancel()
            await connection.client.aclose()
        await h.assert_quiescent()


def _results(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [json.loads(r.getMessage())["result"] for r in caplog.records
            if r.name == "coordinator.requests"]


async def test_a_whole_answer_that_never_leaves_is_not_logged_success(autojump_clock, caplog):
    """An answer (not streamed) waits for the window like a stream, and is cut at
    write_timeout: logged consumer_stalled, not success (it was logged as soon as it was
    assembled, before a byte of it left)."""
    async with open_harness(write_timeout=30.0, speculative_backup=False) as h:
        await h.add_provider("p")
        async with open_connection(h.coordinator.http_edge, h.coordinator.connections) as connection, \
                trio.open_nursery() as nursery:
            client = await _open_streams(connection, stream=False)
            events = _Events()
            nursery.start_soon(_read_events, connection, client, events)
            await events.wait_for(lambda e: isinstance(e, h2.events.StreamReset))
            assert not any(isinstance(e, h2.events.DataReceived) for e in events)
            nursery.cancel_scope.cancel()
            await connection.client.aclose()
        await h.assert_quiescent()
        # Nothing reached the consumer: nothing is charged (the ledger has the refund).
        accounts = h.coordinator.accounts
        await accounts.flush()
        assert (await accounts.usage(0.0, accounts.wall() + 1)).by_key == ()
    assert _results(caplog) == ["consumer_stalled"]


async def test_a_stream_reset_before_its_end_left_is_not_logged_success(autojump_clock, caplog):
    """A short answer sits whole in the stream's buffer, its end waiting for the window,
    and the consumer resets the stream: nothing was delivered, and the log says so."""
    async with open_harness(write_timeout=30.0, speculative_backup=False) as h:
        provider = await h.add_provider("p")
        async with open_connection(h.coordinator.http_edge, h.coordinator.connections) as connection, \
                trio.open_nursery() as nursery:
            client = await _open_streams(connection)
            events = _Events()
            nursery.start_soon(_read_events, connection, client, events)
            await h.until(lambda: provider.completed and _in_use(h) == 0)
            await trio.sleep(5)  # the consumer holds its window shut, then gives up
            client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
            await connection.client.send_all(client.data_to_send())
            await trio.testing.wait_all_tasks_blocked()
            assert not any(isinstance(e, h2.events.DataReceived) for e in events)
            nursery.cancel_scope.cancel()
            await connection.client.aclose()
        await h.assert_quiescent()
    assert _results(caplog) == ["client_gone"]


async def test_an_answer_whose_connection_goes_as_its_window_opens_is_not_logged_success(
        autojump_clock, caplog):
    """A short answer waits whole in its stream's buffer; the consumer opens the window and
    says GOAWAY in one write. hypercorn's send task takes the bytes out to send them, finds
    the connection closed and drops them, which lets the answer's last write return as if
    it had left: nothing was delivered, and the log says so."""
    async with open_harness(write_timeout=30.0, speculative_backup=False) as h:
        provider = await h.add_provider("p")
        async with open_connection(h.coordinator.http_edge, h.coordinator.connections) as connection:
            client = await _open_streams(connection)
            await h.until(lambda: provider.completed and _in_use(h) == 0)
            client.increment_flow_control_window(65535, stream_id=1)
            client.close_connection()
            await connection.client.send_all(client.data_to_send())
            answer = await connection.rest()
        await h.assert_quiescent()
    assert b"[DONE]" not in answer
    assert _results(caplog) == ["client_gone"]


async def test_an_answer_whose_bytes_never_reach_the_socket_is_not_logged_success(
        autojump_clock, caplog):
    """A short answer waits whole in its stream's buffer; the consumer, no longer reading,
    opens the window, so the server's write of the answer waits on a full socket, and then
    the consumer goes. hypercorn let the answer's last write return once its bytes were
    taken out of the buffer, before they were written: it was logged success (found by the
    HTTP/2 flow-control fuzz target, one time in about two under trio's scheduling)."""
    async with open_harness(write_timeout=30.0, speculative_backup=False) as h:
        provider = await h.add_provider("p")
        async with open_connection(h.coordinator.http_edge, h.coordinator.connections,
                                   pair=partial(socket_pair, 16)) as connection:
            client = await _open_streams(connection)
            events = _Events()
            async with trio.open_nursery() as reading:
                reading.start_soon(_read_events, connection, client, events)
                await events.wait_for(lambda e: isinstance(e, h2.events.ResponseReceived))
                await h.until(lambda: provider.completed and _in_use(h) == 0)
                await trio.testing.wait_all_tasks_blocked()
                reading.cancel_scope.cancel()  # the consumer stops reading
            client.increment_flow_control_window(65535, stream_id=1)
            await connection.client.send_all(client.data_to_send())
            await trio.sleep(1)  # the server's write waits for room on the consumer's socket
            await connection.client.aclose()
        await h.assert_quiescent()
    assert _results(caplog) == ["client_gone"]


async def test_a_connection_that_goes_frees_its_streams_slots_at_once(autojump_clock):
    async with open_harness(write_timeout=30.0, speculative_backup=False) as h:
        provider = await h.add_provider("big", behaviour=SLOW_BIG, max_concurrency=STREAMS)
        async with open_connection(h.coordinator.http_edge, h.coordinator.connections) as connection:
            await _open_streams(connection, STREAMS)
            await h.until(lambda: _in_use(h) == STREAMS)
            await trio.sleep(5)
            start = trio.current_time()
            await connection.client.aclose()  # the consumer goes, windows still shut
            await h.until(lambda: _in_use(h) == 0 and len(provider.cancelled) == STREAMS)
            assert trio.current_time() - start < 1.0
        await h.assert_quiescent()
        gc.collect()  # and what the streams buffered is given back: nothing holds it
        assert not [o for o in gc.get_objects() if isinstance(o, h2flow._STOCK)]


async def _give_back_what_is_read(connection: Connection, client: h2.connection.H2Connection,
                                  into: _Events, most: int) -> None:
    """Read, and give back each DATA frame's bytes at once (stream and connection), as a
    library acknowledging what it read does; after ``most`` DATA frames, only read."""
    frames = 0
    while data := await connection.client.receive_some(65536):
        events = client.receive_data(bytes(data))
        into.add(events)
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                frames += 1
                if frames > most:
                    continue
                client.increment_flow_control_window(event.flow_controlled_length)
                if event.stream_id in client.streams and not client.streams[event.stream_id].closed:
                    client.increment_flow_control_window(event.flow_controlled_length,
                                                         event.stream_id)
        if outgoing := client.data_to_send():
            await connection.client.send_all(outgoing)


async def test_a_one_byte_window_given_back_byte_by_byte_is_not_served_byte_by_byte(
        autojump_clock, caplog):
    """A consumer keeps its window at one byte and gives back each byte it reads ("data
    dribble", CVE-2019-9511): hypercorn wrote one DATA frame per byte of the answer, its
    task never waiting, so the clock never moved and write_timeout never came (found by
    the HTTP/2 fuzz target). The stream is held as if its window were shut: cut at
    write_timeout, its slot freed and its provider told to stop."""
    async with open_harness(write_timeout=30.0, speculative_backup=False) as h:
        provider = await h.add_provider("big", behaviour=SLOW_BIG)
        async with open_connection(h.coordinator.http_edge, h.coordinator.connections) as connection, \
                trio.open_nursery() as nursery:
            client = await _open_streams(connection, window=1)
            events = _Events()
            nursery.start_soon(_give_back_what_is_read, connection, client, events, 200)
            await h.until(lambda: _in_use(h) == 1)
            start = trio.current_time()
            await events.wait_for(lambda e: isinstance(e, h2.events.StreamReset))
            assert 30.0 <= trio.current_time() - start < 31.0  # write_timeout
            sizes = [e.flow_controlled_length for e in events
                     if isinstance(e, h2.events.DataReceived)]
            assert sizes == []  # not one sliver (200 one-byte frames before)
            await h.until(lambda: _in_use(h) == 0 and len(provider.cancelled) == 1)
            nursery.cancel_scope.cancel()
            await connection.client.aclose()
        await h.assert_quiescent()
    assert _results(caplog) == ["consumer_stalled"]


async def test_what_fits_a_small_window_is_sent(autojump_clock, caplog):
    """Held is only what would go in slivers: a whole answer that fits a window below
    MIN_DATA_FRAME leaves at once, in one frame."""
    async with open_harness(write_timeout=30.0, speculative_backup=False) as h:
        await h.add_provider("p", behaviour=Behaviour(text="ok"))
        async with open_connection(h.coordinator.http_edge, h.coordinator.connections) as connection, \
                trio.open_nursery() as nursery:
            client = await _open_streams(connection, window=h2flow.MIN_DATA_FRAME - 1,
                                         stream=False)
            events = _Events()
            nursery.start_soon(_give_back_what_is_read, connection, client, events, 200)
            with trio.fail_after(5):
                await events.wait_for(lambda e: isinstance(e, h2.events.StreamEnded))
            frames = [e for e in events if isinstance(e, h2.events.DataReceived) and e.data]
            assert len(frames) == 1
            assert json.loads(frames[0].data)["choices"][0]["message"]["content"] == "ok"
            nursery.cancel_scope.cancel()
            await connection.client.aclose()
        await h.assert_quiescent()
    assert _results(caplog) == ["success"]


def test_the_bounded_buffer_is_what_hypercorn_uses():
    import hypercorn.protocol.h2 as h2_protocol

    h2flow.install()
    h2flow.install()  # idempotent
    assert h2_protocol.StreamBuffer is h2flow.BoundedStreamBuffer


@pytest.fixture(autouse=True)
def _requests_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.requests")


async def test_a_head_once_begun_is_finished_when_its_request_is_cancelled(autojump_clock):
    """hypercorn encodes an HTTP/2 head into the connection's shared header table before
    it waits for the connection's writer: a head dropped there would leave the consumer
    unable to decode any later answer on the connection."""
    from coordinator.api.exchange import Exchange
    from coordinator.lifecycle import Drain

    written: list[tuple[str, float]] = []
    writer_free = trio.Event()

    async def server_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            await writer_free.wait()  # another stream's write holds the connection
        written.append((message["type"], trio.current_time()))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    watch = Exchange(None, {"type": "http", "http_version": "2", "path": "/v1/chat/completions"},
                     receive, server_send, Drain())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_set_after, writer_free, 5.0)
        with trio.move_on_after(1.0) as request:  # the consumer leaves at 1 s
            await watch.send({"type": "http.response.start", "status": 200, "headers": []})
            await trio.lowlevel.checkpoint()
        assert request.cancelled_caught
    assert written == [("http.response.start", 5.0)]


async def _set_after(event: trio.Event, seconds: float) -> None:
    await trio.sleep(seconds)
    event.set()

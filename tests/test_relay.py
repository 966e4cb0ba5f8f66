"""The relay owns a committed winner: it is closed exactly once, however the stream ends."""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import trio

from coordinator.config import Config
from coordinator.dispatch.items import Batch, End, InBandError, InBandReason
from coordinator.dispatch.race import RacerState
from coordinator.dispatch.relay import Relay
from coordinator.dispatch.request import Committed, Racer
from coordinator.lifecycle import Drain
from coordinator.protocol import Usage
from coordinator.protocol.endpoints import Endpoint
from coordinator.providers.connection import EventStream, ProviderEvent, _Buffer
from coordinator.registry.table import CANCELLED, SUCCESS, Lease, Outcome

from .harness import make_config

ROLE = {"choices": [{"delta": {"role": "assistant"}}]}
CONTENT = {"choices": [{"delta": {"content": "hi"}}]}


@attrs.define
class _Dispatcher:
    """What the relay uses of the dispatcher; ``close`` records each call."""

    config: Config = attrs.field(factory=lambda: make_config(idle_timeout=60.0))
    drain: Drain = attrs.field(factory=Drain)
    closed: list[tuple[Outcome, bool]] = attrs.field(factory=list)

    async def close(self, racer: Racer, outcome: Outcome, *, cancel: bool,
                    evidence: Any = None) -> None:
        self.closed.append((outcome, cancel))
        await trio.lowlevel.checkpoint()


def _relay(*, usage: Usage | None = None) -> tuple[Relay, _Dispatcher,
                                                    trio.MemorySendChannel[ProviderEvent]]:
    send, receive = trio.open_memory_channel[ProviderEvent](8)
    lease = Lease("r1", "p", 1, "m", "base", "0.7.0", 1.0)
    racer = Racer(lease, None, EventStream(receive, _Buffer(send)), None,
                  RacerState("p", "0.7.0", ttft_deadline=0.0), is_backup=False)
    committed = Committed(racer, (ROLE, CONTENT), usage, 1, Endpoint.CHAT, 0.0, 1)
    dispatcher = _Dispatcher()
    return Relay(dispatcher, committed), dispatcher, send  # type: ignore[arg-type]


async def test_a_winner_nobody_reads_is_closed_when_its_request_ends():
    relay, dispatcher, _ = _relay()
    assert dispatcher.closed == []
    with trio.CancelScope() as request:
        request.cancel()  # the request is over (say, the client left), the stream never read
        await relay.abandon()
    assert dispatcher.closed == [(CANCELLED, True)]


async def test_a_stream_read_to_its_end_closes_the_winner_before_the_last_batch(autojump_clock):
    relay, dispatcher, _ = _relay(usage=Usage(1, 2))
    batches = []
    async for batch in relay.batches():
        # Released before the last batch waits for a (possibly slow) reader.
        assert dispatcher.closed == [(SUCCESS, False)]
        batches.append(batch)
    await relay.abandon()  # the request ends: nothing left to close
    assert batches == [Batch((ROLE, CONTENT, End(Usage(1, 2))), last=True)]
    assert dispatcher.closed == [(SUCCESS, False)]


async def test_a_consumer_leaving_half_way_closes_the_winner_at_once():
    relay, dispatcher, _ = _relay()
    async with contextlib.aclosing(relay.batches()) as batches:
        assert await batches.__anext__() == Batch((ROLE, CONTENT))
    assert dispatcher.closed == [(CANCELLED, True)]  # at aclose, not at the request's end
    await relay.abandon()
    assert dispatcher.closed == [(CANCELLED, True)]


async def test_a_silent_winner_ends_the_stream_in_band_after_idle_timeout(autojump_clock):
    relay, dispatcher, _send = _relay()
    started = trio.current_time()
    batches = [batch async for batch in relay.batches()]
    assert trio.current_time() - started == 60.0
    assert batches[0] == Batch((ROLE, CONTENT))
    [error] = batches[1].items
    assert batches[1].last and batches[1].ending is error
    assert isinstance(error, InBandError) and \
        (error.reason, error.status) == (InBandReason.TIMEOUT, 504)
    assert dispatcher.closed == [(Outcome.failure(504), True)]


async def test_the_drain_deadline_ends_the_stream_without_a_verdict(autojump_clock):
    relay, dispatcher, _send = _relay()
    dispatcher.drain = Drain(timeout=5.0)

    async def drain_soon() -> None:
        await trio.sleep(1.0)
        dispatcher.drain.begin(trio.current_time())

    async with trio.open_nursery() as request:
        request.start_soon(drain_soon)
        batches = [batch async for batch in relay.batches()]
    [error] = batches[-1].items
    assert isinstance(error, InBandError) and error.reason is InBandReason.SHUTDOWN
    assert trio.current_time() == 6.0
    assert dispatcher.closed == [(CANCELLED, True)]


async def test_a_provider_gone_after_content_ends_the_stream_with_a_502():
    relay, dispatcher, send = _relay()
    send.close()
    batches = [batch async for batch in relay.batches()]
    [error] = batches[-1].items
    assert isinstance(error, InBandError) and \
        (error.reason, error.status) == (InBandReason.DISCONNECTED, 502)
    assert dispatcher.closed == [(Outcome.failure(502), False)]

"""After the commit: stream the winner's events to the consumer.

The relay yields the held events and the first content event, then every
further event, until the provider completes. What goes wrong now cannot be
retried (content has been delivered), so it ends the stream with one in-band
error item: a provider error, a malformed chunk, a disconnect, or
``idle_timeout`` seconds with no chunk. Every way out releases the winner's
slot with the right verdict — as soon as the provider's part is over, before
the last batch is handed to a consumer who may be slow to take it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import attrs
import trio

from coordinator import errors
from coordinator.protocol import (
    DecryptError,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceResponseChunk,
    Usage,
)
from coordinator.providers.connection import EventStream, ProviderEvent
from coordinator.registry.actor import CANCELLED, SUCCESS, Outcome

from .attempt import DISCONNECTED, TIMEOUT, Committed, Dispatcher, open_chunk, provider_message
from .chunks import ChunkError, Event, parse_chunk


@attrs.frozen
class End:
    usage: Usage


@attrs.frozen
class InBandError:
    reason: str  # provider_error | disconnected | timeout
    message: str
    status: int


RelayItem = Event | End | InBandError


@attrs.frozen
class _Ending:
    outcome: Outcome
    cancel_provider: bool


_CONSUMER_LEFT = _Ending(CANCELLED, cancel_provider=True)
_MAX_BATCH = 64


async def relay(
    dispatcher: Dispatcher, committed: Committed
) -> AsyncGenerator[list[RelayItem], None]:
    """Yield the winner's output in batches; release its slot however the stream ends.

    Events the provider has already delivered are taken together, so a fast
    provider's burst becomes one write to the consumer instead of one each.
    """
    racer = committed.racer
    ending = _CONSUMER_LEFT
    try:
        if committed.complete is not None:
            ending = _Ending(SUCCESS, cancel_provider=False)
            await _finish(dispatcher, committed, ending)
            yield [*committed.chunks, End(committed.complete.usage)]
            return
        if committed.chunks:
            yield list(committed.chunks)
        drain = dispatcher.drain
        while True:
            idle_deadline = trio.current_time() + dispatcher.config.idle_timeout
            with drain.bounded(idle_deadline) as wait:
                event = await _next_event(racer.events)
            if wait.cancelled_caught:
                if drain.cut_off(trio.current_time()):
                    ending = _CONSUMER_LEFT  # no verdict on the provider: we are leaving
                    error = InBandError("shutdown", "the coordinator is shutting down", 503)
                else:
                    ending = _Ending(Outcome.failure(TIMEOUT), cancel_provider=True)
                    error = InBandError("timeout", "no output from the provider for "
                                        f"{dispatcher.config.idle_timeout:g}s", TIMEOUT)
                await _finish(dispatcher, committed, ending)
                yield [error]
                return
            batch: list[RelayItem] = []
            for ready in _with_buffered(event, racer.events):
                items, end = _translate(committed, ready)
                batch.extend(items)
                if end is not None:
                    ending = end
                    await _finish(dispatcher, committed, ending)
                    yield batch
                    return
            yield batch
    finally:
        await dispatcher.close_winner(committed, ending.outcome, cancel=ending.cancel_provider)


async def _finish(dispatcher: Dispatcher, committed: Committed, ending: _Ending) -> None:
    """The provider's part is over: release its slot now, not when the consumer has read."""
    await dispatcher.close_winner(committed, ending.outcome, cancel=ending.cancel_provider)


def _with_buffered(first: ProviderEvent | None, events: EventStream) -> list[ProviderEvent | None]:
    batch = [first]
    while first is not None and len(batch) < _MAX_BATCH:
        try:
            batch.append(events.receive_nowait())
        except trio.WouldBlock:
            break
        except (trio.EndOfChannel, trio.ClosedResourceError):
            batch.append(None)
            break
    return batch


def _translate(
    committed: Committed, event: ProviderEvent | None
) -> tuple[tuple[RelayItem, ...], _Ending | None]:
    """One provider event after the commit: the items for the consumer, and the end if it is one."""
    racer = committed.racer
    match event:
        case InferenceResponseChunk():
            try:
                chunk = parse_chunk(committed.endpoint, open_chunk(racer, event))
            except (DecryptError, ChunkError) as exc:
                return ((InBandError("provider_error", f"bad response chunk: {exc}",
                                     DISCONNECTED),),
                        _Ending(Outcome.failure(DISCONNECTED), cancel_provider=True))
            return chunk.events, None
        case InferenceComplete():
            return (End(event.usage),), _Ending(SUCCESS, cancel_provider=False)
        case InferenceError():
            return ((InBandError("provider_error", provider_message(event.error),
                                 event.status_code),),
                    _Ending(Outcome.failure(event.status_code), cancel_provider=False))
        case InferenceAccepted():
            return (), None
        case None:
            reason = racer.connection.end_reason(racer.lease.request_id)
            return ((InBandError("disconnected", reason, DISCONNECTED),),
                    _Ending(Outcome.failure(DISCONNECTED), cancel_provider=False))


async def _next_event(events: EventStream) -> ProviderEvent | None:
    try:
        return await events.receive()
    except (trio.EndOfChannel, trio.ClosedResourceError):
        return None


async def collect(dispatcher: Dispatcher, committed: Committed) -> tuple[list[Event], Usage]:
    """Non-streaming: the winner's whole output, or an ApiError if it fails mid-way."""
    chunks: list[Event] = []
    items = relay(dispatcher, committed)
    try:
        async for batch in items:
            for item in batch:
                match item:
                    case dict():
                        chunks.append(item)
                    case End(usage):
                        return chunks, usage
                    case InBandError("shutdown", message):
                        raise errors.shutting_down()
                    case InBandError(reason, message):
                        dispatcher.metrics.inband_errors.labels(reason).inc()
                        code = "timeout" if reason == "timeout" else "provider_error"
                        raise errors.ApiError(
                            504 if reason == "timeout" else 502,
                            f"provider failed after it began answering: {message}",
                            "provider_error", code)
    finally:
        await items.aclose()
    raise errors.ApiError(502, "provider stream ended without completing", "provider_error")

"""After the commit: the winner's owner, streaming its events to the consumer.

:func:`relay` runs as its own task in the request's nursery from the moment
of the commit, and is the one place the winner is closed. It forwards the
held events and the first content, then every further event, in batches on a
bounded channel the consumer side reads. What goes wrong now cannot be retried
(content has been delivered), so it ends the stream with one in-band error
item: a provider error, a malformed chunk, a disconnect, ``idle_timeout``
seconds of silence, or the end of a drain. The winner is released as soon as
the provider's part is over — before the last batch waits for a slow reader —
with the verdict the ending carries.
"""

from __future__ import annotations

import contextlib

import attrs
import trio

from coordinator.protocol import Usage
from coordinator.providers.connection import ProviderEvent
from coordinator.registry.table import CANCELLED, SUCCESS, Outcome

from .attempt import Dispatcher
from .items import Batch, End, InBandError, RelayItem
from .race import DISCONNECTED, TIMEOUT, Broken, Completed, Errored, Events
from .request import Committed


@attrs.frozen
class _Ending:
    outcome: Outcome
    cancel_provider: bool
    usage: Usage | None = None  # for a completion: what the provider's speed was


_CONSUMER_LEFT = _Ending(CANCELLED, cancel_provider=True)


def _completed(usage: Usage) -> _Ending:
    return _Ending(SUCCESS, cancel_provider=False, usage=usage)
_MAX_BATCH = 64


async def relay(dispatcher: Dispatcher, committed: Committed,
                send: trio.MemorySendChannel[Batch]) -> None:
    """Own the winner: stream its output into ``send``, then release it, exactly once."""
    ending: _Ending = _CONSUMER_LEFT
    last: Batch = []
    async with send:
        try:
            ending, last = await _pump(dispatcher, committed, send)
        finally:
            evidence = ending.usage and committed.observed(trio.current_time(), ending.usage)
            await dispatcher.close(committed.racer, ending.outcome, cancel=ending.cancel_provider,
                                   evidence=evidence or None)
        with contextlib.suppress(trio.BrokenResourceError):
            await send.send(last)


async def _pump(dispatcher: Dispatcher, committed: Committed,
                send: trio.MemorySendChannel[Batch]) -> tuple[_Ending, Batch]:
    """Forward batches until the provider's part ends; return the ending and the last batch."""
    if committed.usage is not None:
        return _completed(committed.usage), [*committed.events, End(committed.usage)]
    events = committed.racer.events
    try:
        if committed.events:
            await _hand_over(send, list(committed.events))
        while True:
            event: ProviderEvent | None = None
            with trio.move_on_after(dispatcher.config.idle_timeout) as idle, \
                    dispatcher.drain.bounded() as cut:
                event = await events.next()
            if idle.cancelled_caught or cut.cancelled_caught:
                return _silence(dispatcher, idle.cancelled_caught)
            batch: Batch = []
            for ready in events.ready(event, _MAX_BATCH):
                items, end = _translate(committed, ready)
                batch.extend(items)
                if end is not None:
                    return end, batch
            await _hand_over(send, batch)
    except trio.BrokenResourceError:  # the consumer side stopped reading
        return _CONSUMER_LEFT, []


async def _hand_over(send: trio.MemorySendChannel[Batch], batch: Batch) -> None:
    # The channel is a rendezvous. When the writer is already waiting, hand the
    # batch over without a trip through the scheduler (``send`` would take one even
    # then); the loop still checkpoints on every ``events.next()``.
    try:
        send.send_nowait(batch)
    except trio.WouldBlock:
        await send.send(batch)


def _silence(dispatcher: Dispatcher, idle: bool) -> tuple[_Ending, Batch]:
    if not idle:  # the drain's deadline: no verdict on the provider, we are leaving
        return _CONSUMER_LEFT, [InBandError("shutdown", "the coordinator is shutting down", 503)]
    return (_Ending(Outcome.failure(TIMEOUT), cancel_provider=True),
            [InBandError("timeout", "no output from the provider for "
                         f"{dispatcher.config.idle_timeout:g}s", TIMEOUT)])


def _translate(
    committed: Committed, event: ProviderEvent | None
) -> tuple[tuple[RelayItem, ...], _Ending | None]:
    """One provider event after the commit: items for the consumer, and the end if it is one."""
    racer = committed.racer
    if event is None:
        return ((InBandError("disconnected", racer.end_reason(), DISCONNECTED),),
                _Ending(Outcome.failure(DISCONNECTED), cancel_provider=False))
    match racer.observe(event, committed.endpoint):
        case Events(_, chunk_events):
            return chunk_events, None
        case Completed(usage):
            return (End(usage),), _completed(usage)
        case Errored(status, message):
            return ((InBandError("provider_error", message, status),),
                    _Ending(Outcome.failure(status), cancel_provider=False))
        case Broken(message):
            return ((InBandError("provider_error", message, DISCONNECTED),),
                    _Ending(Outcome.failure(DISCONNECTED), cancel_provider=True))
        case _:
            return (), None  # a late inference_accepted


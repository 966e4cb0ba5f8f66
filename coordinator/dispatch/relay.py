"""After the commit: the winner's owner, streaming its events to the consumer.

A :class:`Relay` is made at the commit and owns the winner from then on; it is
the one place the winner is closed, exactly once. Its :meth:`~Relay.batches`
is what the consumer side (the SSE writer, or the assembly of a whole answer)
iterates: the held events and the first content, then every further event, in
batches of what the provider has delivered by then — while a write to the
consumer is in progress the provider's events pile up, so the next batch grows.
The consumer's own task reads the provider's stream: there is no task and no
hand-off between them.

What goes wrong now cannot be retried (content has been delivered), so it ends
the stream with one in-band error item: a provider error, a malformed chunk, a
disconnect, ``idle_timeout`` seconds of silence, or the end of a drain. The
winner is released as soon as the provider's part is over — before the last
batch waits for a slow reader — with the verdict the ending carries.

The consumer side may also never read, or stop half-way (a client gone between
the headers and the body, a write timeout): the request owns its relay from the
commit, and :meth:`~Relay.abandon` closes the winner when the request ends if
the stream has not.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import attrs
import trio

from coordinator.providers.connection import EventStream, ProviderEvent

from .attempt import Dispatcher
from .items import Batch, End, RelayItem
from .race import CONSUMER_LEFT, Closing, after_commit, completed, silence
from .request import Committed

_MAX_BATCH = 64


@attrs.define(eq=False)
class Relay:
    """The committed winner, owned by its request until closed."""

    dispatcher: Dispatcher
    committed: Committed
    _closed: bool = False

    async def abandon(self) -> None:
        """The request is over: close the winner unless :meth:`batches` has (cancel sent)."""
        await self._close(CONSUMER_LEFT)

    async def batches(self) -> AsyncGenerator[Batch, None]:
        """The winner's output, in batches; the last (``Batch.last``) ends with the stream's
        ending: an End or one in-band error. The one place that knows the stream ended.

        Iterate it inside ``contextlib.aclosing``: leaving early closes the winner
        at once (the consumer left), not when the garbage collector gets to it.
        """
        committed = self.committed
        ending: Closing = CONSUMER_LEFT
        last: list[RelayItem] = []
        try:
            if committed.usage is not None:  # it completed before any content
                ending, last = completed(committed.usage), [*committed.events,
                                                            End(committed.usage)]
            else:
                if committed.events:
                    yield Batch(committed.events)
                while True:
                    batch, end = await self._next_batch(committed.racer.events)
                    if end is not None:
                        ending, last = end, batch
                        break
                    yield Batch(tuple(batch))
        finally:
            await self._close(ending)
        yield Batch(tuple(last), last=True)

    async def _next_batch(self, events: EventStream) -> tuple[list[RelayItem], Closing | None]:
        """Wait for the provider's next event; return it with every one already delivered."""
        event: ProviderEvent | None = None
        with trio.move_on_after(self.dispatcher.config.idle_timeout) as idle, \
                self.dispatcher.drain.bounded() as cut:
            event = await events.next()
        if idle.cancelled_caught or cut.cancelled_caught:
            item, closing = silence(idle.cancelled_caught, self.dispatcher.config.idle_timeout)
            return [item], closing
        if event is not None:
            # One pass through the scheduler lets frames already on their way join
            # this batch: a write to the consumer costs far more than the pass.
            await trio.lowlevel.checkpoint()
        batch: list[RelayItem] = []
        for ready in events.ready(event, _MAX_BATCH):
            items, end = _translate(self.committed, ready)
            batch.extend(items)
            if end is not None:
                return batch, end
        return batch, None

    async def _close(self, ending: Closing) -> None:
        """Release the winner with the ending's verdict; only the first call does anything."""
        if self._closed:
            return
        self._closed = True
        committed = self.committed
        evidence = ending.usage and committed.observed(trio.current_time(), ending.usage)
        await self.dispatcher.close(committed.racer, ending.outcome,
                                    cancel=ending.cancel_provider, evidence=evidence or None)


def _translate(committed: Committed, event: ProviderEvent | None
               ) -> tuple[tuple[RelayItem, ...], Closing | None]:
    """One provider event after the commit: items for the consumer, and the end if it is one."""
    racer = committed.racer
    observation = None if event is None else racer.observe(event, committed.endpoint,
                                                           committed=True)
    return after_commit(observation, racer.end_reason)

"""After the commit: stream the winner's chunks to the consumer.

The relay yields the held chunks and the first content chunk, then every
further chunk, until the provider completes. What goes wrong now cannot be
retried (content has been delivered), so it ends the stream with one in-band
error item: a provider error, a disconnect, or ``idle_timeout`` seconds with
no chunk. Every way out releases the winner's slot with the right verdict.
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
from coordinator.providers.connection import ProviderEvent
from coordinator.registry.actor import CANCELLED, SUCCESS, Outcome

from .attempt import DISCONNECTED, TIMEOUT, Committed, Dispatcher, open_chunk
from .chunks import ChunkKind, classify


@attrs.frozen
class End:
    usage: Usage


@attrs.frozen
class InBandError:
    reason: str  # provider_error | disconnected | timeout
    message: str
    status: int


RelayItem = str | End | InBandError


async def relay(dispatcher: Dispatcher, committed: Committed) -> AsyncGenerator[RelayItem, None]:
    """Yield the winner's output; release its slot however the stream ends."""
    racer = committed.racer
    outcome: Outcome = CANCELLED
    cancel_provider = True
    try:
        for chunk in committed.chunks:
            yield chunk
        if committed.complete is not None:
            outcome, cancel_provider = SUCCESS, False
            yield End(committed.complete.usage)
            return
        while True:
            with trio.move_on_after(dispatcher.config.idle_timeout) as idle:
                event = await _next_event(racer.events)
            if idle.cancelled_caught:
                outcome = Outcome.failure(TIMEOUT)
                yield InBandError("timeout", f"no output from the provider for "
                                  f"{dispatcher.config.idle_timeout:g}s", TIMEOUT)
                return
            match event:
                case InferenceResponseChunk():
                    try:
                        text = open_chunk(racer, event)
                    except DecryptError as exc:
                        outcome = Outcome.failure(DISCONNECTED)
                        yield InBandError("provider_error", f"bad response chunk: {exc}",
                                          DISCONNECTED)
                        return
                    if classify(committed.endpoint, text) is not ChunkKind.TERMINAL:
                        yield text
                case InferenceComplete():
                    outcome, cancel_provider = SUCCESS, False
                    yield End(event.usage)
                    return
                case InferenceError():
                    outcome, cancel_provider = Outcome.failure(event.status_code), False
                    yield InBandError("provider_error", event.error or "provider error",
                                      event.status_code)
                    return
                case InferenceAccepted():
                    continue
                case None:
                    reason = racer.connection.end_reason(racer.lease.request_id)
                    outcome = Outcome.failure(DISCONNECTED)
                    yield InBandError("disconnected", reason, DISCONNECTED)
                    return
    finally:
        await dispatcher.close_winner(committed, outcome, cancel=cancel_provider)


async def _next_event(events: trio.MemoryReceiveChannel[ProviderEvent]) -> ProviderEvent | None:
    try:
        return await events.receive()
    except (trio.EndOfChannel, trio.ClosedResourceError):
        return None


async def collect(dispatcher: Dispatcher, committed: Committed) -> tuple[list[str], Usage]:
    """Non-streaming: the winner's whole output, or an ApiError if it fails mid-way."""
    chunks: list[str] = []
    items = relay(dispatcher, committed)
    try:
        async for item in items:
            match item:
                case str():
                    chunks.append(item)
                case End(usage):
                    return chunks, usage
                case InBandError(reason, message):
                    dispatcher.metrics.inband_errors.labels(reason).inc()
                    code = "timeout" if reason == "timeout" else "provider_error"
                    raise errors.ApiError(504 if reason == "timeout" else 502,
                                          f"provider failed after it began answering: {message}",
                                          "provider_error", code)
    finally:
        await items.aclose()
    raise errors.ApiError(502, "provider stream ended without completing", "provider_error")

"""What the dispatcher's answers become at the HTTP edge."""

from __future__ import annotations

import contextlib

from coordinator import errors
from coordinator.dispatch.chunks import Event
from coordinator.dispatch.items import End, InBandError
from coordinator.dispatch.relay import Relay
from coordinator.metrics import Metrics
from coordinator.protocol import Usage
from coordinator.registry.state import Refusal, Refused


def refusal_error(refused: Refused) -> errors.ApiError:
    """A registry refusal, as the status and error body a consumer gets."""
    match refused.kind:
        case Refusal.UNKNOWN_MODEL:
            return errors.not_found(refused.detail)
        case Refusal.TOO_LARGE:
            return errors.ApiError(413, refused.detail, "invalid_request_error",
                                   "request_too_large")
        case Refusal.QUEUE_FULL | Refusal.QUEUE_TIMEOUT:
            return errors.overloaded(refused.detail)
        case Refusal.UNSERVABLE | Refusal.EXHAUSTED:
            return errors.unavailable(refused.detail)


async def collect(relay: Relay, metrics: Metrics) -> tuple[list[Event], Usage]:
    """Non-streaming: the winner's whole output, or an ApiError if it fails mid-way."""
    events: list[Event] = []
    async with contextlib.aclosing(relay.batches()) as batches:
        async for batch in batches:
            for item in batch:
                match item:
                    case End(usage):
                        return events, usage
                    case InBandError("shutdown", _):
                        raise errors.shutting_down()
                    case InBandError(reason, message):
                        metrics.inband_errors.labels(reason).inc()
                        timeout = reason == "timeout"
                        raise errors.ApiError(
                            504 if timeout else 502,
                            f"provider failed after it began answering: {message}",
                            "provider_error", "timeout" if timeout else "provider_error")
                    case _:
                        events.append(item)
    raise errors.ApiError(502, "provider stream ended without completing", "provider_error")

"""What the dispatcher's answers become at the HTTP edge."""

from __future__ import annotations

import contextlib
import math

import orjson

from coordinator import errors
from coordinator.accounts import limits
from coordinator.accounts import service as accounts
from coordinator.dispatch import race
from coordinator.dispatch.chunks import Event
from coordinator.dispatch.items import End, InBandError, InBandReason
from coordinator.dispatch.relay import Relay
from coordinator.dispatch.request import DispatchFailed, FailureKind
from coordinator.metrics import Metrics
from coordinator.protocol import Usage
from coordinator.registry.state import Refusal, Refused


def admission_error(refused: accounts.Refused) -> errors.ApiError:
    """A request its key may not send (now, or at all), as the consumer's answer."""
    if refused.unavailable:
        return errors.ApiError(503, refused.message, "server_error", "accounts_unavailable",
                               retry_after=5)
    if refused.model_not_allowed:
        return errors.ApiError(403, refused.message, "permission_error", "model_not_allowed",
                               param="model")
    throttled = refused.throttled
    assert throttled is not None
    match throttled.refusal:
        case limits.Refusal.TOO_BIG:
            return errors.ApiError(400, refused.message, "invalid_request_error",
                                   "request_exceeds_limit", param="max_tokens",
                                   headers=throttled.headers)
        case limits.Refusal.BUDGET_GONE:
            return errors.ApiError(403, refused.message, "permission_error",
                                   "insufficient_quota", headers=throttled.headers)
        case limits.Refusal.BUDGET:
            code = "insufficient_quota"
        case _:
            code = "rate_limit_exceeded"
    retry = None if throttled.retry_after is None else max(1, math.ceil(throttled.retry_after))
    return errors.ApiError(429, refused.message, "rate_limit_error", code, retry_after=retry,
                           headers=throttled.headers)


def dispatch_error(failed: DispatchFailed) -> errors.ApiError:
    """A request no provider answered, as the status and error body a consumer gets."""
    match failed.kind:
        case FailureKind.REFUSED:
            assert failed.refused is not None
            return refusal_error(failed.refused)
        case FailureKind.SHUTDOWN:
            return errors.shutting_down()
        case FailureKind.REJECTED:
            rejected = race.rejected(list(failed.failures))
            assert rejected is not None
            return errors.rejected_by_provider(rejected.status, rejected.message)
    if not failed.failures:
        return errors.unavailable("no provider could serve this request")
    tried = len({f.provider_id for f in failed.failures})
    message = f"all {tried} provider(s) tried failed; last error: {failed.failures[-1].message}"
    match failed.kind:
        case FailureKind.TIMEOUT:
            return errors.ApiError(504, message, "provider_error", "timeout")
        case FailureKind.CAPACITY:
            return errors.ApiError(429, message, "rate_limit_error", "capacity", retry_after=5)
    return errors.ApiError(503, message, "provider_error", "provider_error", retry_after=5)


def refusal_error(refused: Refused) -> errors.ApiError:
    """A registry refusal, as the status and error body a consumer gets."""
    match refused.kind:
        case Refusal.UNKNOWN_MODEL:
            return errors.not_found(refused.detail)
        case Refusal.INCAPABLE:
            # Permanent: a 503 would have clients retry what cannot succeed.
            return errors.bad_request(refused.detail, "unsupported_capability")
        case Refusal.TOO_LARGE:
            return errors.ApiError(413, refused.detail, "invalid_request_error",
                                   "request_too_large")
        case Refusal.QUEUE_FULL | Refusal.QUEUE_TIMEOUT:
            return errors.overloaded(refused.detail)
        case Refusal.UNSERVABLE | Refusal.EXHAUSTED | Refusal.OFFLINE:
            return errors.unavailable(refused.detail)


async def collect(relay: Relay, metrics: Metrics,
                  max_bytes: int) -> tuple[list[Event], Usage]:
    """Non-streaming: the winner's whole output, or an ApiError if it fails mid-way.

    The output is held until it completes, so it is bounded: past ``max_bytes`` of
    events (their JSON) the request fails with 502 and the provider is told to stop.
    """
    events: list[Event] = []
    held = 0
    async with contextlib.aclosing(relay.batches()) as batches:
        async for batch in batches:
            for item in batch.items:
                match item:
                    case End(usage):
                        return events, usage
                    case InBandError(InBandReason.SHUTDOWN, _):
                        raise errors.shutting_down()
                    case InBandError(reason, message):
                        metrics.inband_errors.labels(reason.value).inc()
                        timeout = reason is InBandReason.TIMEOUT
                        raise errors.ApiError(
                            504 if timeout else 502,
                            f"provider failed after it began answering: {message}",
                            "provider_error", "timeout" if timeout else "provider_error")
                    case _:
                        held += len(orjson.dumps(item))
                        if held > max_bytes:
                            metrics.inband_errors.labels("response_too_large").inc()
                            raise errors.ApiError(
                                502, f"the provider's answer exceeds {max_bytes} bytes, the "
                                "most a non-streaming answer may hold (max_response_bytes); "
                                "ask for it with stream: true", "provider_error",
                                "response_too_large")
                        events.append(item)
    raise errors.ApiError(502, "provider stream ended without completing", "provider_error")

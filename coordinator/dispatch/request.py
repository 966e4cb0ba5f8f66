"""The values the engine works with: a request, a racer, a winner, a failure."""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs

from coordinator.protocol import RequestCipher, Usage
from coordinator.protocol.endpoints import Endpoint
from coordinator.providers.connection import EventStream, ProviderConnection, ProviderEvent
from coordinator.registry.state import Refused
from coordinator.registry.table import Job, Lease, Observed

from .chunks import Event
from .observe import observe
from .race import Failure, Observation, RacerState, observed
from .timing import Timing


class FailureKind(enum.Enum):
    """Why no provider's answer reached the consumer (the API edge picks the status)."""

    REFUSED = "refused"  # the registry refused before an attempt: ``refused`` says why
    REJECTED = "rejected"  # a provider said the request itself is wrong: no one else tried
    TIMEOUT = "timeout"  # every attempt failed; the last by its budget running out
    CAPACITY = "capacity"  # … the last because its provider was full (429, 503)
    FAILED = "failed"  # … the last with an error or a disconnect
    SHUTDOWN = "shutdown"  # the coordinator began to drain while the request waited


class DispatchFailed(Exception):
    """The request could not be dispatched; ``kind`` says why, ``failures`` what was tried."""

    def __init__(self, kind: FailureKind, failures: tuple[Failure, ...] = (),
                 refused: Refused | None = None) -> None:
        super().__init__(refused.detail if refused is not None else kind.value)
        self.kind = kind
        self.failures = failures
        self.refused = refused


@attrs.define(eq=False)
class RequestContext:
    """One consumer request as the dispatcher sees it."""

    job: Job
    endpoint: Endpoint
    plaintext: bytes  # what the provider decrypts (protocol.endpoints.inner_request)
    stream: bool
    timing: Timing
    # Filled as the request walks, for logs and headers.
    attempts: int = 0
    providers_tried: list[str] = attrs.field(factory=list)


@attrs.define(eq=False)
class Racer:
    """One provider working on one request within one attempt."""

    lease: Lease
    connection: ProviderConnection | None  # None: the session went before the racer began
    events: EventStream
    cipher: RequestCipher | None
    state: RacerState
    is_backup: bool

    def observe(self, event: ProviderEvent, endpoint: Endpoint, *,
                committed: bool = False) -> Observation:
        assert self.cipher is not None and self.connection is not None
        return observe(event, endpoint, self.cipher, self.connection.encrypted_chunks,
                       classify=not committed)

    def end_reason(self) -> str:
        """Why the provider's stream ended without a terminal frame."""
        if self.connection is None:
            return "provider disconnected"
        return self.connection.end_reason(self.lease.request_id)


@attrs.frozen
class Committed:
    """The winner of an attempt, as the relay takes it over."""

    racer: Racer
    events: tuple[Event, ...]  # held boilerplate, then the first content
    usage: Usage | None  # set when the provider completed before any content
    attempts: int
    endpoint: Endpoint
    committed_at: float
    prompt_tokens: int

    def observed(self, ended_at: float, usage: Usage) -> Observed:
        """What this winner showed of its provider's speed, once it completed."""
        return observed(self.racer.state.sent_at, self.committed_at, ended_at, usage,
                        self.prompt_tokens)


# Called once, synchronously, at the commit: from then on the winner belongs to
# the request (the API makes its Relay and gives it to the request's Exchange,
# which releases it if the response did not).
Handover = Callable[[Committed], None]

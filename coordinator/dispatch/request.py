"""The values the engine works with: a request, a racer, a winner, a refusal."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from coordinator.protocol import RequestCipher, Usage
from coordinator.protocol.endpoints import Endpoint
from coordinator.providers.connection import EventStream, ProviderConnection, ProviderEvent
from coordinator.registry.state import Refused
from coordinator.registry.table import Job, Lease, Observed

from .chunks import Event
from .observe import observe
from .race import Observation, RacerState, observed
from .timing import Timing


class NotDispatched(Exception):
    """The registry refused the request before any attempt (the API maps the kind)."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.detail)
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
# the request (the API makes its Relay and keeps it with the request, where
# EdgeGuard releases it if the response did not).
Handover = Callable[[Committed], None]

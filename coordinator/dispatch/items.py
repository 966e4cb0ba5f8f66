"""What the relay hands the consumer side: batches of events, the last with the ending."""

from __future__ import annotations

import enum

import attrs

from coordinator.protocol import Usage

from .chunks import Event


@attrs.frozen
class End:
    usage: Usage


class InBandReason(enum.Enum):
    """Why a stream that had begun ended with an error (its ``code`` in the error event)."""

    PROVIDER_ERROR = "provider_error"
    DISCONNECTED = "disconnected"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"


@attrs.frozen
class InBandError:
    reason: InBandReason
    message: str
    status: int


RelayItem = Event | End | InBandError
Ending = End | InBandError


@attrs.frozen
class Batch:
    """What the provider had delivered by the time the consumer side asked; the relay's
    last batch ends with the stream's :data:`Ending` (and ``last`` says so)."""

    items: tuple[RelayItem, ...]
    last: bool = False

    @property
    def ending(self) -> Ending | None:
        end = self.items[-1] if self.last and self.items else None
        return end if isinstance(end, End | InBandError) else None

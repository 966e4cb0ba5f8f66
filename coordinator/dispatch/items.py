"""What the relay hands the consumer side: events, then an end or one in-band error."""

from __future__ import annotations

import attrs

from coordinator.protocol import Usage

from .chunks import Event


@attrs.frozen
class End:
    usage: Usage


@attrs.frozen
class InBandError:
    reason: str  # provider_error | disconnected | timeout | shutdown
    message: str
    status: int


RelayItem = Event | End | InBandError
Batch = list[RelayItem]

"""Frames on the links between instances (coordinator/cluster/peer.py), strictly typed.

The same codec and strict converter as the provider protocol: a peer holds the
cluster token, but is still a peer, not an authority over this process. Every
string is bounded, every number checked, and nothing is ever rendered whole
(a lease nested a thousand lists deep once ended a link with RecursionError).

A → B: ``hello`` first, then ``relay`` (a lease and the sealed ``inference_request``
frame) and ``cancel``. B → A: ``relayed`` (the provider's own frame, as it sent it)
and ``refused`` (B would not hold a slot for the lease).
"""

from __future__ import annotations

import math
from typing import Any, Final

import attrs

from coordinator.protocol.messages import Codec, register_wire_types

MAX_ID = 256  # request, provider and instance ids; models and shapes
MAX_TOKEN = 4096
MAX_REASON = 300


def _bounded(limit: int) -> Any:
    def check(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
        if len(value) > limit:
            raise ValueError(f"{attribute.name} is longer than {limit} characters")
    return check


def _session(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value < 2**63:
        raise ValueError(f"{attribute.name} is out of range")


def _cost(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1e9):
        raise ValueError(f"{attribute.name} is not a finite cost")



@attrs.frozen
class PeerHello:
    TYPE = "hello"
    instance: str = attrs.field(validator=_bounded(MAX_ID))
    token: str = attrs.field(validator=_bounded(MAX_TOKEN))


@attrs.frozen
class RelayLease:
    """The slot A asks B to hold: the lease A's registry granted on B's provider."""

    request_id: str = attrs.field(validator=_bounded(MAX_ID))
    provider_id: str = attrs.field(validator=_bounded(MAX_ID))
    session: int = attrs.field(validator=_session)
    model: str = attrs.field(validator=_bounded(MAX_ID))
    shape: str = attrs.field(validator=_bounded(MAX_ID))
    version: str = attrs.field(validator=_bounded(MAX_ID))
    cost: float = attrs.field(default=0.0, validator=_cost)


@attrs.frozen
class Relay:
    TYPE = "relay"
    lease: RelayLease
    frame: str  # the sealed inference_request, as the provider will get it


@attrs.frozen
class RelayCancel:
    TYPE = "cancel"
    provider_id: str = attrs.field(validator=_bounded(MAX_ID))
    session: int = attrs.field(validator=_session)
    request_id: str = attrs.field(validator=_bounded(MAX_ID))


@attrs.frozen
class Relayed:
    TYPE = "relayed"
    provider_id: str = attrs.field(validator=_bounded(MAX_ID))
    frame: str  # the provider's frame (re-encoded by B after B's own strict decode)


@attrs.frozen
class RelayRefused:
    TYPE = "refused"
    provider_id: str = attrs.field(validator=_bounded(MAX_ID))
    request_id: str = attrs.field(validator=_bounded(MAX_ID))
    reason: str = attrs.field(validator=_bounded(MAX_REASON))


PeerMessage = PeerHello | Relay | RelayCancel | Relayed | RelayRefused

register_wire_types(RelayLease, PeerHello, Relay, RelayCancel, Relayed, RelayRefused)
_PEER_FRAMES: Final = Codec(PeerHello, Relay, RelayCancel, Relayed, RelayRefused)


def encode_peer_frame(message: PeerMessage) -> str:
    return _PEER_FRAMES.encode(message)


def decode_peer_frame(frame: str | bytes, *, max_bytes: int) -> PeerMessage:
    """Parse one link frame; raise :class:`~coordinator.protocol.FrameError` on anything off."""
    message: PeerMessage = _PEER_FRAMES.decode(frame, max_bytes=max_bytes)
    return message

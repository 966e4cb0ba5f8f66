"""The registry's records: providers, the jobs routed to them and the leases held.

Plain attrs classes; only the registry actor mutates them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from coordinator.protocol import ModelInfo
from coordinator.registry.traits import Traits
from coordinator.registry.versions import Version

if TYPE_CHECKING:
    from coordinator.providers.connection import ProviderConnection


@attrs.frozen
class Job:
    """What routing needs to know about one consumer request."""

    request_id: str
    model: str
    traits: Traits = attrs.field(factory=Traits)
    prompt_tokens: int = 1
    max_tokens: int = 256
    # The inference_request frame's size (an upper bound), for providers' limits.
    request_bytes: int = 0
    # Optional allowlist of provider ids from the request; None = any.
    allowlist: frozenset[str] | None = None


@attrs.define(eq=False)
class Lease:
    """One slot on one provider, held by one racer of one request."""

    request_id: str
    provider_id: str
    session: int
    model: str
    shape: str
    version: str
    cost: float
    connection: ProviderConnection | Any
    released: bool = False
    queued: float = 0.0  # seconds spent in the queue before the grant


@attrs.define(eq=False)
class ProviderRecord:
    provider_id: str
    session: int
    version_text: str
    version: Version | None
    models: dict[str, ModelInfo]
    memory_gb: float = 0.0
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    max_slots: int = 8
    connection: ProviderConnection | Any = None
    hardware: str = ""
    signing_key: str = ""
    max_request_bytes: int = 1024 * 1024
    leases: dict[str, Lease] = attrs.field(factory=dict)
    served: int = 0

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self.leases)

    @property
    def queued_seconds(self) -> float:
        return sum(lease.cost for lease in self.leases.values())

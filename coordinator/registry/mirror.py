"""What instances tell each other about their providers (docs/scale-out.md). Pure.

Out: the events this instance shares (:data:`SharedEvent`), which the facade
returns with each mutation for the actor to hand to the cluster seam. In: the
rules by which another instance's directory page, freed slots and slot
reservations change this instance's :class:`~coordinator.registry.fleet.Fleet`.
Each rule returns the models whose waiters it may have made answerable.
"""

from __future__ import annotations

import attrs

from coordinator.registry.fleet import Fleet
from coordinator.registry.table import Lease, ProviderRecord


@attrs.frozen
class Struck:
    """A strike-shaped verdict, for the shared breaker."""

    key: tuple[str, str, str]
    status: int


@attrs.frozen
class Cleared:
    """A success on a key with strikes or a cooldown: clear it everywhere."""

    key: tuple[str, str, str]


@attrs.frozen
class Freed:
    """One of this instance's providers went from full to having a free slot."""

    provider_id: str
    in_use: int


@attrs.frozen
class Renewed:
    """A provider registered a new session here: its cooldowns go, everywhere."""

    provider_id: str


SharedEvent = Struck | Cleared | Freed | Renewed


def replace_page(fleet: Fleet, instance: str, records: list[ProviderRecord],
                 now: float) -> set[str]:
    """Replace the providers ``instance`` publishes with these, as remote records."""
    touched: set[str] = set()
    mine = {r.provider_id for r in fleet.of_instance(instance)}
    for record in records:
        mine.discard(record.provider_id)
        old = fleet.providers.get(record.provider_id)
        if old is not None and not old.instance:
            continue  # connected here now: this instance's own session wins
        if old is not None and old.instance == instance and old.session == record.session:
            old.max_slots = record.max_slots
            old.external_in_use = max(0, record.external_in_use - len(old.leases))
            own = sum(lease.cost for lease in old.leases.values())
            old.external_seconds = max(0.0, record.external_seconds - own)
            fleet.reindex(old, now)
            touched.update(old.models)
            continue
        if old is not None:
            fleet.remove(old, now)
            touched.update(old.models)
        fleet.add(record, now)
        touched.update(record.models)
    for pid in mine:
        gone = fleet.providers[pid]
        fleet.remove(gone, now)
        touched.update(gone.models)
    return touched


def apply_freed(fleet: Fleet, provider_id: str, in_use: int, now: float) -> set[str]:
    """Another instance's provider has a free slot again."""
    record = fleet.providers.get(provider_id)
    if record is None or not record.instance:
        return set()
    record.external_in_use = max(0, in_use - len(record.leases))
    fleet.reindex(record, now)
    return set(record.models)


def reserve_for_peer(fleet: Fleet, lease: Lease, now: float) -> str | None:
    """Hold a slot on one of this instance's providers for another instance's request.

    This instance is authoritative for its providers' slots: None when the
    slot is held, else why not ("gone", "full", "duplicate") — a capacity refusal,
    no strike. A request id already holding a slot on the provider (a request of
    this instance's, or a relay on another link) is never replaced: its lease and
    its stream are keyed by that id.
    """
    record = fleet.session(lease.provider_id, lease.session)
    if record is None or record.instance:
        return "gone"
    if lease.request_id in record.leases:
        return "duplicate"
    if record.free_slots <= 0:
        return "full"
    fleet.hold(record, lease, now)
    return None

"""What an instance publishes about each of its providers, and how others read it. Pure.

An entry carries what another instance needs to route to the provider and to
seal a request to it: its id and session, models, version, speed, slots, its
X25519 public key, and the instance it is connected to. Entries are read with
the protocol's strict converter: another instance is a peer, not an authority,
and a malformed entry is skipped, never a crash.
"""

from __future__ import annotations

from typing import Any

import attrs
import cattrs

from coordinator.capabilities import parse_version
from coordinator.protocol import ModelInfo
from coordinator.protocol.messages import converter
from coordinator.registry.table import ProviderRecord


@attrs.frozen
class ProviderEntry:
    provider_id: str
    session: int
    version: str
    hardware: str
    models: tuple[ModelInfo, ...]
    memory_gb: float
    decode_tps: float
    prefill_tps: float
    max_slots: int
    in_use: int
    public_key: str
    signing_key: str
    encrypted_chunks: bool
    max_request_bytes: int
    queued_s: float = 0.0  # estimated seconds of work leased on it, all instances'


@attrs.frozen
class InstanceEntry:
    """One instance's page of the directory."""

    instance: str
    peer_url: str
    providers: tuple[ProviderEntry, ...]


def entry_of(record: ProviderRecord) -> ProviderEntry:
    return ProviderEntry(
        record.provider_id, record.session, record.version_text, record.hardware,
        tuple(record.models.values()), record.memory_gb, record.decode_tps, record.prefill_tps,
        record.max_slots, len(record.leases), record.public_key, record.signing_key,
        record.encrypted_chunks, record.max_request_bytes, record.queued_seconds)


def record_of(entry: ProviderEntry, instance: str) -> ProviderRecord:
    """The remote record another instance's entry becomes in this instance's table."""
    return ProviderRecord(
        provider_id=entry.provider_id, session=entry.session, version_text=entry.version,
        version=parse_version(entry.version), models={m.id: m for m in entry.models},
        memory_gb=entry.memory_gb, decode_tps=entry.decode_tps, prefill_tps=entry.prefill_tps,
        max_slots=entry.max_slots, hardware=entry.hardware, signing_key=entry.signing_key,
        max_request_bytes=entry.max_request_bytes, instance=instance,
        public_key=entry.public_key, encrypted_chunks=entry.encrypted_chunks,
        external_in_use=entry.in_use, external_seconds=entry.queued_s)


def dump(page: InstanceEntry) -> dict[str, Any]:
    data: dict[str, Any] = converter.unstructure(page)
    return data


def load(data: Any) -> InstanceEntry | None:
    """A page read from the shared store, or None when it is not one."""
    try:
        page: InstanceEntry = converter.structure(data, InstanceEntry)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError):
        return None
    return page

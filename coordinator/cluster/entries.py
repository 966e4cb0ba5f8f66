"""What an instance publishes about each of its providers, and how others read it. Pure.

An entry carries what another instance needs to route to the provider and to
seal a request to it: its id and session, models, version, speed, slots, its
X25519 public key, and the instance it is connected to. Entries are read with
the protocol's strict converter: another instance is a peer, not an authority,
and a malformed entry is skipped, never a crash.
"""

from __future__ import annotations

import re
from typing import Any, Final

import attrs
import cattrs

from coordinator.capabilities import parse_version
from coordinator.protocol import ModelInfo
from coordinator.protocol.messages import converter
from coordinator.providers import admission
from coordinator.registry.table import ProviderRecord

# Instance ids: printable ASCII without spaces (a host name and a pid by default).
_INSTANCE: Final = re.compile(r"[\x21-\x7e]{1,256}")


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
    """A page read from the shared store, or None when it is not one.

    Names go into headers (``X-Provider-Id``, ``X-Provider-Instance``), logs and the
    status page, so they are held to what admission asks of a provider's own register:
    a page from an instance with an unsafe name is dropped, and so is each entry of one.
    """
    try:
        page: InstanceEntry = converter.structure(data, InstanceEntry)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError):
        return None
    if not _INSTANCE.fullmatch(page.instance):
        return None
    safe = tuple(entry for entry in page.providers if _names_safe(entry))
    return page if len(safe) == len(page.providers) else attrs.evolve(page, providers=safe)


def _names_safe(entry: ProviderEntry) -> bool:
    hardware = entry.hardware
    return (len(hardware) <= admission.MAX_HARDWARE_LABEL and hardware.isprintable()
            and admission.names_problem(entry.provider_id, entry.version, entry.models,
                                        ()) is None)

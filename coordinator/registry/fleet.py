"""Who is connected and what they serve: the provider table and its indexes. Pure.

:class:`Fleet` holds every provider record, local or mirrored from another
instance, and keeps beside it what a decision must find fast: the providers of
each model, each model's providers with a free slot (:mod:`.index`), one
provider per X25519 key, and — once a model's last provider leaves — that the
model existed and what its providers could serve (:mod:`.models`). Only the
registry's facade (:mod:`.state`) calls it; ``now`` is always an argument.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import attrs

from coordinator.capabilities import Version
from coordinator.metrics import Metrics
from coordinator.registry.gates import capabilities
from coordinator.registry.index import ModelIndex, reference_key
from coordinator.registry.models import CapabilityMemory, ModelMemory
from coordinator.registry.table import Lease, ProviderRecord


class RegisterRefused(Exception):
    """A registration the registry will not accept; the message is the reason."""


@attrs.define(eq=False)
class Fleet:
    floors: Mapping[str, Version | None]
    metrics: Metrics
    offline_models: ModelMemory
    departed_capabilities: CapabilityMemory
    providers: dict[str, ProviderRecord] = attrs.field(factory=dict)
    # model -> provider id -> record: a decision looks only at the model's providers.
    by_model: dict[str, dict[str, ProviderRecord]] = attrs.field(factory=dict)
    # model -> its providers with a free slot, best first (registry/index.py).
    free: dict[str, ModelIndex] = attrs.field(factory=dict)
    # X25519 key -> the provider using it, local or on another instance: a key is
    # one provider's, or a prompt sealed for one could be read by another.
    _encryption_keys: dict[str, str] = attrs.field(factory=dict)
    _versions: Counter[str] = attrs.field(factory=Counter)

    def admissible(self, record: ProviderRecord) -> None:
        """Raise :class:`RegisterRefused` unless ``record`` may join the table."""
        old = self.providers.get(record.provider_id)
        if old is not None and old.signing_key != record.signing_key:
            # The edge binds ids to keys; this keeps the rule where the table is.
            raise RegisterRefused(f"provider id {record.provider_id} is live with another key")
        holder = self._encryption_keys.get(record.public_key)
        if record.public_key and holder not in (None, record.provider_id):
            raise RegisterRefused("public_key is registered by another provider")

    def add(self, record: ProviderRecord, now: float) -> None:
        self.providers[record.provider_id] = record
        if record.public_key:
            self._encryption_keys.setdefault(record.public_key, record.provider_id)
        for model in record.models:
            self.by_model.setdefault(model, {})[record.provider_id] = record
            self.offline_models.came_online(model)
        self.reindex(record, now)
        self._count_version(record, +1)

    def remove(self, record: ProviderRecord, now: float) -> None:
        """Take ``record`` out; a model it leaves without providers is remembered."""
        del self.providers[record.provider_id]
        if self._encryption_keys.get(record.public_key) == record.provider_id:
            del self._encryption_keys[record.public_key]
        self._count_version(record, -1)
        for model, info in record.models.items():
            self.departed_capabilities.left(model, capabilities(record, info, self.floors), now)
            serving = self.by_model.get(model, {})
            serving.pop(record.provider_id, None)
            self.free[model].discard(record.provider_id)
            if not serving:
                del self.by_model[model], self.free[model]
                self.offline_models.went_offline(model, now)

    def reindex(self, record: ProviderRecord, now: float) -> None:
        """Keep ``record`` in its models' indexes, keyed afresh, while it has a free slot."""
        for model in record.models:
            index = self.free.setdefault(model, ModelIndex())
            if record.free_slots > 0:
                index.put(record.provider_id, reference_key(record, model, now))
            else:
                index.discard(record.provider_id)

    def hold(self, record: ProviderRecord, lease: Lease, now: float) -> None:
        """A slot on ``record`` taken by ``lease``."""
        record.leases[lease.request_id] = lease
        self.reindex(record, now)

    def session(self, provider_id: str, session: int) -> ProviderRecord | None:
        """The record of that session of that provider, while it is the live one."""
        record = self.providers.get(provider_id)
        return record if record is not None and record.session == session else None

    def of_instance(self, instance: str) -> list[ProviderRecord]:
        return [r for r in self.providers.values() if r.instance == instance]

    def _count_version(self, record: ProviderRecord, change: int) -> None:
        """Keep ``coordinator_providers_online{version}`` in step, one provider at a time."""
        version = record.version_text or "unknown"
        self._versions[version] += change
        if self._versions[version]:
            self.metrics.providers_online.labels(version).set(self._versions[version])
        else:
            del self._versions[version]
            self.metrics.providers_online.remove(version)

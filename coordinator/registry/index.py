"""Per-model candidate indexes: a routing decision touches few providers, best first. Pure.

For each model, the providers serving it that have a free slot, kept in a
sorted container by their estimated time to serve a *reference job* for that
model (``REFERENCE_PROMPT`` prompt tokens, ``REFERENCE_MAX`` output tokens):
the work already leased to them plus that job at their rates. The registry
re-keys a provider whenever its leases change and drops it while it is full,
so a decision walks the index from the front, asks the one gate function
about each provider it meets, and stops after a handful of eligible ones —
at 10 providers or 10,000 alike (docs/architecture.md, "Routing decisions").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import attrs
from sortedcontainers import SortedList

from coordinator.registry import scheduler
from coordinator.registry.table import Job, ProviderRecord

REFERENCE_PROMPT: Final = 1000
REFERENCE_MAX: Final = 256


def reference_key(record: ProviderRecord, model: str, now: float | None = None) -> float:
    """The index key: estimated seconds for a typical job of ``model`` on ``record``."""
    return scheduler.estimated_seconds(
        record, Job("", model, prompt_tokens=REFERENCE_PROMPT, max_tokens=REFERENCE_MAX), now)


@attrs.define(eq=False)
class ModelIndex:
    """The free providers of one model, ordered by :func:`reference_key`."""

    _order: SortedList = attrs.field(factory=SortedList)  # (key, provider id)
    _keys: dict[str, float] = attrs.field(factory=dict)

    def put(self, provider_id: str, key: float) -> None:
        old = self._keys.get(provider_id)
        if old == key:
            return
        if old is not None:
            self._order.remove((old, provider_id))
        self._order.add((key, provider_id))
        self._keys[provider_id] = key

    def discard(self, provider_id: str) -> None:
        old = self._keys.pop(provider_id, None)
        if old is not None:
            self._order.remove((old, provider_id))

    def best_first(self) -> Iterator[tuple[float, str]]:
        return iter(self._order)

    def __contains__(self, provider_id: str) -> bool:
        return provider_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def contents(self) -> dict[str, float]:
        return dict(self._keys)

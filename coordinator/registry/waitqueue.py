"""The wait queue: requests waiting for a slot, per model, in arrival order. Pure.

It keeps the tickets and which models' waiters may have become answerable
since they were last looked at (*touched*: a slot came free, a provider came or
went, a cooldown began or ended). The facade (:mod:`.state`) decides; the
queue only remembers, so a re-check looks at the touched models' waiters and
costs nothing when no mutation touched a model anyone waits for.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import attrs

from coordinator.metrics import Metrics
from coordinator.registry.table import Job


@attrs.frozen
class AcquireRequest:
    job: Job
    exclude: frozenset[str] = frozenset()
    avoid_version: str | None = None
    ticket: object = attrs.field(factory=object)  # identifies a queued request


@attrs.define(eq=False)
class Waiter:
    request: AcquireRequest
    since: float
    order: int  # arrival order, across models


@attrs.define(eq=False)
class WaitQueue:
    capacity: int
    metrics: Metrics
    # model -> ticket -> waiter; a dict keeps arrival order and withdraws in O(1)
    _by_model: dict[str, dict[object, Waiter]] = attrs.field(factory=dict)
    _models: dict[object, str] = attrs.field(factory=dict)  # ticket -> model
    _touched: set[str] = attrs.field(factory=set)
    _arrivals: itertools.count[int] = attrs.field(factory=itertools.count)

    def add(self, request: AcquireRequest, now: float) -> bool:
        """Queue ``request``; False when the queue is full."""
        if len(self._models) >= self.capacity:
            return False
        model = request.job.model
        self._by_model.setdefault(model, {})[request.ticket] = Waiter(
            request, now, next(self._arrivals))
        self._models[request.ticket] = model
        self.metrics.queue_depth.set(len(self._models))
        return True

    def withdraw(self, ticket: object, now: float) -> str | None:
        """Take a ticket out; the model it waited for, or None when it was not queued."""
        model = self._models.pop(ticket, None)
        if model is None:
            return None
        waiting = self._by_model[model]
        waiter = waiting.pop(ticket)
        if not waiting:
            del self._by_model[model]
        self.metrics.queue_wait.observe(now - waiter.since)
        self.metrics.queue_depth.set(len(self._models))
        return model

    def touch(self, models: Iterable[str]) -> None:
        """Their waiters may be answerable now: look at them at the next re-check."""
        self._touched.update(models)

    def due(self) -> list[Waiter]:
        """The touched models' waiters, in arrival order; the marks are cleared."""
        waiters = sorted((w for m in self._touched for w in self._by_model.get(m, {}).values()),
                         key=lambda w: w.order)
        self._touched.clear()
        return waiters

    def waiters(self) -> list[Waiter]:
        """Every queued request, in arrival order."""
        return sorted((w for q in self._by_model.values() for w in q.values()),
                      key=lambda w: w.order)

    def __len__(self) -> int:
        return len(self._models)

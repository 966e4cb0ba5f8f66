"""The registry's state: one facade over its parts, every operation synchronous and clock-free.

:class:`RegistryState` is what the registry actor owns. Its parts each have one job:

* :class:`~coordinator.registry.fleet.Fleet` — the provider table, its indexes, the
  models and capabilities remembered after their providers left;
* :class:`~coordinator.registry.waitqueue.WaitQueue` — the per-model FIFO of tickets;
* :class:`~coordinator.registry.learning.Learning` — speeds, hedge timing and budget;
* :class:`~coordinator.registry.breaker.Breaker` — strikes and cooldowns;
* :class:`~coordinator.registry.routing.Router` — the decision (reads only);
* :mod:`.mirror` — what other instances publish, and the events shared with them.

Every mutation is decided here, synchronously, and returns what must be sent
(:class:`Done`): its own answer, the queued requests it made answerable — each
mutation re-checks the queue itself, so none can forget to — and the events to
share with other instances. The actor only sends them. ``now`` is always an
argument, so the state is tested directly, without an event loop.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import attrs

from coordinator.capabilities import parse_version
from coordinator.config import Config
from coordinator.metrics import Metrics
from coordinator.registry import scheduler, views
from coordinator.registry.breaker import Breaker, BreakerKey, is_strike
from coordinator.registry.fleet import Fleet
from coordinator.registry.fleet import RegisterRefused as RegisterRefused
from coordinator.registry.hedging import HedgeBudget
from coordinator.registry.index import ModelIndex
from coordinator.registry.learning import Learning
from coordinator.registry.mirror import (
    Cleared,
    Freed,
    Renewed,
    SharedEvent,
    Struck,
    apply_freed,
    replace_page,
    reserve_for_peer,
)
from coordinator.registry.models import CapabilityMemory, ModelMemory
from coordinator.registry.routing import Router
from coordinator.registry.table import (
    Census,
    Decision,
    Evidence,
    Grant,
    Job,
    Lease,
    Outcome,
    OutcomeKind,
    ProviderRecord,
    Refusal,
    Refused,
    RegistrySnapshot,
)
from coordinator.registry.waitqueue import AcquireRequest, Waiter, WaitQueue
from coordinator.untrusted import printable

__all__ = ["AcquireRequest", "Decision", "Done", "Refusal", "Refused", "RegisterRefused",
           "RegistryState", "SharedEvent"]

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")
V = TypeVar("V")

Answer = tuple[object, Grant | Refused]  # a queued request's ticket, and its answer

# The state's reads; every other public method is a mutation and returns Done
# (tests/test_registry_state.py holds the facade to that).
READS: Final = frozenset({"census", "models_served", "serves", "lease_of", "local", "snapshot",
                          "cooling_until", "providers", "by_model", "free", "queue",
                          "hedge_budget"})


@attrs.frozen
class Done(Generic[T]):
    """What a mutation returns: its own answer (``value``), the queued requests it
    made answerable, and the events to share with other instances."""

    value: T
    answers: tuple[Answer, ...] = ()
    shared: tuple[SharedEvent, ...] = ()

    def then(self, later: Done[U]) -> Done[U]:
        """This, followed by ``later``: both sets of answers and events, ``later``'s value."""
        return Done(later.value, self.answers + later.answers, self.shared + later.shared)


@attrs.define(eq=False)
class RegistryState:
    config: Config
    metrics: Metrics  # the coordinator's: a private default would count nowhere
    rng: random.Random = attrs.field(factory=random.Random)
    # Optional audit hook: called with (event, now, details) for every grant,
    # release and registration. Tests check routing against a reference model.
    observer: Callable[[str, float, dict[str, Any]], None] | None = None
    fleet: Fleet = attrs.field(init=False)
    waitqueue: WaitQueue = attrs.field(init=False)
    learning: Learning = attrs.field(init=False)
    breaker: Breaker = attrs.field(init=False)
    router: Router = attrs.field(init=False)
    _shared: list[SharedEvent] = attrs.field(factory=list, init=False)  # out with the next Done
    _serial: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.fleet = Fleet(
            {trait: parse_version(v) for trait, v in c.capability_floors.items()}, self.metrics,
            ModelMemory(c.model_forget_after, c.max_known_models),
            CapabilityMemory(c.model_forget_after, c.max_known_models))
        self.waitqueue = WaitQueue(c.queue_max, self.metrics)
        self.learning = Learning(c, self.metrics)
        self.breaker = Breaker(c.breaker_strikes, c.breaker_window, c.breaker_cooldown)
        self.router = Router(c, self.fleet, self.breaker, self.rng)

    # ---- mutations: each ends in _settle, which re-checks the queue -----------------

    def register(self, record: ProviderRecord, now: float) -> Done[ProviderRecord | None]:
        """Add a provider; its value is the session it supersedes, if any.

        Raises :class:`RegisterRefused` (before changing anything) for a live id
        registered by another key, or an X25519 key another provider uses.
        """
        self.fleet.admissible(record)
        self._note("register", now, provider_id=record.provider_id)
        old = self.fleet.providers.get(record.provider_id)
        if old is not None:
            self._leave(old, now)
        self._join(record, now)
        self.breaker.forget_provider(record.provider_id)
        self._shared.append(Renewed(record.provider_id))
        return self._settle(old, now)

    def unregister(self, provider_id: str, session: int, now: float) -> Done[None]:
        record = self.fleet.session(provider_id, session)
        if record is not None:
            self._leave(record, now)
            # Its cooldowns go with it: a new session starts clean anyway, and the
            # status page and the cooldown gauge count the same, live, keys.
            self.breaker.forget_provider(provider_id)
        return self._settle(None, now)

    def acquire(self, request: AcquireRequest, now: float) -> Done[Decision]:
        """A grant or a refusal now, or None: the request waits in the queue."""
        decision = self._decide(request, now)
        if isinstance(decision, Grant):
            decision = self._primary(decision, request.job, now)
        elif decision is None and not self.waitqueue.add(request, now):
            decision = Refused(Refusal.QUEUE_FULL,
                               "all providers for this model are busy and the queue is full")
        return self._settle(decision, now)

    def try_acquire(self, request: AcquireRequest, now: float, *,
                    cold_primary: bool = False) -> Done[Grant | None]:
        """A free eligible provider now, or None. Never queues (the backup path).

        A backup also needs room in the hedge budget; without it, none is started —
        unless the primary said it is loading the model (``cold_primary``): the budget
        keeps a slow fleet from doubling its load, and a cold load is not slowness to
        wait out (one provider answering "accepted" to everything held consumers for
        minutes once the budget was spent). Such a backup is outside the budget: it
        neither needs room in it nor uses any.
        """
        return self._settle(self._backup(request, now, cold_primary), now)

    def withdraw(self, ticket: object, now: float) -> Done[Refused | None]:
        """Take a request out of the queue; when its model has no provider connected any
        more, why (for a request that waited its whole budget: not "no slot came free")."""
        model = self.waitqueue.withdraw(ticket, now)
        return self._settle(None if model is None else self.router.absent(model, now), now)

    def release(self, lease: Lease, outcome: Outcome, now: float,
                evidence: Evidence | None = None) -> Done[None]:
        """Give a slot back with a verdict on the provider's health (and what was learned)."""
        self._release(lease, outcome, now, evidence)
        return self._settle(None, now)

    # -- scale-out: what other instances publish and tell (docs/scale-out.md)
    def mirror(self, instance: str, records: list[ProviderRecord], now: float) -> Done[None]:
        """Replace the providers ``instance`` publishes with these, as remote records."""
        self.waitqueue.touch(replace_page(self.fleet, instance, records, now))
        return self._settle(None, now)

    def forget_instance(self, instance: str, now: float) -> Done[None]:
        """An instance is gone (its link dropped, or its directory expired)."""
        return self.mirror(instance, [], now)

    def reserve(self, lease: Lease, now: float) -> Done[str | None]:
        """Hold a slot here for another instance's request: None, or why not."""
        return self._settle(reserve_for_peer(self.fleet, lease, now), now)

    def cool_remote(self, key: BreakerKey, seconds: float, now: float) -> Done[None]:
        """A cooldown entered by the shared breaker; ``seconds`` left (clocks differ)."""
        self.breaker.cool(key, now + seconds)
        self.waitqueue.touch([key[1]])  # its waiters may have no provider left to wait for
        return self._settle(None, now)

    def clear_remote(self, key: BreakerKey, now: float) -> Done[None]:
        self.breaker.record_success(key)
        self.waitqueue.touch([key[1]])
        return self._settle(None, now)

    def freed_remote(self, provider_id: str, in_use: int, now: float) -> Done[None]:
        """Another instance's provider has a free slot again: update it and wake waiters."""
        self.waitqueue.touch(apply_freed(self.fleet, provider_id, in_use, now))
        return self._settle(None, now)

    def renewed_remote(self, provider_id: str, now: float) -> Done[None]:
        """A provider started a new session on another instance: it starts clean here too."""
        self.breaker.forget_provider(provider_id)
        record = self.fleet.providers.get(provider_id)
        if record is not None:  # its cooldowns are gone: waiters may have it back
            self.waitqueue.touch(record.models)
        return self._settle(None, now)

    def _settle(self, value: V, now: float) -> Done[V]:
        """The end of every mutation: answer the waiters it made answerable, and take
        the events it has to share."""
        shared, self._shared = tuple(self._shared), []
        return Done(value, self._recheck(now), shared)

    def _recheck(self, now: float) -> tuple[Answer, ...]:
        """Answer, in arrival order, queued requests that can now be granted or refused.

        Only the models touched since the last re-check are looked at: a released
        slot, a registration or a departure changes nothing for the others.
        """
        answers: list[Answer] = []
        for waiter in self.waitqueue.due():
            decision = self._decide(waiter.request, now)
            if decision is None:
                continue
            self.waitqueue.withdraw(waiter.request.ticket, now)
            if isinstance(decision, Grant):
                decision = attrs.evolve(self._primary(decision, waiter.request.job, now),
                                        queued=now - waiter.since)
            answers.append((waiter.request.ticket, decision))
        return tuple(answers)

    # -- the steps
    def _join(self, record: ProviderRecord, now: float) -> None:
        self.fleet.add(record, now)
        self.waitqueue.touch(record.models)

    def _leave(self, record: ProviderRecord, now: float) -> None:
        self.fleet.remove(record, now)
        self.waitqueue.touch(record.models)

    def _decide(self, request: AcquireRequest, now: float) -> Decision:
        choice = self.router.choose(request, now)
        if isinstance(choice, ProviderRecord):
            return Grant(self._lease(choice, request.job, now))
        return choice

    def _lease(self, record: ProviderRecord, job: Job, now: float) -> Lease:
        lease = Lease(
            # A wire id per lease: late frames of a cancelled racer can never
            # leak into a later attempt on the same provider.
            request_id=f"{job.request_id}.{next(self._serial)}",
            provider_id=record.provider_id,
            session=record.session,
            model=job.model,
            shape=job.traits.shape,
            version=record.version_text,
            cost=scheduler.job_cost(record, job),
            instance=record.instance,
        )
        self.fleet.hold(record, lease, now)
        self._note("grant", now, lease=lease, job=job)
        return lease

    def _primary(self, grant: Grant, job: Job, now: float) -> Grant:
        """A primary's grant counts toward the hedge budget and carries its hedge delay."""
        self.learning.hedge_budget.primary(now)
        self._note("primary", now, lease=grant.lease)
        return attrs.evolve(grant, hedge_after=self.learning.hedge_delay(job))

    def _backup(self, request: AcquireRequest, now: float, cold_primary: bool) -> Grant | None:
        if not cold_primary and not self.learning.hedge_budget.allows(now):
            self.metrics.hedge_budget_exhausted.inc()
            return None
        decision = self._decide(request, now)
        if not isinstance(decision, Grant):
            return None
        if cold_primary:
            self._note("cold_backup", now, lease=decision.lease)
        else:
            self.learning.hedge_budget.spend(now)
            self._note("backup", now, lease=decision.lease)
        return decision

    def _release(self, lease: Lease, outcome: Outcome, now: float,
                 evidence: Evidence | None) -> None:
        record = self.fleet.providers.get(lease.provider_id)
        if record is not None and record.session == lease.session and evidence is not None:
            outcome = self.learning.learn(record, lease, evidence, outcome, now)
        self._note("release", now, lease=lease, outcome=outcome, evidence=evidence)
        if lease.instance and (record is None or record.instance != lease.instance):
            return  # the instance holding the provider went: its failure, not the provider's
        if record is not None:
            if record.session != lease.session:
                return  # a verdict on an old session says nothing about the new one
            self._give_back(record, lease, outcome, now)
        self._judge((lease.provider_id, lease.model, lease.shape), outcome, now)

    def _give_back(self, record: ProviderRecord, lease: Lease, outcome: Outcome,
                   now: float) -> None:
        was_full = record.free_slots <= 0
        record.leases.pop(lease.request_id, None)
        record.served += outcome.kind is OutcomeKind.SUCCESS
        error = outcome.kind is OutcomeKind.FAILURE and is_strike(outcome.status)
        if error or outcome.kind is OutcomeKind.SUCCESS:  # a verdict on its health
            record.failed += error
            record.recent.add(error=error)
        self.fleet.reindex(record, now)
        self.waitqueue.touch(record.models)
        if was_full and record.free_slots > 0 and not record.instance:
            self._shared.append(Freed(record.provider_id, len(record.leases)))

    def _judge(self, key: BreakerKey, outcome: Outcome, now: float) -> None:
        """The breaker's part of a verdict, and what of it other instances must hear."""
        if outcome.kind is OutcomeKind.SUCCESS:
            if self.breaker.knows(key):
                self._shared.append(Cleared(key))
            self.breaker.record_success(key)
        elif outcome.kind is OutcomeKind.FAILURE:
            if is_strike(outcome.status):
                self._shared.append(Struck(key, outcome.status))
            if self.breaker.record_failure(key, outcome.status, now):
                self.metrics.cooldown_entered.inc()
                log.warning("cooldown entered for %s/%s/%s after status %s",
                            *map(printable, key), outcome.status)

    def _note(self, event: str, now: float, **details: Any) -> None:
        if self.observer is not None:
            self.observer(event, now, details)

    # ---- reads: they change nothing --------------------------------------------------

    def census(self) -> Census:
        """Providers online and requests queued: cheap, for health checks."""
        return Census(len(self.fleet.providers), len(self.waitqueue))

    def models_served(self) -> tuple[str, ...]:
        return tuple(sorted(self.fleet.by_model))

    def serves(self, model: str) -> bool:
        return model in self.fleet.by_model

    def lease_of(self, provider_id: str, request_id: str) -> Lease | None:
        record = self.fleet.providers.get(provider_id)
        return None if record is None else record.leases.get(request_id)

    def local(self, view: Callable[[ProviderRecord], T]) -> list[T]:
        """Each provider connected here, as ``view`` makes it (a value, read now)."""
        return [view(r) for r in self.fleet.providers.values() if not r.instance]

    def snapshot(self, now: float) -> RegistrySnapshot:
        return views.snapshot(self.fleet, self.breaker, len(self.waitqueue), now)

    def cooling_until(self) -> tuple[float, ...]:
        """When each cooldown on record ends, in order (the cooldown gauge counts those
        still ahead at scrape time)."""
        return self.breaker.cooling_until()

    # What tests look at (read-only by convention, like everything here outside the actor).
    @property
    def providers(self) -> dict[str, ProviderRecord]:
        return self.fleet.providers

    @property
    def by_model(self) -> dict[str, dict[str, ProviderRecord]]:
        return self.fleet.by_model

    @property
    def free(self) -> dict[str, ModelIndex]:
        return self.fleet.free

    @property
    def queue(self) -> list[Waiter]:
        """Every queued request, in arrival order."""
        return self.waitqueue.waiters()

    @property
    def hedge_budget(self) -> HedgeBudget:
        return self.learning.hedge_budget

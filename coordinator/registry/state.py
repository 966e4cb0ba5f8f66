"""The registry's state and every routing decision, synchronous and clock-free.

:class:`RegistryState` is what the registry actor owns: the provider table
(indexed by model), the leases, the circuit breaker, the queue and the models
remembered while offline. Each method is one message's handling; ``now`` is
always an argument, so the state is tested directly, without an event loop.
Answers are values: a :class:`~coordinator.registry.table.Grant`, a
:class:`Refused` (what kind, and a sentence for the consumer — HTTP is the API
edge's business), or ``None`` for "wait in the queue".
"""

from __future__ import annotations

import enum
import itertools
import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from coordinator.capabilities import Version, parse_version
from coordinator.config import Config
from coordinator.metrics import Metrics
from coordinator.registry import hedging, scheduler, speed
from coordinator.registry.breaker import Breaker, is_strike
from coordinator.registry.gates import (
    Gate,
    capabilities,
    fail_fast_message,
    gate,
    incapable_message,
    needs,
)
from coordinator.registry.hedging import HedgeBudget
from coordinator.registry.index import ModelIndex, reference_key
from coordinator.registry.models import CapabilityMemory, ModelMemory
from coordinator.registry.table import (
    CooldownView,
    Evidence,
    Grant,
    Job,
    Lease,
    ModelView,
    Observed,
    Outcome,
    OutcomeKind,
    Outpaced,
    ProviderRecord,
    ProviderView,
    RegistrySnapshot,
    SpeedView,
)
from coordinator.untrusted import printable

log = logging.getLogger(__name__)


class RegisterRefused(Exception):
    """A registration the registry will not accept; the message is the reason."""


class Refusal(enum.Enum):
    UNKNOWN_MODEL = "unknown_model"
    UNSERVABLE = "unservable"  # providers serve the model, none can serve this request
    TOO_LARGE = "too_large"  # no provider of the model accepts a frame this large
    EXHAUSTED = "exhausted"  # every otherwise eligible provider already failed this request
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    OFFLINE = "offline"  # waited in the queue while no provider of the model was connected
    # The request needs a capability (tool calls, images) no known provider of the
    # model has — live, or departed and still remembered: for good, not for now.
    INCAPABLE = "incapable"


@attrs.frozen
class Refused:
    kind: Refusal
    detail: str


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


@attrs.frozen
class AcquireRequest:
    job: Job
    exclude: frozenset[str] = frozenset()
    avoid_version: str | None = None
    ticket: object = attrs.field(factory=object)  # identifies a queued request


@attrs.define(eq=False)
class _Waiter:
    request: AcquireRequest
    since: float
    order: int  # arrival order, across models


# A decision weighs at most this many eligible providers from the front of the
# model's index (and a few more, on a retry, to find another version).
PICK_WIDTH = 8
DIVERSITY_WINDOW = 32


Decision = Grant | Refused | None  # None: wait in the queue


@attrs.define(eq=False)
class RegistryState:
    config: Config
    metrics: Metrics = attrs.field(factory=Metrics)
    rng: random.Random = attrs.field(factory=random.Random)
    providers: dict[str, ProviderRecord] = attrs.field(factory=dict)
    # X25519 key -> the provider using it, local or on another instance: a key is
    # one provider's, or a prompt sealed for one could be read by another.
    _encryption_keys: dict[str, str] = attrs.field(factory=dict)
    # model -> provider id -> record: a decision looks only at the model's providers.
    by_model: dict[str, dict[str, ProviderRecord]] = attrs.field(factory=dict)
    # model -> its providers with a free slot, best first (registry/index.py).
    free: dict[str, ModelIndex] = attrs.field(factory=dict)
    # model -> its queued requests, in arrival order.
    # model -> ticket -> waiter; a dict keeps arrival order and withdraws in O(1)
    queues: dict[str, dict[object, _Waiter]] = attrs.field(factory=dict)
    _queued: dict[object, str] = attrs.field(factory=dict)  # ticket -> model
    _dirty: set[str] = attrs.field(factory=set)  # models whose waiters may now be answered
    _arrivals: itertools.count[int] = attrs.field(factory=itertools.count)
    _versions: Counter[str] = attrs.field(factory=Counter)
    # Recent times to first content per (model, prompt-size class): the hedge timer.
    recent_ttfc: dict[tuple[str, int], speed.RecentTimes] = attrs.field(factory=dict)
    hedge_budget: HedgeBudget = attrs.field(init=False)
    # Boilerplate-then-silence losses per breaker key (speed.outpaced_strike).
    _outpaced: dict[tuple[str, str, str], deque[float]] = attrs.field(factory=dict)
    # Scale-out: where strikes, clears and freed slots go to be shared (cluster/).
    outbox: Callable[[SharedEvent], None] | None = None
    offline_models: ModelMemory = attrs.field(init=False)
    departed_capabilities: CapabilityMemory = attrs.field(init=False)
    breaker: Breaker = attrs.field(init=False)
    floors: Mapping[str, Version | None] = attrs.field(init=False)
    _serial: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    # Optional audit hook: called with (event, now, details) for every grant,
    # release and registration. Tests check routing against a reference model.
    observer: Callable[[str, float, dict[str, Any]], None] | None = None

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.breaker = Breaker(c.breaker_strikes, c.breaker_window, c.breaker_cooldown)
        self.floors = {trait: parse_version(v) for trait, v in c.capability_floors.items()}
        self.offline_models = ModelMemory(c.model_forget_after, c.max_known_models)
        self.departed_capabilities = CapabilityMemory(c.model_forget_after, c.max_known_models)
        self.hedge_budget = HedgeBudget(c.hedge_budget, c.hedge_window)

    # -- providers
    def register(self, record: ProviderRecord, now: float) -> ProviderRecord | None:
        """Add a provider; return the session it supersedes, if any.

        Raises :class:`RegisterRefused` for a live id registered by another key.
        """
        old = self.providers.get(record.provider_id)
        if old is not None and old.signing_key != record.signing_key:
            # The edge binds ids to keys; this keeps the rule where the table is.
            raise RegisterRefused(f"provider id {record.provider_id} is live with another key")
        holder = self._encryption_keys.get(record.public_key)
        if record.public_key and holder not in (None, record.provider_id):
            raise RegisterRefused("public_key is registered by another provider")
        self._note("register", now, provider_id=record.provider_id)
        if old is not None:
            self._remove(old, now)
        self._add(record, now)
        self.breaker.forget_provider(record.provider_id)
        self._share(Renewed(record.provider_id))
        return old

    def _add(self, record: ProviderRecord, now: float) -> None:
        self.providers[record.provider_id] = record
        if record.public_key:
            self._encryption_keys.setdefault(record.public_key, record.provider_id)
        for model in record.models:
            self.by_model.setdefault(model, {})[record.provider_id] = record
            self.offline_models.came_online(model)
        self._reindex(record, now)
        self._dirty.update(record.models)
        self._count_version(record, +1)

    def unregister(self, provider_id: str, session: int, now: float) -> None:
        record = self.providers.get(provider_id)
        if record is not None and record.session == session:
            self._remove(record, now)
            # Its cooldowns go with it: a new session starts clean anyway, and the
            # status page and the cooldown gauge count the same, live, keys.
            self.breaker.forget_provider(provider_id)

    def _remove(self, record: ProviderRecord, now: float) -> None:
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
        self._dirty.update(record.models)

    def _reindex(self, record: ProviderRecord, now: float) -> None:
        """Keep ``record`` in its models' indexes, keyed afresh, while it has a free slot."""
        for model in record.models:
            index = self.free.setdefault(model, ModelIndex())
            if record.free_slots > 0:
                index.put(record.provider_id, reference_key(record, model, now))
            else:
                index.discard(record.provider_id)

    # -- routing
    def decide(self, request: AcquireRequest, now: float) -> Decision:
        """Grant a lease, refuse, or return None to mean "wait in the queue"."""
        job = request.job
        if job.model not in self.by_model:
            if self.offline_models.remembers(job.model, now):
                # Its providers are momentarily offline: wait for them, unless none
                # of them could ever have served this request.
                return self._incapable(job, now)
            return Refused(Refusal.UNKNOWN_MODEL,
                           f"the model {job.model!r} does not exist or is not served")
        chosen, gated = self._pick(request, now)
        if chosen is not None:
            return Grant(self._lease(chosen, job, now))
        why = self._why_not(request, now, gated)
        if why is None:
            return None  # eligible providers exist; every one of them is busy
        return self._refusal(job, why, now)

    def _pick(
        self, request: AcquireRequest, now: float
    ) -> tuple[ProviderRecord | None, dict[str, Gate]]:
        """The best eligible free provider, from the front of the model's index, and the
        gate's answer for every provider it turned down on the way."""
        avoid = request.avoid_version
        gated: dict[str, Gate] = {}
        candidates: list[ProviderRecord] = []
        on_probation: list[ProviderRecord] = []  # only if nobody else is free
        cutoff, extra = 0.0, 0
        for key, pid in self.free[request.job.model].best_first():
            if len(on_probation) >= PICK_WIDTH * 8:
                break  # a bounded look past a fleet of newcomers
            if candidates and (len(candidates) >= PICK_WIDTH or key > cutoff):
                # Enough near the best; on a retry, look a little further for another version.
                if avoid is None or any(c.version_text != avoid for c in candidates) \
                        or extra >= DIVERSITY_WINDOW:
                    break
                extra += 1
            record = self.providers[pid]
            reason = self._gate(record, request, now)
            if reason is not None:
                gated[pid] = reason
                continue
            if scheduler.on_probation(record, request.job):
                on_probation.append(record)
                continue
            if not candidates:
                cutoff = key * (1 + scheduler.TIE_TOLERANCE) + 1e-9
            candidates.append(record)
        chosen = scheduler.pick(candidates or on_probation[:PICK_WIDTH], request.job, self.rng,
                                avoid_version=avoid, now=now)
        return chosen, gated

    def _why_not(self, request: AcquireRequest, now: float,
                 known: Mapping[str, Gate]) -> set[Gate] | None:
        """None when some provider could serve the request once it has a free slot;
        otherwise every reason the gate gave. ``known``: answers already had (from
        :meth:`_pick`), so that a refusal asks about each provider once, not three times."""
        why = set(known.values())
        for pid, record in self.by_model[request.job.model].items():
            if pid in known:
                continue
            reason = self._gate(record, request, now)
            if reason is None:
                return None
            why.add(reason)
        return why

    def _gate(self, record: ProviderRecord, request: AcquireRequest, now: float) -> Gate | None:
        return gate(record, request.job, floors=self.floors, breaker=self.breaker, now=now,
                    exclude=request.exclude, memory_fraction=self.config.model_memory_fraction)

    def _refusal(self, job: Job, why: set[Gate], now: float) -> Refused:
        if Gate.EXCLUDED in why:
            return Refused(Refusal.EXHAUSTED, "no further provider available for this request")
        incapable = self._incapable(job, now)
        if incapable is not None:
            return incapable
        if why - {Gate.NOT_ALLOWED} == {Gate.REQUEST_TOO_LARGE}:
            largest = max(r.max_request_bytes for r in self.by_model[job.model].values())
            return Refused(Refusal.TOO_LARGE,
                           f"this request needs a {job.request_bytes}-byte frame; the providers "
                           f"of model {job.model} accept at most {largest} bytes")
        return Refused(Refusal.UNSERVABLE, fail_fast_message(job, why))

    def _incapable(self, job: Job, now: float) -> Refused | None:
        """A refusal for good when no known provider of the model — connected here or
        mirrored from another instance, or departed within ``model_forget_after`` — has
        the capabilities the request needs; None when one has, or when nothing is known.

        Judged over all the model's providers, whatever the request's allowlist: a
        capable provider outside it keeps the refusal retryable (the allowlist may be
        the consumer's mistake of the moment, the model's capability is not).
        """
        needed = needs(job)
        known = [capabilities(r, r.models[job.model], self.floors)
                 for r in self.by_model.get(job.model, {}).values()]
        departed = self.departed_capabilities.of(job.model, now)
        if departed is None and not known:
            return None  # the model is remembered, its providers' capabilities are not
        known.extend(departed or ())
        if any(needed <= caps for caps in known):
            return None
        return Refused(Refusal.INCAPABLE, incapable_message(job, known, self.floors))

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
        record.leases[lease.request_id] = lease
        self._reindex(record, now)
        self._note("grant", now, lease=lease, job=job)
        return lease

    @property
    def queue(self) -> list[_Waiter]:
        """Every queued request, in arrival order."""
        return sorted((w for q in self.queues.values() for w in q.values()),
                      key=lambda w: w.order)

    def acquire(self, request: AcquireRequest, now: float) -> Decision:
        """A grant or a refusal now, or None: the request waits in the queue."""
        decision = self._primary(self.decide(request, now), request.job, now)
        if decision is not None:
            return decision
        if len(self._queued) >= self.config.queue_max:
            return Refused(Refusal.QUEUE_FULL,
                           "all providers for this model are busy and the queue is full")
        model = request.job.model
        self.queues.setdefault(model, {})[request.ticket] = _Waiter(
            request, now, next(self._arrivals))
        self._queued[request.ticket] = model
        self.metrics.queue_depth.set(len(self._queued))
        return None

    def _primary(self, decision: Decision, job: Job, now: float) -> Decision:
        """A primary's grant counts toward the hedge budget and carries its hedge delay."""
        if not isinstance(decision, Grant):
            return decision
        self.hedge_budget.primary(now)
        self._note("primary", now, lease=decision.lease)
        return attrs.evolve(decision, hedge_after=self.hedge_delay(job))

    def hedge_delay(self, job: Job) -> float:
        c = self.config
        fixed = (c.ttft_base + c.ttft_per_prompt_token * job.prompt_tokens) * c.backup_fraction
        if not c.adaptive_hedging:
            return fixed
        recent = self.recent_ttfc.get((job.model, speed.size_class(job.prompt_tokens)))
        return hedging.hedge_delay(recent, fixed=fixed, floor=c.hedge_floor)

    def try_acquire(self, request: AcquireRequest, now: float, *,
                    cold_primary: bool = False) -> Grant | None:
        """A free eligible provider now, or None. Never queues (the backup path).

        A backup also needs room in the hedge budget; without it, none is started —
        unless the primary said it is loading the model (``cold_primary``): the budget
        keeps a slow fleet from doubling its load, and a cold load is not slowness to
        wait out (one provider answering "accepted" to everything held consumers for
        minutes once the budget was spent). Such a backup is outside the budget: it
        neither needs room in it nor uses any.
        """
        if not cold_primary and not self.hedge_budget.allows(now):
            self.metrics.hedge_budget_exhausted.inc()
            return None
        decision = self.decide(request, now)
        if not isinstance(decision, Grant):
            return None
        if cold_primary:
            self._note("cold_backup", now, lease=decision.lease)
        else:
            self.hedge_budget.spend(now)
            self._note("backup", now, lease=decision.lease)
        return decision

    def withdraw(self, ticket: object, now: float) -> Refused | None:
        """Take a request out of the queue; when its model has no provider connected any
        more, why (for a request that waited its whole budget: not "no slot came free")."""
        model = self._queued.pop(ticket, None)
        if model is None:
            return None
        waiter = self.queues[model].pop(ticket)
        self.metrics.queue_wait.observe(now - waiter.since)
        self.metrics.queue_depth.set(len(self._queued))
        if model in self.by_model:
            return None
        if self.offline_models.remembers(model, now):
            return Refused(Refusal.OFFLINE, f"no provider of the model {model!r} is connected: "
                           "they went offline and have not come back")
        return Refused(Refusal.UNKNOWN_MODEL,
                       f"the model {model!r} does not exist or is not served")

    def drain(self, now: float) -> list[tuple[object, Grant | Refused]]:
        """Answer, in arrival order, queued requests that can now be granted or refused.

        Only the models touched since the last drain are looked at: a released
        slot, a registration or a departure changes nothing for the others.
        """
        waiters = sorted((w for m in self._dirty for w in self.queues.get(m, {}).values()),
                         key=lambda w: w.order)
        self._dirty.clear()
        answered: list[tuple[object, Grant | Refused]] = []
        for waiter in waiters:
            decision = self.decide(waiter.request, now)
            if decision is None:
                continue
            self.withdraw(waiter.request.ticket, now)
            if isinstance(decision, Grant):
                granted = self._primary(decision, waiter.request.job, now)
                assert isinstance(granted, Grant)
                decision = attrs.evolve(granted, queued=now - waiter.since)
            answered.append((waiter.request.ticket, decision))
        return answered

    # -- verdicts
    def release(self, lease: Lease, outcome: Outcome, now: float,
                evidence: Evidence | None = None) -> None:
        record = self.providers.get(lease.provider_id)
        if record is not None and record.session == lease.session and evidence is not None:
            outcome = self._learn(record, lease, evidence, outcome, now)
        self._note("release", now, lease=lease, outcome=outcome, evidence=evidence)
        if lease.instance and (record is None or record.instance != lease.instance):
            return  # the instance holding the provider went: its failure, not the provider's
        if record is not None:
            if record.session != lease.session:
                return  # a verdict on an old session says nothing about the new one
            was_full = record.free_slots <= 0
            record.leases.pop(lease.request_id, None)
            record.served += outcome.kind is OutcomeKind.SUCCESS
            error = outcome.kind is OutcomeKind.FAILURE and is_strike(outcome.status)
            if error or outcome.kind is OutcomeKind.SUCCESS:  # a verdict on its health
                record.failed += error
                record.recent.add(error=error)
            self._reindex(record, now)
            self._dirty.update(record.models)
            if was_full and record.free_slots > 0 and not record.instance:
                self._share(Freed(record.provider_id, len(record.leases)))
        key = (lease.provider_id, lease.model, lease.shape)
        if outcome.kind is OutcomeKind.SUCCESS:
            if self.breaker.knows(key):
                self._share(Cleared(key))
            self.breaker.record_success(key)
        elif outcome.kind is OutcomeKind.FAILURE:
            if is_strike(outcome.status):
                self._share(Struck(key, outcome.status))
            if self.breaker.record_failure(key, outcome.status, now):
                self.metrics.cooldown_entered.inc()
                log.warning("cooldown entered for %s/%s/%s after status %s",
                            *map(printable, key), outcome.status)

    def _learn(self, record: ProviderRecord, lease: Lease, evidence: Evidence,
               outcome: Outcome, now: float) -> Outcome:
        """Take in what a request showed of the provider; return the verdict to record."""
        known = record.speeds.setdefault(lease.model, speed.ProviderSpeed())
        match evidence:
            case Observed(ttfc, decode_tps, prompt_tokens):
                known.observe(ttfc, decode_tps)
                klass = (lease.model, speed.size_class(prompt_tokens))
                self.recent_ttfc.setdefault(klass, speed.RecentTimes()).add(ttfc)
            case Outpaced(silent_for, boilerplate_only):
                known.outpaced(silent_for, now)
                self.metrics.outpaced.inc()
                times = self._outpaced.setdefault(
                    (lease.provider_id, lease.model, lease.shape), deque())
                if boilerplate_only and speed.outpaced_strike(
                        times, now, window=self.config.breaker_window,
                        threshold=self.config.outpaced_strikes):
                    log.warning("%s/%s/%s outpaced with only boilerplate %d times: a strike",
                                printable(lease.provider_id), printable(lease.model),
                                lease.shape, self.config.outpaced_strikes)
                    return Outcome.failure(504)
        return outcome

    # -- scale-out: what other instances publish and tell (docs/scale-out.md)
    def _share(self, event: SharedEvent) -> None:
        if self.outbox is not None:
            self.outbox(event)

    def mirror(self, instance: str, records: list[ProviderRecord], now: float) -> None:
        """Replace the providers ``instance`` publishes with these, as remote records."""
        mine = {pid for pid, r in self.providers.items() if r.instance == instance}
        for record in records:
            mine.discard(record.provider_id)
            old = self.providers.get(record.provider_id)
            if old is not None and not old.instance:
                continue  # connected here now: this instance's own session wins
            if old is not None and old.instance == instance and old.session == record.session:
                old.max_slots = record.max_slots
                old.external_in_use = max(0, record.external_in_use - len(old.leases))
                own = sum(lease.cost for lease in old.leases.values())
                old.external_seconds = max(0.0, record.external_seconds - own)
                self._reindex(old, now)
                self._dirty.update(old.models)
                continue
            if old is not None:
                self._remove(old, now)
            self._add(record, now)
        for pid in mine:
            self._remove(self.providers[pid], now)

    def reserve(self, lease: Lease, now: float) -> str | None:
        """Hold a slot on one of this instance's providers for another instance's request.

        This instance is authoritative for its providers' slots: None when the
        slot is held, else why not ("gone", "full", "duplicate") — a capacity refusal,
        no strike. A request id already holding a slot on the provider (a request of
        this instance's, or a relay on another link) is never replaced: its lease and
        its stream are keyed by that id.
        """
        record = self.providers.get(lease.provider_id)
        if record is None or record.session != lease.session or record.instance:
            return "gone"
        if lease.request_id in record.leases:
            return "duplicate"
        if record.free_slots <= 0:
            return "full"
        record.leases[lease.request_id] = lease
        self._reindex(record, now)
        return None

    def cool_remote(self, key: tuple[str, str, str], seconds: float, now: float) -> None:
        """A cooldown entered by the shared breaker; ``seconds`` left (clocks differ)."""
        self.breaker.cool(key, now + seconds)
        self._dirty.add(key[1])  # its waiters may have no provider left to wait for

    def clear_remote(self, key: tuple[str, str, str]) -> None:
        self.breaker.record_success(key)
        self._dirty.add(key[1])

    def freed_remote(self, provider_id: str, in_use: int, now: float) -> None:
        """Another instance's provider has a free slot again: update it and wake waiters."""
        record = self.providers.get(provider_id)
        if record is not None and record.instance:
            record.external_in_use = max(0, in_use - len(record.leases))
            self._reindex(record, now)
            self._dirty.update(record.models)

    def renewed_remote(self, provider_id: str) -> None:
        """A provider started a new session on another instance: it starts clean here too."""
        self.breaker.forget_provider(provider_id)

    def forget_instance(self, instance: str, now: float) -> None:
        """An instance is gone (its link dropped, or its directory expired)."""
        self.mirror(instance, [], now)

    # -- views
    def counts(self) -> tuple[int, int]:
        """Providers online and requests queued: cheap, for health checks."""
        return len(self.providers), len(self._queued)

    def models_served(self) -> list[str]:
        return sorted(self.by_model)

    def serves(self, model: str) -> bool:
        return model in self.by_model

    def cooldowns_active(self, now: float) -> int:
        return len(self.breaker.cooldowns(now))

    def snapshot(self, now: float) -> RegistrySnapshot:
        cooldowns = self.breaker.cooldowns(now)
        self.offline_models.sweep(now)
        return RegistrySnapshot(
            providers=tuple(
                ProviderView(
                    id=r.provider_id, version=r.version_text, hardware=r.hardware,
                    in_use=len(r.leases), max_slots=r.max_slots, served=r.served,
                    failed=r.failed, recent_verdicts=r.recent.count,
                    recent_errors=r.recent.errors,
                    models=tuple(ModelView(m.id, bool(m.is_vision), m.template_render_ok,
                                           self._speed_view(r, m.id, now))
                                 for m in r.models.values()),
                    cooldowns=tuple(
                        CooldownView(model, shape, round(until - now, 3))
                        for (pid, model, shape), until in sorted(cooldowns.items())
                        if pid == r.provider_id),
                )
                for r in sorted(self.providers.values(), key=lambda r: r.provider_id)
            ),
            queue_depth=len(self._queued),
            leases=sum(len(r.leases) for r in self.providers.values()),
            models=tuple(sorted({*self.by_model, *self.offline_models.names()})),
        )

    def _speed_view(self, record: ProviderRecord, model: str, now: float) -> SpeedView:
        known = record.speeds.get(model) or speed.ProviderSpeed()
        observed = known.trusted
        return SpeedView(
            source="observed" if observed else "declared",
            ttfc_s=round(known.ttfc, 4) if observed and known.ttfc is not None else None,
            decode_tps=round(known.decode_tps if observed and known.decode_tps
                             else record.decode_tps, 1),
            samples=known.samples, outpaced_penalty_s=round(known.penalty_now(now), 3))

    def _count_version(self, record: ProviderRecord, change: int) -> None:
        """Keep ``coordinator_providers_online{version}`` in step, one provider at a time."""
        version = record.version_text or "unknown"
        self._versions[version] += change
        if self._versions[version]:
            self.metrics.providers_online.labels(version).set(self._versions[version])
        else:
            del self._versions[version]
            self.metrics.providers_online.remove(version)

    def _note(self, event: str, now: float, **details: Any) -> None:
        if self.observer is not None:
            self.observer(event, now, details)

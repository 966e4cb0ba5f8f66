"""The registry actor: one task owns the provider table, leases, breaker and queue.

Everything else sends it a message through a bounded channel and, where it
needs an answer, waits on a one-slot reply channel. Handlers never await, so
every routing decision is made against a consistent table and in arrival
order. Replies use ``send_nowait`` on one-slot channels that nobody else
writes to, so the actor can never block on a slow caller.

The queue wait budget is a cancel scope in the *caller* (``acquire``); the
actor only keeps the FIFO and withdraws entries when asked.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import random
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs
import trio

from coordinator import errors
from coordinator.config import Config
from coordinator.metrics import Metrics
from coordinator.registry import scheduler
from coordinator.registry.breaker import Breaker
from coordinator.registry.gates import Gate, fail_fast_message, gate
from coordinator.registry.models import ModelMemory
from coordinator.registry.table import Job, Lease, ProviderRecord
from coordinator.registry.versions import Version, parse_version

log = logging.getLogger(__name__)


class RegistryFault(Exception):
    """The actor failed to handle one message (a bug); the loop itself lives on."""


class RegisterRefused(Exception):
    """A registration the registry will not accept; the message is the reason."""


class Refusal(enum.Enum):
    UNKNOWN_MODEL = "unknown_model"
    UNSERVABLE = "unservable"
    EXHAUSTED = "exhausted"  # every otherwise eligible provider already failed this request
    QUEUE_FULL = "queue_full"


@attrs.frozen
class Refused:
    kind: Refusal
    error: errors.ApiError


class OutcomeKind(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"  # no verdict on the provider's health


@attrs.frozen
class Outcome:
    kind: OutcomeKind
    status: int = 0

    @classmethod
    def failure(cls, status: int) -> Outcome:
        return cls(OutcomeKind.FAILURE, status)


SUCCESS = Outcome(OutcomeKind.SUCCESS)
CANCELLED = Outcome(OutcomeKind.CANCELLED)


# ---- messages -----------------------------------------------------------------


@attrs.frozen
class _Register:
    record: ProviderRecord
    reply: trio.MemorySendChannel[RegisterRefused | RegistryFault | None]


@attrs.frozen
class _Unregister:
    provider_id: str
    session: int


@attrs.frozen
class _Acquire:
    job: Job
    exclude: frozenset[str]
    avoid_version: str | None
    queue: bool
    ticket: object
    reply: trio.MemorySendChannel[Lease | Refused | RegistryFault | None]


@attrs.frozen
class _Withdraw:
    ticket: object
    reply: trio.MemorySendChannel[RegistryFault | None]


@attrs.frozen
class _Release:
    lease: Lease
    outcome: Outcome


@attrs.frozen
class _Snapshot:
    reply: trio.MemorySendChannel[dict[str, Any] | RegistryFault]


_Command = _Register | _Unregister | _Acquire | _Withdraw | _Release | _Snapshot


@attrs.define(eq=False)
class _Waiter:
    request: _Acquire
    since: float


# ---- the actor's state and decisions (synchronous) ------------------------------


@attrs.define(eq=False)
class RegistryState:
    config: Config
    metrics: Metrics
    rng: random.Random
    providers: dict[str, ProviderRecord] = attrs.field(factory=dict)
    # model -> provider id -> record: a decision looks only at the model's providers.
    by_model: dict[str, dict[str, ProviderRecord]] = attrs.field(factory=dict)
    offline_models: ModelMemory = attrs.field(init=False)
    queue: deque[_Waiter] = attrs.field(factory=deque)
    breaker: Breaker = attrs.field(init=False)
    _serial: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    floors: Mapping[str, Version | None] = attrs.field(init=False)
    # Replaced after every command, so observers can wait for "the table changed".
    changed: trio.Event = attrs.field(factory=trio.Event)
    # Optional audit hook: called with (event, now, details) for every grant,
    # release and registration. Tests check routing against a reference model.
    observer: Callable[[str, float, dict[str, Any]], None] | None = None

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.breaker = Breaker(c.breaker_strikes, c.breaker_window, c.breaker_cooldown)
        self.floors = {trait: parse_version(v) for trait, v in c.capability_floors.items()}
        self.offline_models = ModelMemory(c.model_forget_after, c.max_known_models)

    # -- gating, shared by every path
    def _reasons(self, job: Job, exclude: Collection[str], now: float) -> dict[str, Gate | None]:
        return {
            pid: gate(r, job, floors=self.floors, breaker=self.breaker, now=now, exclude=exclude,
                      memory_fraction=self.config.model_memory_fraction)
            for pid, r in self.by_model.get(job.model, {}).items()
        }

    def decide(self, request: _Acquire, now: float) -> Lease | Refused | None:
        """Grant a lease, refuse, or return None to mean "wait in the queue"."""
        job = request.job
        reasons = self._reasons(job, request.exclude, now)
        eligible = [self.providers[pid] for pid, why in reasons.items() if why is None]
        if not reasons:
            if self.offline_models.remembers(job.model, now):
                return None  # its providers are momentarily offline
            return Refused(Refusal.UNKNOWN_MODEL, errors.not_found(
                f"the model {job.model!r} does not exist or is not served"))
        if not eligible:
            why = set(r for r in reasons.values() if r is not None)
            if Gate.EXCLUDED in why:
                return Refused(Refusal.EXHAUSTED, errors.unavailable(
                    "no further provider available for this request"))
            if why - {Gate.NOT_ALLOWED} == {Gate.REQUEST_TOO_LARGE}:
                largest = max(r.max_request_bytes for r in self.by_model[job.model].values())
                return Refused(Refusal.UNSERVABLE, errors.too_large_for_providers(
                    job.request_bytes, largest, job.model))
            return Refused(Refusal.UNSERVABLE, errors.unavailable(fail_fast_message(job, why)))
        chosen = scheduler.pick(eligible, job, self.rng, avoid_version=request.avoid_version)
        return None if chosen is None else self._lease(chosen, job)

    def _lease(self, record: ProviderRecord, job: Job) -> Lease:
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
            connection=record.connection,
        )
        record.leases[lease.request_id] = lease
        if self.observer is not None:
            self.observer("grant", trio.current_time(), {"lease": lease, "job": job})
        return lease

    # -- handlers
    def handle(self, command: _Command, now: float) -> None:
        try:
            self._dispatch(command, now)
        finally:
            self.metrics.queue_depth.set(len(self.queue))
            self.changed.set()
            self.changed = trio.Event()

    def _dispatch(self, command: _Command, now: float) -> None:
        match command:
            case _Acquire():
                self._on_acquire(command, now)
            case _Release(lease, outcome):
                self._on_release(lease, outcome, now)
                self._drain(now)
            case _Withdraw(ticket, reply):
                self._withdraw(ticket, now)
                reply.send_nowait(None)
            case _Register(record, reply):
                try:
                    self._on_register(record, now)
                except RegisterRefused as refused:
                    reply.send_nowait(refused)
                    return
                reply.send_nowait(None)
                self._drain(now)
            case _Unregister(provider_id, session):
                self._on_unregister(provider_id, session, now)
            case _Snapshot(reply):
                reply.send_nowait(self.snapshot(now))

    def _on_acquire(self, request: _Acquire, now: float) -> None:
        decision = self.decide(request, now)
        if decision is not None or not request.queue:
            request.reply.send_nowait(decision)
        elif len(self.queue) >= self.config.queue_max:
            request.reply.send_nowait(Refused(Refusal.QUEUE_FULL, errors.overloaded(
                "all providers for this model are busy and the queue is full")))
        else:
            self.queue.append(_Waiter(request, now))

    def _withdraw(self, ticket: object, now: float) -> None:
        for waiter in self.queue:
            if waiter.request.ticket is ticket:
                self.queue.remove(waiter)
                self.metrics.queue_wait.observe(now - waiter.since)
                return

    def _drain(self, now: float) -> None:
        """Serve queued requests, in order, that can now be granted or refused."""
        if not self.queue:
            return
        still: deque[_Waiter] = deque()
        for waiter in self.queue:
            decision = self.decide(waiter.request, now)
            if decision is None:
                still.append(waiter)
                continue
            self.metrics.queue_wait.observe(now - waiter.since)
            if isinstance(decision, Lease):
                decision.queued = now - waiter.since
            waiter.request.reply.send_nowait(decision)
        self.queue = still

    def _on_release(self, lease: Lease, outcome: Outcome, now: float) -> None:
        if self.observer is not None:
            self.observer("release", now, {"lease": lease, "outcome": outcome})
        record = self.providers.get(lease.provider_id)
        if record is not None:
            if record.session != lease.session:
                return  # a verdict on an old session says nothing about the new one
            record.leases.pop(lease.request_id, None)
            record.served += outcome.kind is OutcomeKind.SUCCESS
        key = (lease.provider_id, lease.model, lease.shape)
        if outcome.kind is OutcomeKind.SUCCESS:
            self.breaker.record_success(key)
        elif outcome.kind is OutcomeKind.FAILURE and self.breaker.record_failure(
            key, outcome.status, now
        ):
            self.metrics.cooldown_entered.inc()
            log.warning("cooldown entered for %s/%s/%s after status %s", *key, outcome.status)

    def _on_register(self, record: ProviderRecord, now: float) -> None:
        old = self.providers.get(record.provider_id)
        if old is not None and old.signing_key != record.signing_key:
            # The edge binds ids to keys; this keeps the rule where the table is.
            raise RegisterRefused(f"provider id {record.provider_id} is live with another key")
        if self.observer is not None:
            self.observer("register", trio.current_time(), {"provider_id": record.provider_id})
        if old is not None:
            self._remove(old, now)
            if old.connection is not None:
                old.connection.supersede()
        self.providers[record.provider_id] = record
        for model in record.models:
            self.by_model.setdefault(model, {})[record.provider_id] = record
            self.offline_models.came_online(model)
        self.breaker.forget_provider(record.provider_id)
        self._count_versions()

    def _on_unregister(self, provider_id: str, session: int, now: float) -> None:
        record = self.providers.get(provider_id)
        if record is not None and record.session == session:
            self._remove(record, now)
            # Its cooldowns go with it: a new session starts clean anyway, and the
            # status page and the cooldown gauge count the same, live, keys.
            self.breaker.forget_provider(provider_id)
            self._count_versions()

    def cooldowns_active(self, now: float) -> int:
        return len(self.breaker.cooldowns(now))

    def _remove(self, record: ProviderRecord, now: float) -> None:
        del self.providers[record.provider_id]
        for model in record.models:
            serving = self.by_model.get(model, {})
            serving.pop(record.provider_id, None)
            if not serving:
                self.by_model.pop(model, None)
                self.offline_models.went_offline(model, now)

    def _count_versions(self) -> None:
        self.metrics.providers_online.clear()
        for record in self.providers.values():
            self.metrics.providers_online.labels(record.version_text or "unknown").inc()

    def snapshot(self, now: float) -> dict[str, Any]:
        cooldowns = self.breaker.cooldowns(now)
        return {
            "providers": [
                {
                    "id": r.provider_id,
                    "version": r.version_text,
                    "hardware": r.hardware,
                    "slots": {"in_use": len(r.leases), "max": r.max_slots},
                    "served": r.served,
                    "models": [
                        {
                            "id": m.id,
                            "is_vision": bool(m.is_vision),
                            "template_render_ok": m.template_render_ok,
                        }
                        for m in r.models.values()
                    ],
                    "cooldowns": [
                        {"model": model, "shape": shape, "seconds_left": round(until - now, 3)}
                        for (pid, model, shape), until in sorted(cooldowns.items())
                        if pid == r.provider_id
                    ],
                }
                for r in sorted(self.providers.values(), key=lambda r: r.provider_id)
            ],
            "queue_depth": len(self.queue),
            "leases": sum(len(r.leases) for r in self.providers.values()),
            "models": sorted({*self.by_model, *self._remembered(now)}),
        }

    def _remembered(self, now: float) -> list[str]:
        self.offline_models.sweep(now)
        return self.offline_models.names()


# ---- the task and its handle ------------------------------------------------------


@attrs.define(eq=False)
class RegistryClient:
    """A handle on the actor. Cheap to share; every call is one message."""

    _send: trio.MemorySendChannel[_Command]
    config: Config
    # The actor's state, for tests and introspection to *read*; never mutate it.
    state: RegistryState

    async def wait_for(self, predicate: Callable[[RegistryState], bool]) -> None:
        """Return once ``predicate(state)`` holds, re-checking after every message handled."""
        while not predicate(self.state):
            await self.state.changed.wait()

    async def register(self, record: ProviderRecord) -> None:
        """Add a provider; raise :class:`RegisterRefused` when the table will not take it."""
        reply, answer = trio.open_memory_channel[RegisterRefused | RegistryFault | None](1)
        await self._send.send(_Register(record, reply))
        refused = await answer.receive()
        if refused is not None:
            raise refused

    async def unregister(self, provider_id: str, session: int) -> None:
        await self._tell(_Unregister(provider_id, session))

    async def _tell(self, command: _Command) -> None:
        """Send without expecting an answer; an actor already shut down needs no news."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._send.send(command)

    async def snapshot(self) -> dict[str, Any]:
        reply, answer = trio.open_memory_channel[dict[str, Any] | RegistryFault](1)
        await self._send.send(_Snapshot(reply))
        result = await answer.receive()
        _raise_fault(result)
        assert not isinstance(result, RegistryFault)
        return result

    async def release(self, lease: Lease, outcome: Outcome) -> None:
        """Give a slot back with a health verdict. Idempotent; safe in cleanup."""
        if lease.released:
            return
        lease.released = True
        with trio.CancelScope(shield=True):
            await self._tell(_Release(lease, outcome))

    async def try_acquire(self, job: Job, exclude: frozenset[str]) -> Lease | None:
        """A free eligible provider now, or None. Never queues (the backup path)."""
        reply, answer = trio.open_memory_channel[Lease | Refused | RegistryFault | None](1)
        await self._send.send(_Acquire(job, exclude, None, False, object(), reply))
        # The actor answers at once (this never queues). Shielded, so a grant is
        # never dropped on the floor when the caller is cancelled meanwhile: the
        # caller records it at once and its cleanup releases it.
        with trio.CancelScope(shield=True):
            result = await answer.receive()
        _raise_fault(result)
        return result if isinstance(result, Lease) else None

    async def acquire(
        self, job: Job, exclude: frozenset[str] = frozenset(), avoid_version: str | None = None
    ) -> Lease | Refused:
        """A lease, waiting in the queue for up to ``queue_timeout`` when all slots are busy."""
        reply, answer = trio.open_memory_channel[Lease | Refused | RegistryFault | None](1)
        ticket = object()
        await self._send.send(_Acquire(job, exclude, avoid_version, True, ticket, reply))
        result: Lease | Refused | RegistryFault | None = None
        try:
            with trio.move_on_after(self.config.queue_timeout):
                result = await answer.receive()
        finally:
            if result is None:
                await self._withdraw(ticket, answer)
        _raise_fault(result)
        assert not isinstance(result, RegistryFault)
        if result is None:
            return Refused(Refusal.QUEUE_FULL, errors.overloaded(
                f"no provider slot became free within {self.config.queue_timeout:g}s"))
        return result

    async def _withdraw(
        self, ticket: object,
        answer: trio.MemoryReceiveChannel[Lease | Refused | RegistryFault | None],
    ) -> None:
        # The actor handles messages in order, so once the withdrawal is
        # acknowledged any grant it made earlier is already in our channel.
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            reply, ack = trio.open_memory_channel[RegistryFault | None](1)
            await self._send.send(_Withdraw(ticket, reply))
            await ack.receive()
            try:
                late = answer.receive_nowait()
            except trio.WouldBlock:
                return
            if isinstance(late, Lease):
                await self.release(late, CANCELLED)


async def serve_registry(
    config: Config,
    metrics: Metrics,
    *,
    task_status: trio.TaskStatus[RegistryClient] = trio.TASK_STATUS_IGNORED,
    capacity: int = 1024,
) -> None:
    """Run the actor until cancelled; report its client through ``task_status``."""
    send, receive = trio.open_memory_channel[_Command](capacity)
    state = RegistryState(config, metrics, random.Random(config.seed))
    # Read at scrape time from the table itself, so it cannot disagree with /status.
    metrics.cooldowns_active.set_function(lambda: state.cooldowns_active(trio.current_time()))
    client = RegistryClient(send, config, state)
    task_status.started(client)
    async with receive:
        async for command in receive:
            try:
                state.handle(command, trio.current_time())
            except Exception as exc:
                # One message's failure is that message's: the caller gets a
                # fault, the table and every other caller carry on.
                log.error("registry: %s message failed", type(command).__name__, exc_info=True)
                _answer_fault(command, RegistryFault(f"{type(command).__name__}: {exc!r}"[:300]))


def _answer_fault(command: _Command, fault: RegistryFault) -> None:
    reply = getattr(command, "reply", None)
    if reply is not None:
        # The handler may have answered before it failed; then that answer stands.
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            reply.send_nowait(fault)


def _raise_fault(result: object) -> None:
    if isinstance(result, RegistryFault):
        raise result

"""The registry actor: one task owns the routing state; everyone else sends it messages.

A mutation is one call on :class:`~coordinator.registry.state.RegistryState`,
which decides synchronously and returns what must be sent (a
:class:`~coordinator.registry.state.Done`: the queued requests it made
answerable, the events to share with other instances); the actor only sends
them. A read is answered from the state at once. Each message is handled inside
its own guard: one whose handling fails is logged with its type and answered
with a :class:`RegistryFault`, and the loop goes on. Handlers never await, so
every routing decision is made against a consistent table and in arrival
order. Replies use ``send_nowait`` on one-slot channels that nobody else writes
to, so the actor never blocks on a slow caller; each ask's reply is typed.

Nothing outside this module touches the state: other tasks ask (typed asks on
:class:`RegistryClient`), and the cooldown gauge reads what the actor publishes
after each batch (an immutable tuple). The queue wait budget is a cancel scope
in the *caller* (``acquire``); the actor only keeps the FIFO and withdraws
entries when asked.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

from coordinator.config import Config
from coordinator.metrics import Metrics
from coordinator.registry.breaker import BreakerKey
from coordinator.registry.mirror import SharedEvent
from coordinator.registry.state import (
    AcquireRequest,
    Done,
    RegisterRefused,
    RegistryState,
)
from coordinator.registry.table import (
    CANCELLED,
    Census,
    Decision,
    Evidence,
    Grant,
    Job,
    Lease,
    Outcome,
    ProviderRecord,
    Refusal,
    Refused,
    RegistrySnapshot,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryFault(Exception):
    """The actor failed to handle one message (a bug); the loop itself lives on."""


class RegistryStopped(RegistryFault):
    """The actor has stopped (the coordinator is shutting down): nobody will answer."""


# A reply channel: one answer of the ask's type, or the fault that handling it raised.
Reply = trio.MemorySendChannel[T | RegistryFault]

# ---- mutations: each returns a Done, which the actor sends


@attrs.frozen
class _Register:
    record: ProviderRecord
    reply: Reply[int | RegisterRefused | None]  # the superseded session's number, or why not


@attrs.frozen
class _Unregister:
    provider_id: str
    session: int


@attrs.frozen
class _Acquire:
    """May wait in the queue: answered now, or later by a mutation's answers."""

    request: AcquireRequest
    reply: Reply[Grant | Refused]


@attrs.frozen
class _TryAcquire:
    """Never queues: a grant now, or None (the speculative backup's path)."""

    request: AcquireRequest
    reply: Reply[Grant | None]
    cold_primary: bool = False  # the primary is loading a cold model: past the hedge budget


@attrs.frozen
class _Withdraw:
    ticket: object
    reply: Reply[Refused | None]


@attrs.frozen
class _Release:
    lease: Lease
    outcome: Outcome
    evidence: Evidence | None = None


@attrs.frozen
class _Mirror:
    """The providers another instance publishes (an empty list: it is gone)."""

    instance: str
    records: list[ProviderRecord]


@attrs.frozen
class _Reserve:
    """Another instance's request for a slot on one of this instance's providers."""

    lease: Lease
    reply: Reply[str | None]  # None when held, else why not


@attrs.frozen
class _Shared:
    """What the shared breaker and capacity events say (cluster/)."""

    cool: tuple[BreakerKey, float] | None = None  # key, seconds left
    clear: BreakerKey | None = None
    freed: tuple[str, int] | None = None  # provider id, slots in use
    renewed: str | None = None  # provider id


_Mutation = (_Register | _Unregister | _Acquire | _TryAcquire | _Withdraw | _Release | _Mirror
             | _Reserve | _Shared)

# ---- reads: answered from the state as it is between two messages


@attrs.frozen
class _Snapshot:
    reply: Reply[RegistrySnapshot]


@attrs.frozen
class _Census:
    reply: Reply[Census]


@attrs.frozen
class _Models:
    reply: Reply[tuple[str, ...]]


@attrs.frozen
class _Serves:
    model: str
    reply: Reply[bool]


@attrs.frozen
class _LeaseOf:
    provider_id: str
    request_id: str
    reply: Reply[Lease | None]


@attrs.frozen
class _Local:
    """Each provider connected here, as ``view`` makes it (run by the actor)."""

    view: Callable[[ProviderRecord], Any]
    reply: Reply[list[Any]]


_Read = _Snapshot | _Census | _Models | _Serves | _LeaseOf | _Local

# ---- the actor's own: where shared events go, and conditions to wait for


@attrs.frozen
class _ConnectOutbox:
    offer: Callable[[SharedEvent], None]
    reply: Reply[bool]  # True once connected


@attrs.frozen
class _Watch:
    """Answered once ``holds(state)`` is true, checked after each batch of messages."""

    holds: Callable[[RegistryState], bool]
    reply: Reply[bool]  # True once it holds


_Command = _Mutation | _Read | _ConnectOutbox | _Watch


@attrs.define(eq=False)
class _Actor:
    """The loop's side: the state, and where its answers go."""

    state: RegistryState
    waiting: dict[object, Reply[Grant | Refused]] = attrs.field(factory=dict)
    watchers: list[_Watch] = attrs.field(factory=list)
    outbox: Callable[[SharedEvent], None] | None = None  # the cluster seam, once connected
    # Published after each batch: when each cooldown ends (for the gauge, read at scrape).
    cooling_until: tuple[float, ...] = ()
    _breaker_seen: int = -1

    def handle(self, command: _Command, now: float) -> None:
        if isinstance(command, _Mutation):
            self._send(self._mutate(command, now))
        elif isinstance(command, _Read):
            self._answer(command, now)
        else:
            self._own(command)

    def _mutate(self, command: _Mutation, now: float) -> Done[Any]:
        state = self.state
        match command:
            case _Acquire(request, reply):
                acquired = state.acquire(request, now)
                if acquired.value is None:
                    self.waiting[request.ticket] = reply
                else:
                    reply.send_nowait(acquired.value)
                return acquired
            case _TryAcquire(request, reply, cold_primary):
                backup = state.try_acquire(request, now, cold_primary=cold_primary)
                reply.send_nowait(backup.value)
                return backup
            case _Release(lease, outcome, evidence):
                return state.release(lease, outcome, now, evidence)
            case _Withdraw(ticket, reply):
                withdrawn = state.withdraw(ticket, now)
                self.waiting.pop(ticket, None)
                reply.send_nowait(withdrawn.value)
                return withdrawn
            case _Register(record, reply):
                try:
                    registered = state.register(record, now)
                except RegisterRefused as refused:
                    reply.send_nowait(refused)
                    return Done(None)  # refused before anything changed
                old = registered.value
                # A record mirrored from another instance has no socket here to close.
                reply.send_nowait(old.session if old is not None and not old.instance else None)
                return registered
            case _Unregister(provider_id, session):
                return state.unregister(provider_id, session, now)
            case _Mirror(instance, records):
                return state.mirror(instance, records, now)
            case _Reserve(lease, reply):
                reserved = state.reserve(lease, now)
                reply.send_nowait(reserved.value)
                return reserved
            case _Shared(cool, clear, freed, renewed):
                done: Done[None] = Done(None)
                if renewed is not None:
                    done = done.then(state.renewed_remote(renewed, now))
                if cool is not None:
                    done = done.then(state.cool_remote(cool[0], cool[1], now))
                if clear is not None:
                    done = done.then(state.clear_remote(clear, now))
                if freed is not None:
                    done = done.then(state.freed_remote(freed[0], freed[1], now))
                return done

    def _send(self, done: Done[Any]) -> None:
        for ticket, answer in done.answers:
            reply = self.waiting.pop(ticket, None)
            if reply is not None:
                reply.send_nowait(answer)
        if self.outbox is not None:
            for event in done.shared:
                self.outbox(event)

    def _answer(self, command: _Read, now: float) -> None:
        state = self.state
        match command:
            case _Snapshot(reply):
                reply.send_nowait(state.snapshot(now))
            case _Census(reply):
                reply.send_nowait(state.census())
            case _Models(reply):
                reply.send_nowait(state.models_served())
            case _Serves(model, reply):
                reply.send_nowait(state.serves(model))
            case _LeaseOf(provider_id, request_id, reply):
                reply.send_nowait(state.lease_of(provider_id, request_id))
            case _Local(view, reply):
                reply.send_nowait(state.local(view))

    def _own(self, command: _ConnectOutbox | _Watch) -> None:
        match command:
            case _ConnectOutbox(offer, reply):
                self.outbox = offer
                reply.send_nowait(True)
            case _Watch():
                self.watchers.append(command)
                self._check_watchers()

    def after_batch(self) -> None:
        """Publish what other tasks read without asking; answer conditions now met."""
        breaker = self.state.breaker
        if breaker.version != self._breaker_seen:
            self._breaker_seen, self.cooling_until = breaker.version, breaker.cooling_until()
        if self.watchers:
            self._check_watchers()

    def cooldowns_active(self, now: float) -> int:
        return len(self.cooling_until) - bisect.bisect_right(self.cooling_until, now)

    def _check_watchers(self) -> None:
        waiting = []
        for watch in self.watchers:
            if watch.reply.statistics().open_receive_channels == 0:
                continue  # its caller stopped waiting
            try:
                held = watch.holds(self.state)
            except Exception as exc:
                log.error("registry: a watched condition failed", exc_info=True)
                _answer_fault(watch, RegistryFault(f"watch: {exc!r}"[:300]))
                continue
            if held:
                with contextlib.suppress(trio.BrokenResourceError):  # it stopped waiting
                    watch.reply.send_nowait(True)
            else:
                waiting.append(watch)
        self.watchers = waiting


# ---- the handle -------------------------------------------------------------------


@attrs.define(eq=False)
class RegistryClient:
    """A handle on the actor. Cheap to share; every call is one message."""

    _send: trio.MemorySendChannel[_Command]
    config: Config
    # The actor's state, for tests to look at between two messages. Production code
    # asks instead (tests/test_registry_state.py fails on any use outside the registry).
    _state_for_tests: RegistryState
    # Replaced after every message handled, so tests can wait for "the table changed".
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def _post(self, command: _Command) -> None:
        # Straight into the mailbox when it has room: ``send`` would pass through the
        # scheduler even then (a pass per registry message). Asking still checkpoints,
        # on the reply; a tell is a release or a notice, made from cleanup code.
        try:
            try:
                self._send.send_nowait(command)
            except trio.WouldBlock:
                await self._send.send(command)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise RegistryStopped("the registry has stopped") from None

    async def _post_asking(self, command: _Command) -> None:
        try:
            await self._post(command)
        except RegistryStopped:
            # A task cancelled with the actor (the coordinator stopping) ends cancelled,
            # as it would have at its next checkpoint; any other learns why.
            await trio.lowlevel.checkpoint()
            raise

    async def _ask(self, make: Callable[[Reply[T]], _Command]) -> T:
        reply, answer = trio.open_memory_channel[T | RegistryFault](1)
        await self._post_asking(make(reply))
        result = await answer.receive()
        if isinstance(result, RegistryFault):
            raise result
        return result

    async def _tell(self, command: _Command) -> None:
        """Send without expecting an answer; an actor already shut down needs no news."""
        with contextlib.suppress(RegistryStopped):
            await self._post(command)

    # -- providers
    async def register(self, record: ProviderRecord) -> int | None:
        """Add a provider; return the session it supersedes (the edge closes that one).

        Raises :class:`RegisterRefused` when the table will not take it.
        """
        result: int | RegisterRefused | None = await self._ask(
            lambda reply: _Register(record, reply))
        if isinstance(result, RegisterRefused):
            raise result
        return result

    async def unregister(self, provider_id: str, session: int) -> None:
        await self._tell(_Unregister(provider_id, session))

    # -- routing
    async def try_acquire(self, job: Job, exclude: frozenset[str], *,
                          cold_primary: bool = False) -> Grant | None:
        """A free eligible provider now, or None. Never queues (the backup path)."""
        # Shielded, so a grant is never dropped on the floor when the caller is
        # cancelled meanwhile: the caller records it at once and its cleanup releases it.
        with trio.CancelScope(shield=True):
            result: Grant | None = await self._ask(lambda reply: _TryAcquire(
                AcquireRequest(job, exclude), reply, cold_primary))
        return result

    async def acquire(
        self, job: Job, exclude: frozenset[str] = frozenset(), avoid_version: str | None = None
    ) -> Grant | Refused:
        """A grant, waiting in the queue for up to ``queue_timeout`` when all slots are busy."""
        request = AcquireRequest(job, exclude, avoid_version)
        reply, answer = trio.open_memory_channel[Grant | Refused | RegistryFault](1)
        await self._post_asking(_Acquire(request, reply))
        result: Decision | RegistryFault = None
        why: Refused | None = None
        try:  # cancelled before the answer (even at once): withdrawn, and a late grant released
            with trio.move_on_after(self.config.queue_timeout):
                result = await answer.receive()
        finally:
            if result is None:
                why = await self._withdraw(request.ticket, answer)
        if isinstance(result, RegistryFault):
            raise result
        if result is None:
            return why or Refused(Refusal.QUEUE_TIMEOUT, "no provider slot became free within "
                                  f"{self.config.queue_timeout:g}s")
        return result

    async def _withdraw(self, ticket: object,
                        answer: trio.MemoryReceiveChannel[Grant | Refused | RegistryFault],
                        ) -> Refused | None:
        """Leave the queue; why the wait was in vain when the actor knows better than
        "no slot came free" (the model's providers all went)."""
        # The actor handles messages in order, so once the withdrawal is
        # acknowledged any grant it made earlier is already in our channel.
        why: Refused | None = None
        with trio.CancelScope(shield=True), trio.move_on_after(self.config.withdraw_timeout):
            why = await self._ask(lambda reply: _Withdraw(ticket, reply))
            try:
                late = answer.receive_nowait()
            except trio.WouldBlock:
                return why
            if isinstance(late, Grant):
                await self.release(late.lease, CANCELLED)
        return why

    async def release(self, lease: Lease, outcome: Outcome,
                      evidence: Evidence | None = None) -> None:
        """Give a slot back with a health verdict (and what was learned). Shielded."""
        with trio.CancelScope(shield=True):
            await self._tell(_Release(lease, outcome, evidence))

    # -- scale-out (cluster/)
    async def mirror(self, instance: str, records: list[ProviderRecord]) -> None:
        await self._tell(_Mirror(instance, records))

    async def reserve(self, lease: Lease) -> str | None:
        """Hold a slot here for another instance's request: None, or why not."""
        with trio.CancelScope(shield=True):  # a held slot is never dropped on the floor
            result: str | None = await self._ask(lambda reply: _Reserve(lease, reply))
        return result

    async def shared(self, *, cool: tuple[BreakerKey, float] | None = None,
                     clear: BreakerKey | None = None, freed: tuple[str, int] | None = None,
                     renewed: str | None = None) -> None:
        """What another instance said: a cooldown (key, seconds left), a cleared key, a
        freed slot (provider id, slots in use), a provider's new session."""
        await self._tell(_Shared(cool, clear, freed, renewed))

    async def connect_outbox(self, offer: Callable[[SharedEvent], None]) -> None:
        """Hand the events to share with other instances to ``offer`` from now on
        (wiring, before any provider is admitted); ``offer`` must never block."""
        connected: bool = await self._ask(lambda reply: _ConnectOutbox(offer, reply))
        assert connected

    # -- reads: asks, answered between two messages
    async def snapshot(self) -> RegistrySnapshot:
        return await self._ask(_Snapshot)

    async def census(self) -> Census:
        """Providers online and requests queued (/healthz)."""
        return await self._ask(_Census)

    async def models(self) -> tuple[str, ...]:
        """The models some provider serves now, sorted (/v1/models)."""
        return await self._ask(_Models)

    async def serves(self, model: str) -> bool:
        return await self._ask(lambda reply: _Serves(model, reply))

    async def lease_of(self, provider_id: str, request_id: str) -> Lease | None:
        """The lease a request holds on a provider, while it holds it."""
        return await self._ask(lambda reply: _LeaseOf(provider_id, request_id, reply))

    async def local_providers(self, view: Callable[[ProviderRecord], T]) -> list[T]:
        """Each provider connected to this instance, as ``view`` makes it: ``view`` runs in
        the actor and must return a value that does not refer to the record."""
        result: list[T] = await self._ask(lambda reply: _Local(view, reply))
        return result

    # -- waiting for the table
    async def wait_for(self, holds: Callable[[RegistryState], bool]) -> None:
        """Return once ``holds(state)`` is true: checked by the actor, after each batch of
        messages (tests, and the helpers below)."""
        reply, answer = trio.open_memory_channel[bool | RegistryFault](1)
        with answer:  # closed however the wait ends: the actor drops an abandoned watch
            await self._post_asking(_Watch(holds, reply))
            result = await answer.receive()
        if isinstance(result, RegistryFault):
            raise result

    async def wait_for_providers(self, at_least: int) -> None:
        """Return once ``at_least`` providers are online (the demo, the embedded load run)."""
        await self.wait_for(lambda state: state.census().providers >= at_least)

    async def wait_for_provider(self, provider_id: str) -> None:
        """Return once ``provider_id`` is online."""
        await self.wait_for(lambda state: provider_id in state.providers)


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
    actor = _Actor(state)
    # At scrape time, from what the actor published after its last batch.
    metrics.cooldowns_active.set_function(lambda: actor.cooldowns_active(trio.current_time()))
    client = RegistryClient(send, config, state_for_tests=state)
    task_status.started(client)
    async with receive:
        async for command in receive:
            _handle_isolated(actor, client, command)
            # The rest of the mailbox too, before waiting again: one pass through the
            # scheduler per wake-up, not per message (no message awaits anything).
            while True:
                try:
                    command = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break  # (once closed, the loop above ends)
                _handle_isolated(actor, client, command)
            actor.after_batch()


def _handle_isolated(actor: _Actor, client: RegistryClient, command: _Command) -> None:
    try:
        actor.handle(command, trio.current_time())
    except Exception as exc:
        # One message's failure is that message's: the caller gets a fault, the table
        # and every other caller carry on (what a failed mutation left to answer or to
        # share goes out with the next one's Done).
        log.error("registry: %s message failed", type(command).__name__, exc_info=True)
        _answer_fault(command, RegistryFault(f"{type(command).__name__}: {exc!r}"[:300]))
    finally:
        client.changed.set()
        client.changed = trio.Event()


def _answer_fault(command: _Command, fault: RegistryFault) -> None:
    reply = getattr(command, "reply", None)
    if reply is not None:
        # The handler may have answered before it failed; then that answer stands.
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            reply.send_nowait(fault)

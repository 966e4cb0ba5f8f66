"""The registry actor: one task owns the routing state; everyone else sends it messages.

Each message is one call on :class:`~coordinator.registry.state.RegistryState`,
made inside its own guard: a message whose handling fails is logged with its
type and answered with a :class:`RegistryFault`, and the loop goes on. Handlers
never await, so every routing decision is made against a consistent table and
in arrival order. Replies use ``send_nowait`` on one-slot channels that
nobody else writes to, so the actor never blocks on a slow caller.

The queue wait budget is a cancel scope in the *caller* (``acquire``); the
actor only keeps the FIFO and withdraws entries when asked.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

from coordinator.config import Config
from coordinator.metrics import Metrics
from coordinator.registry.state import (
    AcquireRequest,
    Decision,
    Refusal,
    Refused,
    RegisterRefused,
    RegistryState,
)
from coordinator.registry.table import (
    CANCELLED,
    Evidence,
    Grant,
    Job,
    Lease,
    Outcome,
    ProviderRecord,
    RegistrySnapshot,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryFault(Exception):
    """The actor failed to handle one message (a bug); the loop itself lives on."""


Reply = trio.MemorySendChannel[Any]


@attrs.frozen
class _Register:
    record: ProviderRecord
    reply: Reply  # the superseded session's number, None, or RegisterRefused


@attrs.frozen
class _Unregister:
    provider_id: str
    session: int


@attrs.frozen
class _Acquire:
    """May wait in the queue: answered now, or later by a drain."""

    request: AcquireRequest
    reply: Reply


@attrs.frozen
class _TryAcquire:
    """Never queues: a grant now, or None (the speculative backup's path)."""

    request: AcquireRequest
    reply: Reply
    cold_primary: bool = False  # the primary is loading a cold model: past the hedge budget


@attrs.frozen
class _Withdraw:
    ticket: object
    reply: Reply


@attrs.frozen
class _Release:
    lease: Lease
    outcome: Outcome
    evidence: Evidence | None = None


@attrs.frozen
class _Snapshot:
    reply: Reply


@attrs.frozen
class _Mirror:
    """The providers another instance publishes (an empty list: it is gone)."""

    instance: str
    records: list[ProviderRecord]


@attrs.frozen
class _Reserve:
    """Another instance's request for a slot on one of this instance's providers."""

    lease: Lease
    reply: Reply  # None when held, else why not


@attrs.frozen
class _Shared:
    """What the shared breaker and capacity events say (cluster/)."""

    cool: tuple[tuple[str, str, str], float] | None = None  # key, seconds left
    clear: tuple[str, str, str] | None = None
    freed: tuple[str, int] | None = None  # provider id, slots in use
    renewed: str | None = None  # provider id


_Command = (_Register | _Unregister | _Acquire | _TryAcquire | _Withdraw | _Release | _Snapshot
            | _Mirror | _Reserve | _Shared)


@attrs.define(eq=False)
class _Actor:
    """The loop's side: the state, and the reply channels of queued requests."""

    state: RegistryState
    waiting: dict[object, Reply] = attrs.field(factory=dict)

    def handle(self, command: _Command, now: float) -> None:
        """Apply ``command``, then answer every queued request it made answerable.

        The re-check runs after *every* message, not per message type: a departure
        or a cooldown announced by another instance once left the queue waiting
        out its whole budget for a 503 it could have had at once. It costs nothing
        when the message touched no model with waiters (``RegistryState.drain``
        looks only at the models marked since the last one).
        """
        try:
            self._apply(command, now)
        finally:
            self._answer_drained(now)

    def _apply(self, command: _Command, now: float) -> None:
        state = self.state
        match command:
            case _Acquire(request, reply):
                decision = state.acquire(request, now)
                if decision is None:
                    self.waiting[request.ticket] = reply
                else:
                    reply.send_nowait(decision)
            case _TryAcquire(request, reply, cold_primary):
                reply.send_nowait(state.try_acquire(request, now, cold_primary=cold_primary))
            case _Release(lease, outcome, evidence):
                state.release(lease, outcome, now, evidence)
            case _Withdraw(ticket, reply):
                why = state.withdraw(ticket, now)
                self.waiting.pop(ticket, None)
                reply.send_nowait(why)
            case _Register(record, reply):
                try:
                    old = state.register(record, now)
                except RegisterRefused as refused:
                    reply.send_nowait(refused)
                    return
                # A record mirrored from another instance has no socket here to close.
                reply.send_nowait(old.session if old is not None and not old.instance else None)
            case _Unregister(provider_id, session):
                state.unregister(provider_id, session, now)
            case _Snapshot(reply):
                reply.send_nowait(state.snapshot(now))
            case _Mirror(instance, records):
                state.mirror(instance, records, now)
            case _Reserve(lease, reply):
                reply.send_nowait(state.reserve(lease, now))
            case _Shared(cool, clear, freed, renewed):
                if renewed is not None:
                    state.renewed_remote(renewed)
                if cool is not None:
                    state.cool_remote(cool[0], cool[1], now)
                if clear is not None:
                    state.clear_remote(clear)
                if freed is not None:
                    state.freed_remote(freed[0], freed[1], now)

    def _answer_drained(self, now: float) -> None:
        for ticket, decision in self.state.drain(now):
            reply = self.waiting.pop(ticket, None)
            if reply is not None:
                reply.send_nowait(decision)


# ---- the handle -------------------------------------------------------------------


@attrs.define(eq=False)
class RegistryClient:
    """A handle on the actor. Cheap to share; every call is one message."""

    _send: trio.MemorySendChannel[_Command]
    config: Config
    # The actor's state, to *read* synchronously (between two messages) where asking
    # would cost a snapshot: health, model lists, tests (docs/architecture.md). Never
    # mutate it; the one exception is wiring (app.py sets its outbox before start).
    state: RegistryState
    # Replaced after every message handled, so observers can wait for "the table changed".
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def wait_for(self, predicate: Callable[[RegistryState], bool]) -> None:
        """Return once ``predicate(state)`` holds, re-checking after every message handled."""
        while not predicate(self.state):
            await self.changed.wait()

    async def _post(self, command: _Command) -> None:
        # Straight into the mailbox when it has room: ``send`` would pass through the
        # scheduler even then (a pass per registry message). Asking still checkpoints,
        # on the reply; a tell is a release or a notice, made from cleanup code.
        try:
            self._send.send_nowait(command)
        except trio.WouldBlock:
            await self._send.send(command)

    async def _ask(self, make: Callable[[Reply], _Command]) -> Any:
        reply, answer = trio.open_memory_channel[Any](1)
        await self._post(make(reply))
        result = await answer.receive()
        if isinstance(result, RegistryFault):
            raise result
        return result

    async def _tell(self, command: _Command) -> None:
        """Send without expecting an answer; an actor already shut down needs no news."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._post(command)

    async def register(self, record: ProviderRecord) -> int | None:
        """Add a provider; return the session it supersedes (the edge closes that one).

        Raises :class:`RegisterRefused` when the table will not take it.
        """
        result = await self._ask(lambda reply: _Register(record, reply))
        if isinstance(result, RegisterRefused):
            raise result
        return result  # type: ignore[no-any-return]

    async def unregister(self, provider_id: str, session: int) -> None:
        await self._tell(_Unregister(provider_id, session))

    async def snapshot(self) -> RegistrySnapshot:
        return await self._ask(_Snapshot)  # type: ignore[no-any-return]

    async def release(self, lease: Lease, outcome: Outcome,
                      evidence: Evidence | None = None) -> None:
        """Give a slot back with a health verdict (and what was learned). Shielded."""
        with trio.CancelScope(shield=True):
            await self._tell(_Release(lease, outcome, evidence))

    async def mirror(self, instance: str, records: list[ProviderRecord]) -> None:
        await self._tell(_Mirror(instance, records))

    async def reserve(self, lease: Lease) -> str | None:
        """Hold a slot here for another instance's request: None, or why not."""
        with trio.CancelScope(shield=True):  # a held slot is never dropped on the floor
            result: str | None = await self._ask(lambda reply: _Reserve(lease, reply))
        return result

    async def shared(self, **news: Any) -> None:
        await self._tell(_Shared(**news))

    async def try_acquire(self, job: Job, exclude: frozenset[str], *,
                          cold_primary: bool = False) -> Grant | None:
        """A free eligible provider now, or None. Never queues (the backup path)."""
        # Shielded, so a grant is never dropped on the floor when the caller is
        # cancelled meanwhile: the caller records it at once and its cleanup releases it.
        with trio.CancelScope(shield=True):
            result = await self._ask(lambda reply: _TryAcquire(
                AcquireRequest(job, exclude), reply, cold_primary))
        return result  # type: ignore[no-any-return]

    async def acquire(
        self, job: Job, exclude: frozenset[str] = frozenset(), avoid_version: str | None = None
    ) -> Grant | Refused:
        """A grant, waiting in the queue for up to ``queue_timeout`` when all slots are busy."""
        request = AcquireRequest(job, exclude, avoid_version)
        reply, answer = trio.open_memory_channel[Any](1)
        await self._post(_Acquire(request, reply))
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
                        answer: trio.MemoryReceiveChannel[Any]) -> Refused | None:
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
    actor = _Actor(state)
    client = RegistryClient(send, config, state)
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


def _handle_isolated(actor: _Actor, client: RegistryClient, command: _Command) -> None:
    try:
        actor.handle(command, trio.current_time())
    except Exception as exc:
        # One message's failure is that message's: the caller gets a
        # fault, the table and every other caller carry on.
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

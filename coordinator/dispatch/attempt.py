"""The dispatch engine: attempts, racers and the deferred commit (docs/architecture.md).

A request gets up to ``max_attempts`` attempts, each one nursery: the **primary**
racer on the registry's choice; at the hedge delay, if the primary has neither
committed nor failed, a **backup** on another eligible provider (happy eyeballs;
asked for again, with backoff, while refused). Each racer runs in its own budget,
a cancel scope whose deadline moves only as its own provider earns it
(:func:`.race.step` decides). The first racer with *content* commits: it hands
itself to the relay, which the request owns from then on, and cancels the nursery.

Before the commit nothing reaches the consumer, so any failure is retried
invisibly. Every racer but the winner closes itself, once, when its task ends;
the winner is closed by the relay, once.
"""

from __future__ import annotations

import logging
from collections import deque

import attrs
import trio

from coordinator.config import Config
from coordinator.lifecycle import Drain
from coordinator.metrics import Metrics
from coordinator.protocol import InferenceRequest, RequestCipher
from coordinator.providers.connection import Directory, ProviderGone, ended_stream
from coordinator.registry.actor import RegistryClient
from coordinator.registry.state import Refusal, Refused
from coordinator.registry.table import Evidence, Grant, Lease, Outcome
from coordinator.untrusted import printable

from . import race
from .race import Broken, Commit, Expired, Fail, Failure, Hold, Phase, RacerState, Sent
from .request import Committed, DispatchFailed, FailureKind, Handover, Racer, RequestContext

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class _Attempt:
    ctx: RequestContext
    deadlines: race.Deadlines
    handover: Handover
    nursery: trio.Nursery
    winner: Committed | None = None
    failures: list[Failure] = attrs.field(factory=list)
    primary_settled: trio.Event = attrs.field(factory=trio.Event)
    primary: Racer | None = None


@attrs.define(eq=False, kw_only=True)
class Dispatcher:
    # Collaborators are named and required: a private default would split their state.
    config: Config
    registry: RegistryClient
    metrics: Metrics
    directory: Directory
    drain: Drain
    # Pre-content failures that were retried, newest last (for the status page).
    failovers: deque[tuple[float, str, Failure]] = attrs.field(factory=lambda: deque(maxlen=50))
    limits: race.Limits = attrs.field(
        default=attrs.Factory(lambda self: race.Limits.from_config(self.config), takes_self=True))

    async def dispatch(self, ctx: RequestContext, handover: Handover) -> Committed:
        """Run attempts until one commits and is handed over; raise :class:`DispatchFailed`
        when none can. Waiting for a provider ends with the drain, if one begins."""
        with self.drain.bounded():
            return await self._dispatch(ctx, handover)
        raise DispatchFailed(FailureKind.SHUTDOWN)

    async def _dispatch(self, ctx: RequestContext, handover: Handover) -> Committed:
        failures: list[Failure] = []
        for attempt in range(1, self.config.max_attempts + 1):
            ctx.attempts = attempt
            exclude = frozenset(f.provider_id for f in failures)
            with ctx.timing.measure("route"):
                granted = await self.registry.acquire(
                    ctx.job, exclude, failures[-1].version if failures else None)
            if isinstance(granted, Refused):  # with failures: nobody left to try, they say why
                if failures and granted.kind not in (Refusal.QUEUE_FULL, Refusal.QUEUE_TIMEOUT):
                    break
                raise DispatchFailed(FailureKind.REFUSED, tuple(failures), granted)
            ctx.timing.queue += granted.queued
            outcome = await self._attempt(ctx, granted, exclude, handover)
            if isinstance(outcome, Committed):
                self.metrics.dispatches.labels("success").inc()
                return outcome
            failures.extend(outcome)
            if race.rejected(outcome) is not None:
                self.metrics.dispatches.labels("rejected").inc()
                raise DispatchFailed(FailureKind.REJECTED, tuple(failures))
            if attempt < self.config.max_attempts:
                self.metrics.dispatches.labels(race.retry_label(outcome)).inc()
                self.failovers.extend((trio.current_time(), ctx.job.request_id, f)
                                      for f in outcome)
        self.metrics.dispatches.labels("failure").inc()
        raise DispatchFailed(FailureKind(race.exhausted(failures)), tuple(failures))

    async def _attempt(self, ctx: RequestContext, grant: Grant, exclude: frozenset[str],
                       handover: Handover) -> Committed | list[Failure]:
        primary = grant.lease
        deadlines = self.limits.deadlines(trio.current_time(), ctx.job.prompt_tokens,
                                          grant.hedge_after)
        async with trio.open_nursery() as nursery:
            attempt = _Attempt(ctx, deadlines, handover, nursery)
            self._start_racer(attempt, primary, is_backup=False)
            if self.config.speculative_backup:
                await self._hedge(attempt, exclude | {primary.provider_id})
        return attempt.winner or attempt.failures

    async def _hedge(self, attempt: _Attempt, exclude: frozenset[str]) -> None:
        # A refused backup is asked for again (Deadlines.hedge_asks): a primary
        # holding boilerplate could otherwise keep its consumer for 90 s.
        for ask_at in attempt.deadlines.hedge_asks():
            with trio.move_on_at(ask_at):
                await attempt.primary_settled.wait()
            if attempt.primary_settled.is_set():
                return
            cold = attempt.primary is not None and attempt.primary.state.phase is Phase.ACCEPTED
            if (backup := await self.registry.try_acquire(attempt.ctx.job, exclude,
                                                          cold_primary=cold)) is not None:
                self.metrics.speculative.inc()
                log.info("request %s: speculative backup on %s", attempt.ctx.job.request_id,
                         printable(backup.lease.provider_id))
                return self._start_racer(attempt, backup.lease, is_backup=True)

    def _start_racer(self, attempt: _Attempt, lease: Lease, *, is_backup: bool) -> None:
        # Synchronous from the grant to start_soon: the racer's task is the one
        # owner of its lease, even if cancelled before its first step.
        connection = self.directory.get(lease.provider_id, lease.session, lease.instance)
        try:
            events = ended_stream() if connection is None else connection.open_stream(
                lease.request_id)
            cipher = None if connection is None else RequestCipher(connection.public_key)
        except ProviderGone:
            events, cipher = ended_stream(), None
        deadlines = attempt.deadlines
        deadline = deadlines.backup_ttft(trio.current_time()) if is_backup else deadlines.ttft
        state = RacerState(lease.provider_id, lease.version, deadline)
        racer = Racer(lease, connection, events, cipher, state, is_backup)
        if not is_backup:
            attempt.primary = racer
        attempt.ctx.providers_tried.append(lease.provider_id)
        attempt.nursery.start_soon(self._run_racer, attempt, racer)

    async def _run_racer(self, attempt: _Attempt, racer: Racer) -> None:
        decision: Commit | Fail | None = None
        try:
            decision = await self._race(attempt, racer)
        finally:
            if decision is None:  # lost the race (evidence of slowness), or was cancelled
                withdraw = race.withdraw(racer.state, trio.current_time(),
                                         lost=attempt.winner is not None)
                await self.close(racer, withdraw.verdict, cancel=withdraw.cancel_provider,
                                 evidence=withdraw.evidence)
            elif isinstance(decision, Fail):
                await self.close(racer, decision.verdict, cancel=decision.cancel_provider)
        if isinstance(decision, Fail):
            attempt.failures.append(decision.failure)
            if decision.failure.status in race.DETERMINISTIC:
                        attempt.nursery.cancel_scope.cancel(reason="a provider rejected the request")
        if not racer.is_backup:
            attempt.primary_settled.set()

    async def _race(self, attempt: _Attempt, racer: Racer) -> Commit | Fail | None:
        """Run one racer in its own budget until it commits, fails, or loses (None)."""
        with trio.CancelScope(deadline=racer.state.ttft_deadline) as budget:
            sent = await self._send(attempt.ctx, racer)
            if isinstance(sent, Fail):
                return sent
            async for event in racer.events:
                decision = self._step(racer, racer.observe(event, attempt.ctx.endpoint))
                match decision:
                    case Hold(extend_to=float() as deadline):
                        budget.deadline = max(budget.deadline, deadline)  # budgets only grow
                    case Commit():
                        return self._commit(attempt, racer, decision)
                    case Fail():
                        return decision
            return self._gone(racer)
        expired = self._step(racer, Expired())
        assert isinstance(expired, Fail)
        return expired

    async def _send(self, ctx: RequestContext, racer: Racer) -> Hold | Fail:
        if racer.connection is None or racer.cipher is None:
            return self._gone(racer)
        with ctx.timing.measure("encrypt"):
            sealed = racer.cipher.seal_body(ctx.plaintext)
        began = trio.current_time()
        try:
            # Cancelled here (a backup granted as the race was decided), nothing was
            # written (wsio): the racer stays STARTING, with nothing to cancel or prove.
            await racer.connection.send(InferenceRequest(racer.lease.request_id, sealed))
        except ProviderGone:
            return self._gone(racer)
        decision = race.step(racer.state, Sent(), began, self.limits)
        assert isinstance(decision, Hold)
        return decision

    def _gone(self, racer: Racer) -> Fail:
        decision = self._step(racer, Broken(racer.end_reason()))
        assert isinstance(decision, Fail)
        return decision

    def _step(self, racer: Racer, observation: race.Observation) -> race.Decision:
        return race.step(racer.state, observation, trio.current_time(), self.limits)

    def _commit(self, attempt: _Attempt, racer: Racer, commit: Commit) -> Commit | None:
        if attempt.winner is not None:
            return None  # the other racer got there first: this one lost
        ctx = attempt.ctx
        ctx.timing.committed(trio.current_time(), racer.state.sent_at)
        attempt.winner = Committed(racer, commit.events, commit.usage, ctx.attempts,
                                   ctx.endpoint, trio.current_time(), ctx.job.prompt_tokens)
        self.metrics.time_to_first_content.observe(ctx.timing.first_content)
        if racer.is_backup:
            self.metrics.speculative_wins.inc()
        attempt.handover(attempt.winner)  # the relay owns the winner from here
        attempt.nursery.cancel_scope.cancel(reason="the race is decided")
        return commit

    async def close(self, racer: Racer, outcome: Outcome, *, cancel: bool,
                    evidence: Evidence | None = None) -> None:
        """Release a racer's stream and slot, telling the provider to stop if ``cancel``."""
        request_id = racer.lease.request_id
        with trio.CancelScope(shield=True):
            if racer.connection is not None:
                racer.connection.close_stream(request_id)
                if cancel:
                    with trio.move_on_after(self.config.cancel_send_timeout):
                        await racer.connection.send_cancel(request_id)
            await self.registry.release(racer.lease, outcome, evidence)

"""The dispatch engine: attempts, racers and the deferred commit.

Theory of operation
-------------------
A request gets up to ``max_attempts`` attempts. An attempt is one nursery:

* the **primary** racer is started on the provider the registry chose;
* at ``backup_fraction`` of the TTFT budget, if the primary has neither
  committed nor failed, a **backup** racer is started on another eligible
  provider with a free slot (happy eyeballs);
* each racer holds boilerplate (role-only deltas, lifecycle events) and the
  first racer to see *content* commits: it becomes the winner and cancels
  the nursery, which cancels the loser;
* the attempt's budget is one cancel scope. Its deadline starts at the TTFT
  deadline, moves to TTFT + ``preamble_timeout`` when a racer holds
  boilerplate, and to dispatch + ``inference_timeout`` when a provider says
  ``inference_accepted`` (a cold model load). Nothing else keeps time.

Before the commit nothing reaches the consumer, so any failure (error frame,
disconnect, undecryptable chunk, budget expiry) is retried invisibly on
another provider. The winner's stream is handed to the relay; everything else
is cleaned up here, exactly once, when the attempt's nursery has closed.
"""

from __future__ import annotations

import enum
import json
import logging
from collections import deque
from typing import Final

import attrs
import trio

from coordinator import errors
from coordinator.config import Config
from coordinator.lifecycle import Drain
from coordinator.metrics import Metrics
from coordinator.protocol import (
    DecryptError,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    RequestCipher,
)
from coordinator.providers.connection import (
    EventStream,
    ProviderConnection,
    ProviderGone,
    ended_stream,
)
from coordinator.registry.actor import CANCELLED, Outcome, Refusal, Refused, RegistryClient
from coordinator.registry.table import Job, Lease

from .chunks import ChunkError, ChunkKind, Endpoint, Event, parse_chunk

log = logging.getLogger(__name__)

DISCONNECTED: Final = 502
TIMEOUT: Final = 504
# Provider statuses that say the request itself is wrong (a prompt longer than the
# model's context, a bad parameter): another provider would answer the same, so
# the request ends at once with that status. docs/architecture.md has the table.
DETERMINISTIC: Final = frozenset({400, 404, 413, 422})


class Phase(enum.Enum):
    STARTING = "starting"
    SENT = "sent"  # request is on the wire, nothing heard yet
    ACCEPTED = "accepted"  # provider is loading the model
    PREAMBLE = "preamble"  # holding boilerplate, no content yet
    DONE = "done"


@attrs.define(eq=False)
class Timing:
    """Microsecond breakdown sent back in ``X-Timing``."""

    started: float
    parse: float = 0.0
    route: float = 0.0
    queue: float = 0.0
    encrypt: float = 0.0
    dispatch: float = 0.0
    first_content: float = 0.0

    def header(self) -> str:
        fields = ("parse", "route", "queue", "encrypt", "dispatch", "first_content")
        return ",".join(f"{f}={round(getattr(self, f) * 1e6)}" for f in fields)


@attrs.define(eq=False)
class RequestContext:
    """One consumer request as the dispatcher sees it."""

    job: Job
    endpoint: Endpoint
    plaintext: bytes  # the consumer body plus the target endpoint
    stream: bool
    timing: Timing
    # Filled as the request walks, for logs and headers.
    attempts: int = 0
    providers_tried: list[str] = attrs.field(factory=list)


@attrs.frozen
class Failure:
    provider_id: str
    version: str
    status: int
    message: str
    timeout: bool = False
    after_boilerplate: bool = False


@attrs.define(eq=False)
class Racer:
    """One provider working on one request within one attempt."""

    lease: Lease
    is_backup: bool
    cipher: RequestCipher
    events: EventStream
    phase: Phase = Phase.STARTING
    sent_at: float = 0.0
    held: list[Event] = attrs.field(factory=list)
    closed: bool = False

    @property
    def connection(self) -> ProviderConnection:
        conn: ProviderConnection = self.lease.connection
        return conn

    def failure(self, status: int, message: str, *, timeout: bool = False) -> Failure:
        return Failure(self.lease.provider_id, self.lease.version, status, message, timeout,
                       after_boilerplate=bool(self.held))


@attrs.define(eq=False)
class Committed:
    """The winner of an attempt: its stream now belongs to the relay."""

    racer: Racer
    chunks: list[Event]  # held boilerplate, then the first content event (if any)
    complete: InferenceComplete | None  # set when the provider closed cleanly pre-content
    attempts: int
    endpoint: Endpoint


@attrs.define(eq=False)
class _Race:
    ctx: RequestContext
    budget: trio.CancelScope
    ttft_deadline: float
    nursery: trio.Nursery | None = None
    racers: list[Racer] = attrs.field(factory=list)
    winner: Committed | None = None
    failures: list[Failure] = attrs.field(factory=list)
    primary_settled: trio.Event = attrs.field(factory=trio.Event)

    def extend(self, deadline: float) -> None:
        # Budgets only ever grow; an extension is a move of the one deadline.
        self.budget.deadline = max(self.budget.deadline, deadline)


@attrs.define(eq=False)
class Dispatcher:
    config: Config
    registry: RegistryClient
    metrics: Metrics
    drain: Drain = attrs.field(factory=Drain)
    # Racers whose stream and slot are not yet released (for tests and status).
    active: set[Racer] = attrs.field(factory=set)
    # Pre-content failures that were retried, newest last (for the status page).
    failovers: deque[tuple[float, str, Failure]] = attrs.field(factory=lambda: deque(maxlen=50))

    async def dispatch(self, ctx: RequestContext) -> Committed:
        """Run attempts until one commits; raise :class:`ApiError` when none can."""
        failures: list[Failure] = []
        for attempt in range(1, self.config.max_attempts + 1):
            ctx.attempts = attempt
            exclude = frozenset(f.provider_id for f in failures)
            avoid = failures[-1].version if failures else None
            started = trio.current_time()
            granted = await self.registry.acquire(ctx.job, exclude, avoid)
            ctx.timing.route += trio.current_time() - started
            if isinstance(granted, Refused):
                raise self._refusal(granted, failures)
            ctx.timing.queue += granted.queued
            outcome = await self._attempt(ctx, granted, exclude)
            if isinstance(outcome, Committed):
                self.metrics.dispatches.labels("success").inc()
                return outcome
            failures.extend(outcome)
            rejected = next((f for f in outcome if f.status in DETERMINISTIC), None)
            if rejected is not None:
                self.metrics.dispatches.labels("rejected").inc()
                raise errors.rejected_by_provider(rejected.status, rejected.message)
            if attempt < self.config.max_attempts:
                self.metrics.dispatches.labels(_retry_label(outcome)).inc()
                now = trio.current_time()
                self.failovers.extend((now, ctx.job.request_id, f) for f in outcome)
        self.metrics.dispatches.labels("failure").inc()
        raise exhausted(failures)

    def _refusal(self, refused: Refused, failures: list[Failure]) -> errors.ApiError:
        if failures and refused.kind is not Refusal.QUEUE_FULL:
            self.metrics.dispatches.labels("failure").inc()
            return exhausted(failures)
        return refused.error

    async def _attempt(
        self, ctx: RequestContext, primary: Lease, exclude: frozenset[str]
    ) -> Committed | list[Failure]:
        start = trio.current_time()
        ttft = self.config.ttft_base + self.config.ttft_per_prompt_token * ctx.job.prompt_tokens
        race = _Race(ctx, trio.CancelScope(deadline=start + ttft), start + ttft)
        try:
            with race.budget:
                async with trio.open_nursery() as nursery:
                    race.nursery = nursery
                    self._start_racer(race, primary, is_backup=False)
                    if self.config.speculative_backup:
                        with trio.move_on_at(start + ttft * self.config.backup_fraction):
                            await race.primary_settled.wait()
                        if not race.primary_settled.is_set():
                            await self._start_backup(race, exclude | {primary.provider_id})
        except BaseException:
            # Cancelled from outside (the consumer left) after a commit: the
            # winner never reaches the relay, so it is released here.
            if race.winner is not None:
                await self._close(race.winner.racer, CANCELLED, send_cancel=True)
            raise
        finally:
            await self._close_losers(race)
        if race.winner is not None:
            return race.winner
        return race.failures

    async def _start_backup(self, race: _Race, exclude: frozenset[str]) -> None:
        backup = await self.registry.try_acquire(race.ctx.job, exclude)
        if backup is None:
            return
        self.metrics.speculative.inc()
        log.info("request %s: speculative backup on %s", race.ctx.job.request_id,
                 backup.provider_id)
        self._start_racer(race, backup, is_backup=True)

    def _start_racer(self, race: _Race, lease: Lease, *, is_backup: bool) -> None:
        # The racer is recorded before its task runs, so cleanup finds its lease
        # even when cancellation arrives before the task's first step.
        connection: ProviderConnection = lease.connection
        try:
            events = connection.open_stream(lease.request_id)
        except ProviderGone:
            events = ended_stream()
        racer = Racer(lease, is_backup, RequestCipher(connection.public_key), events)
        race.racers.append(racer)
        self.active.add(racer)
        race.ctx.providers_tried.append(lease.provider_id)
        assert race.nursery is not None
        race.nursery.start_soon(self._run_racer, race, racer)

    async def _run_racer(self, race: _Race, racer: Racer) -> None:
        failure = await self._race_to_content(race, racer)
        if failure is None:
            return  # committed, or a loser of a decided race
        race.failures.append(failure)
        racer.phase = Phase.DONE
        await self._close(racer, Outcome.failure(failure.status), send_cancel=False)
        if not racer.is_backup:
            race.primary_settled.set()
        if failure.status in DETERMINISTIC:
            assert race.nursery is not None
            race.nursery.cancel_scope.cancel()  # the answer is in: stop the other racer

    async def _race_to_content(self, race: _Race, racer: Racer) -> Failure | None:
        """Run one racer until it commits (None) or fails before content (a Failure)."""
        cfg = self.config
        try:
            await self._send_request(race.ctx, racer)
        except ProviderGone:
            return racer.failure(DISCONNECTED, "provider disconnected")
        async for event in racer.events:
            match event:
                case InferenceAccepted():
                    racer.phase = Phase.ACCEPTED
                    race.extend(racer.sent_at + cfg.inference_timeout)
                case InferenceResponseChunk():
                    try:
                        chunk = parse_chunk(race.ctx.endpoint, open_chunk(racer, event))
                    except (DecryptError, ChunkError) as exc:
                        return racer.failure(DISCONNECTED, f"bad response chunk: {exc}")
                    if chunk.kind is ChunkKind.TERMINAL:
                        continue  # the provider's own end marker; the coordinator writes its own
                    if (chunk.kind is ChunkKind.BOILERPLATE
                            and len(racer.held) + len(chunk.events) <= cfg.max_held_chunks):
                        racer.held.extend(chunk.events)
                        racer.phase = Phase.PREAMBLE
                        race.extend(race.ttft_deadline + cfg.preamble_timeout)
                        continue
                    self._commit(race, racer, [*racer.held, *chunk.events], None)
                    return None
                case InferenceComplete():
                    # Boilerplate then a clean close: a valid empty completion.
                    self._commit(race, racer, list(racer.held), event)
                    return None
                case InferenceError():
                    return racer.failure(event.status_code, provider_message(event.error))
        return racer.failure(DISCONNECTED, racer.connection.end_reason(racer.lease.request_id))

    async def _send_request(self, ctx: RequestContext, racer: Racer) -> None:
        before = trio.current_time()
        sealed = racer.cipher.seal_body(ctx.plaintext)
        after = trio.current_time()
        ctx.timing.encrypt += after - before
        racer.sent_at = after
        racer.phase = Phase.SENT
        await racer.connection.send_request(
            InferenceRequest(request_id=racer.lease.request_id, encrypted_body=sealed)
        )

    def _commit(
        self, race: _Race, racer: Racer, chunks: list[Event], complete: InferenceComplete | None
    ) -> None:
        if race.winner is not None:
            return  # the other racer got there first; this one is cancelled with the nursery
        race.winner = Committed(racer, chunks, complete, race.ctx.attempts, race.ctx.endpoint)
        racer.phase = Phase.DONE
        now = trio.current_time()
        race.ctx.timing.dispatch = now - racer.sent_at
        race.ctx.timing.first_content = now - race.ctx.timing.started
        self.metrics.time_to_first_content.observe(race.ctx.timing.first_content)
        if racer.is_backup:
            self.metrics.speculative_wins.inc()
        assert race.nursery is not None
        race.nursery.cancel_scope.cancel()

    async def _close_losers(self, race: _Race) -> None:
        timed_out = race.budget.cancelled_caught and race.winner is None
        for racer in race.racers:
            if racer.closed or (race.winner is not None and racer is race.winner.racer):
                continue
            outcome = CANCELLED
            if timed_out:
                failure = self._timeout_failure(race, racer)
                race.failures.append(failure)
                # Silence after "accepted" or after boilerplate is sickness;
                # silence from the start may just be a long prompt.
                if racer.phase in (Phase.ACCEPTED, Phase.PREAMBLE):
                    outcome = Outcome.failure(TIMEOUT)
            await self._close(racer, outcome, send_cancel=True)

    def _timeout_failure(self, race: _Race, racer: Racer) -> Failure:
        waited = trio.current_time() - racer.sent_at
        what = {
            Phase.ACCEPTED: "accepted the request, then went silent",
            Phase.PREAMBLE: "sent only boilerplate, then stalled",
        }.get(racer.phase, "produced nothing")
        return racer.failure(TIMEOUT, f"provider {what} for {waited:.1f}s", timeout=True)

    async def _close(self, racer: Racer, outcome: Outcome, *, send_cancel: bool) -> None:
        """Release a racer's stream and slot, telling the provider to stop. Exactly once."""
        if racer.closed:
            return
        racer.closed = True
        self.active.discard(racer)
        request_id = racer.lease.request_id
        racer.connection.close_stream(request_id)
        with trio.CancelScope(shield=True):
            if send_cancel and racer.phase is not Phase.STARTING:
                with trio.move_on_after(self.config.cancel_send_timeout):
                    await racer.connection.send_cancel(request_id)
            await self.registry.release(racer.lease, outcome)

    async def close_winner(self, committed: Committed, outcome: Outcome, *, cancel: bool) -> None:
        """The relay's end of the winner: same cleanup, once."""
        await self._close(committed.racer, outcome, send_cancel=cancel)


def open_chunk(racer: Racer, chunk: InferenceResponseChunk) -> str:
    """The plaintext of a chunk; DecryptError for anything a provider must not send."""
    if chunk.encrypted_data is not None:
        return racer.cipher.open_chunk(chunk.encrypted_data)
    if racer.connection.encrypted_chunks:
        raise DecryptError("plaintext chunk from a provider that declared encryption")
    if chunk.data is None:
        raise DecryptError("chunk carries no data")
    return chunk.data


def provider_message(text: str, limit: int = 300) -> str:
    """A provider's error text as consumers and logs may see it: printable and bounded."""
    cleaned = "".join(c if c.isprintable() else " " for c in text[:limit]).strip()
    return cleaned or "provider error"


def _retry_label(failures: list[Failure]) -> str:
    if any(f.timeout for f in failures):
        return "timeout"
    if any(f.after_boilerplate for f in failures):
        return "retry_precontent"
    return "retry"


def exhausted(failures: list[Failure]) -> errors.ApiError:
    """The error for a request whose attempts all failed before content."""
    if not failures:
        return errors.unavailable("no provider could serve this request")
    last = failures[-1]
    tried = len({f.provider_id for f in failures})
    message = f"all {tried} provider(s) tried failed; last error: {last.message}"
    if last.timeout:
        return errors.ApiError(504, message, "provider_error", "timeout")
    if last.status in (429, 503):
        return errors.ApiError(429, message, "rate_limit_error", "capacity", retry_after=5)
    return errors.ApiError(503, message, "provider_error", "provider_error", retry_after=5)


def plaintext_body(body: dict[str, object], endpoint: Endpoint) -> bytes:
    """What the provider decrypts: the consumer's body plus the target endpoint."""
    return json.dumps({**body, "endpoint": endpoint.value}, separators=(",", ":")).encode()

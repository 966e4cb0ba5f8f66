"""The racer's state machine: what one provider's answer so far means. Pure.

A *racer* is one provider working on one request within one attempt. The
engine turns everything the provider does into an :data:`Observation` and
asks :func:`step` what it means; the answer is a :data:`Decision`:

* :class:`Hold` — keep racing, and perhaps move the racer's budget (a cold
  model load earns ``inference_timeout``, boilerplate earns
  ``preamble_timeout``; budgets only ever grow);
* :class:`Commit` — real content (or a clean, empty completion): this racer wins;
* :class:`Fail` — it failed before content, with the failure to retry on and
  the verdict to release its slot with.

Phases move forward only, along :data:`MOVES` (docs/architecture.md draws
them); a move off the table raises :class:`IllegalMove`. The rest of the
module is the vocabulary the engine reports with: the verdict on a loser, the
metric label of a retry, what an exhausted request becomes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import Final

import attrs

from coordinator.config import Config
from coordinator.dispatch.chunks import ChunkKind, Event
from coordinator.protocol import Usage
from coordinator.providers.admission import MAX_DECODE_TPS
from coordinator.registry.hedging import TtftBudget
from coordinator.registry.table import CANCELLED, SUCCESS, Observed, Outcome, Outpaced

from .items import End, InBandError, InBandReason, RelayItem

DISCONNECTED: Final = 502
TIMEOUT: Final = 504
# The shortest wait before asking again for a refused backup (a registry round trip each).
MIN_HEDGE_RETRY: Final = 0.05
# Provider statuses that say the request itself is wrong (a prompt longer than the
# model's context, a bad parameter): another provider would answer the same, so
# the request ends at once with that status (docs/protocol.md has the table).
DETERMINISTIC: Final = frozenset({400, 404, 413, 422})


class Phase(enum.Enum):
    STARTING = "starting"  # the racer has a lease; nothing has left (a cancelled send included)
    SENT = "sent"  # the request is on the wire, nothing heard yet
    ACCEPTED = "accepted"  # the provider is loading the model
    PREAMBLE = "preamble"  # holding boilerplate, no content yet
    DONE = "done"  # committed or failed


MOVES: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.STARTING: frozenset({Phase.SENT, Phase.DONE}),
    Phase.SENT: frozenset({Phase.ACCEPTED, Phase.PREAMBLE, Phase.DONE}),
    Phase.ACCEPTED: frozenset({Phase.PREAMBLE, Phase.DONE}),
    Phase.PREAMBLE: frozenset({Phase.DONE}),
    Phase.DONE: frozenset(),
}


class IllegalMove(Exception):
    pass


# ---- what the engine observes -----------------------------------------------------


@attrs.frozen
class Sent:
    """The request's frame was written (stepped with the time its send began).

    Not before: a send cancelled before its first byte writes nothing (coordinator/wsio.py),
    and a racer whose request never left has nothing to cancel and shows no slowness.
    """


@attrs.frozen
class Accepted:
    pass


@attrs.frozen
class Events:
    kind: ChunkKind
    events: tuple[Event, ...]


@attrs.frozen
class Completed:
    usage: Usage


@attrs.frozen
class Errored:
    status: int
    message: str


@attrs.frozen
class Broken:
    """A disconnect, or a chunk the requester cannot use: the provider's fault (502)."""

    message: str


@attrs.frozen
class Expired:
    """The racer's own budget ran out."""


Observation = Sent | Accepted | Events | Completed | Errored | Broken | Expired


# ---- what it decides ------------------------------------------------------------------


@attrs.frozen
class Failure:
    provider_id: str
    version: str
    status: int
    message: str
    timeout: bool = False
    after_boilerplate: bool = False


@attrs.frozen
class Hold:
    extend_to: float | None = None  # a new deadline for the racer's budget (only later counts)


@attrs.frozen
class Commit:
    events: tuple[Event, ...]  # held boilerplate, then the first content
    usage: Usage | None = None  # set when the provider completed before any content


@attrs.frozen
class Fail:
    failure: Failure
    verdict: Outcome
    cancel_provider: bool  # whether the provider must still be told to stop


Decision = Hold | Commit | Fail


@attrs.frozen(kw_only=True)
class Limits:
    """The racers' budgets, from the configuration (its defaults are the only ones)."""

    preamble_timeout: float
    inference_timeout: float
    max_held: int
    ttft: TtftBudget

    @classmethod
    def from_config(cls, c: Config) -> Limits:
        return cls(preamble_timeout=c.preamble_timeout, inference_timeout=c.inference_timeout,
                   max_held=c.max_held_chunks, ttft=TtftBudget.from_config(c))

    def deadlines(self, now: float, prompt_tokens: int,
                  hedge_after: float | None = None) -> Deadlines:
        """An attempt's deadlines, computed once at its start.

        ``hedge_after`` is the registry's adaptive delay (registry/hedging.py);
        without one, the fixed ``backup_fraction`` of the budget.
        """
        ttft = self.ttft.ttft(prompt_tokens)
        fixed = self.ttft.fixed_hedge(prompt_tokens)
        return Deadlines(now + ttft, now + (fixed if hedge_after is None else hedge_after), fixed)


@attrs.frozen
class Deadlines:
    """When an attempt's first content is due, and when to ask for its backup."""

    ttft: float
    hedge: float
    fixed_hedge: float  # seconds: the longest wait between two asks for a backup

    def hedge_asks(self) -> Iterator[float]:
        """At the hedge time, then again while refused (no free provider, the hedge
        budget spent): waits doubling from ``MIN_HEDGE_RETRY`` up to the fixed delay."""
        at, wait, longest = self.hedge, 0.0, max(self.fixed_hedge, MIN_HEDGE_RETRY)
        while True:
            yield at
            wait = min(max(wait * 2, MIN_HEDGE_RETRY), longest)
            at += wait

    def backup_ttft(self, now: float) -> float:
        """A backup's deadline: the attempt's, or — started late, because the primary
        held boilerplate — as long from ``now`` as a backup started on time had."""
        return max(self.ttft, now + (self.ttft - self.hedge))


@attrs.define
class RacerState:
    provider_id: str
    version: str
    ttft_deadline: float
    phase: Phase = Phase.STARTING
    sent_at: float = 0.0
    held: tuple[Event, ...] = ()

    def move(self, to: Phase) -> None:
        if to is not self.phase and to not in MOVES[self.phase]:
            raise IllegalMove(f"{self.phase.value} -> {to.value}")
        self.phase = to

    def failure(self, status: int, message: str, *, timeout: bool = False) -> Failure:
        return Failure(self.provider_id, self.version, status, message, timeout,
                       after_boilerplate=bool(self.held))


def step(state: RacerState, observation: Observation, now: float, limits: Limits) -> Decision:
    """What ``observation`` means for this racer; moves ``state`` along :data:`MOVES`."""
    if state.phase is Phase.DONE or (
            state.phase is Phase.STARTING and not isinstance(observation, Sent | Broken | Expired)):
        raise IllegalMove(f"{type(observation).__name__} for a racer that is {state.phase.value}")
    match observation:
        case Sent():
            state.move(Phase.SENT)
            state.sent_at = now
            return Hold()
        case Accepted():
            if state.phase in (Phase.ACCEPTED, Phase.PREAMBLE):
                return Hold()  # a repeat, or after boilerplate: the budget already moved
            state.move(Phase.ACCEPTED)
            return Hold(state.sent_at + limits.inference_timeout)
        case Events(ChunkKind.TERMINAL, _):
            return Hold()  # the provider's own end marker; the coordinator writes its own
        case Events(ChunkKind.BOILERPLATE, events) if (
                len(state.held) + len(events) <= limits.max_held):
            state.move(Phase.PREAMBLE)
            state.held += events
            return Hold(state.ttft_deadline + limits.preamble_timeout)
        case Events(_, events):
            state.move(Phase.DONE)
            return Commit(state.held + events)
        case Completed(usage):
            state.move(Phase.DONE)  # boilerplate then a clean close: a valid empty answer
            return Commit(state.held, usage)
        case Errored(status, message):
            return _fail(state, state.failure(status, message), cancel=False)
        case Broken(message):
            return _fail(state, state.failure(DISCONNECTED, message), cancel=_left(state))
        case Expired():
            verdict = loser_verdict(state.phase, timed_out=True)
            failure = state.failure(TIMEOUT, _silence(state, now), timeout=True)
            cancel = _left(state)
            state.move(Phase.DONE)
            return Fail(failure, verdict, cancel_provider=cancel)


def _left(state: RacerState) -> bool:
    """Whether the racer's request reached its provider, which must then be told to stop."""
    return state.phase is not Phase.STARTING


def _fail(state: RacerState, failure: Failure, *, cancel: bool) -> Fail:
    state.move(Phase.DONE)
    return Fail(failure, Outcome.failure(failure.status), cancel_provider=cancel)


def _silence(state: RacerState, now: float) -> str:
    if state.phase is Phase.STARTING:
        return "the request could not be sent in time"
    what = {
        Phase.ACCEPTED: "accepted the request, then went silent",
        Phase.PREAMBLE: "sent only boilerplate, then stalled",
    }.get(state.phase, "produced nothing")
    return f"provider {what} for {now - state.sent_at:.1f}s"


@attrs.frozen
class Withdraw:
    """How to close a racer that ended without a decision of its own: it lost the race,
    or the request was cancelled (the consumer left, the attempt was stopped)."""

    verdict: Outcome
    cancel_provider: bool
    evidence: Outpaced | None


def withdraw(state: RacerState, now: float, *, lost: bool) -> Withdraw:
    """What a racer that lost (``lost``: the other racer committed) or was cancelled
    leaves behind. One whose request never left (a backup granted as the race was
    decided) is told nothing and proves nothing."""
    return Withdraw(loser_verdict(state.phase, timed_out=False), _left(state),
                    outpaced(state, now, lost=lost))


def loser_verdict(phase: Phase, *, timed_out: bool) -> Outcome:
    """The verdict on a racer that did not win.

    Silence after "accepted" or after boilerplate is sickness (a strike);
    silence from the start may just be a long prompt, and a racer cancelled
    because the other won says nothing about its health.
    """
    if timed_out and phase in (Phase.ACCEPTED, Phase.PREAMBLE):
        return Outcome.failure(TIMEOUT)
    return CANCELLED


def outpaced(state: RacerState, now: float, *, lost: bool) -> Outpaced | None:
    """What losing to the other racer says of this one: slowness, if it had sent no content.

    A racer loading a cold model ("accepted") is slow by its own word, not sick: it earns
    the decaying penalty (routing looks elsewhere while it loads, and away from a provider
    that says "accepted" to everything), never a strike.
    """
    if not lost or state.phase not in (Phase.SENT, Phase.PREAMBLE, Phase.ACCEPTED):
        return None  # never sent: no evidence of slowness
    return Outpaced(now - state.sent_at, boilerplate_only=state.phase is Phase.PREAMBLE)


def observed(sent_at: float, committed_at: float, ended_at: float, usage: Usage | None,
             prompt_tokens: int) -> Observed:
    """What a completed winner showed of its provider's speed.

    The token count is the provider's own word, so the rate is held to what a provider
    may declare: a provider claiming 10^9 tokens must not look faster than any other.
    """
    decoding = ended_at - committed_at
    tokens = usage.completion_tokens if usage is not None else 0
    rate = min(tokens / decoding, MAX_DECODE_TPS) if decoding > 0 and tokens > 1 else None
    return Observed(committed_at - sent_at, rate, prompt_tokens)


def retry_label(failures: list[Failure]) -> str:
    """The ``coordinator_dispatch_total{result}`` label of an attempt that failed."""
    if any(f.timeout for f in failures):
        return "timeout"
    if any(f.after_boilerplate for f in failures):
        return "retry_precontent"
    return "retry"


def rejected(failures: list[Failure]) -> Failure | None:
    """A deterministic answer about the request itself, if a provider gave one."""
    return next((f for f in failures if f.status in DETERMINISTIC), None)


def exhausted(failures: list[Failure]) -> str:
    """Why a request whose attempts all failed before content failed: its last failure's
    ``timeout``, ``capacity`` or ``failed`` (``request.FailureKind`` values)."""
    last = failures[-1] if failures else None
    if last is not None and last.timeout:
        return "timeout"
    if last is not None and last.status in (429, 503):
        return "capacity"
    return "failed"


# ---- after the commit -----------------------------------------------------------------


@attrs.frozen
class Closing:
    """How the winner is closed when its stream ends: the verdict, and what else to do."""

    outcome: Outcome
    cancel_provider: bool
    usage: Usage | None = None  # for a completion: what the provider's speed was


CONSUMER_LEFT: Final = Closing(CANCELLED, cancel_provider=True)


def completed(usage: Usage) -> Closing:
    return Closing(SUCCESS, cancel_provider=False, usage=usage)


def after_commit(observation: Observation | None, end_reason: Callable[[], str]
                 ) -> tuple[tuple[RelayItem, ...], Closing | None]:
    """What the winner's next observation (None: its stream ended) means for the consumer:
    items to relay, and how to close the winner if the stream is over.

    Nothing can be retried any more: an error ends the stream with one in-band error.
    """
    match observation:
        case None:
            return ((InBandError(InBandReason.DISCONNECTED, end_reason(), DISCONNECTED),),
                    Closing(Outcome.failure(DISCONNECTED), cancel_provider=False))
        case Events(_, events):
            return events, None
        case Completed(usage):
            return (End(usage),), completed(usage)
        case Errored(status, message):
            return ((InBandError(InBandReason.PROVIDER_ERROR, message, status),),
                    Closing(Outcome.failure(status), cancel_provider=False))
        case Broken(message):
            return ((InBandError(InBandReason.PROVIDER_ERROR, message, DISCONNECTED),),
                    Closing(Outcome.failure(DISCONNECTED), cancel_provider=True))
        case _:
            return (), None  # a late inference_accepted


def silence(idle: bool, idle_timeout: float) -> tuple[InBandError, Closing]:
    """The winner said nothing for ``idle_timeout`` (``idle``), or the drain's deadline came."""
    if not idle:  # the drain's deadline: no verdict on the provider, we are leaving
        return InBandError(InBandReason.SHUTDOWN, "the coordinator is shutting down",
                           503), CONSUMER_LEFT
    return (InBandError(InBandReason.TIMEOUT,
                        f"no output from the provider for {idle_timeout:g}s", TIMEOUT),
            Closing(Outcome.failure(TIMEOUT), cancel_provider=True))

"""The racer's state machine, synchronously: every phase against every observation.

In the style of h11's test_state.py: the table of legal moves, each decision
the engine acts on, and the moves that must never happen.
"""

from __future__ import annotations

import itertools

import pytest

from coordinator.api.outcomes import dispatch_error
from coordinator.config import Config
from coordinator.dispatch import race
from coordinator.dispatch.chunks import ChunkKind
from coordinator.dispatch.race import (
    MOVES,
    Accepted,
    Broken,
    Commit,
    Completed,
    Errored,
    Events,
    Expired,
    Fail,
    Failure,
    Hold,
    IllegalMove,
    Phase,
    RacerState,
    Sent,
)
from coordinator.dispatch.request import DispatchFailed, FailureKind
from coordinator.protocol import Usage
from coordinator.registry.table import CANCELLED, Outcome, Outpaced

LIMITS = race.Limits.from_config(Config(preamble_timeout=90.0, inference_timeout=600.0,
                                        max_held_chunks=2))
ROLE = {"choices": [{"delta": {"role": "assistant"}}]}
TEXT = {"choices": [{"delta": {"content": "hi"}}]}
BOILERPLATE = Events(ChunkKind.BOILERPLATE, (ROLE,))
CONTENT = Events(ChunkKind.CONTENT, (TEXT,))
TERMINAL = Events(ChunkKind.TERMINAL, ())


def racer_in(phase: Phase) -> RacerState:
    """A racer brought to ``phase`` the legal way (TTFT deadline 5, sent at 1)."""
    state = RacerState("p", "0.7.0", ttft_deadline=5.0)
    if phase is Phase.STARTING:
        return state
    race.step(state, Sent(), 1.0, LIMITS)
    if phase is Phase.ACCEPTED:
        race.step(state, Accepted(), 2.0, LIMITS)
    elif phase is Phase.PREAMBLE:
        race.step(state, BOILERPLATE, 2.0, LIMITS)
    elif phase is Phase.DONE:
        race.step(state, CONTENT, 2.0, LIMITS)
    assert state.phase is phase
    return state


def test_the_table_only_moves_forward():
    order = list(Phase)
    for source, targets in MOVES.items():
        assert all(order.index(t) > order.index(source) for t in targets), source
    assert MOVES[Phase.DONE] == frozenset()


def test_sent_starts_the_clock():
    state = racer_in(Phase.STARTING)
    assert race.step(state, Sent(), 1.5, LIMITS) == Hold()
    assert state.phase is Phase.SENT and state.sent_at == 1.5


def test_accepted_extends_to_the_inference_budget_from_the_send():
    state = racer_in(Phase.SENT)
    assert race.step(state, Accepted(), 3.0, LIMITS) == Hold(1.0 + 600.0)
    assert state.phase is Phase.ACCEPTED


@pytest.mark.parametrize("phase", [Phase.ACCEPTED, Phase.PREAMBLE])
def test_a_late_or_repeated_accepted_changes_nothing(phase):
    state = racer_in(phase)
    assert race.step(state, Accepted(), 3.0, LIMITS) == Hold()
    assert state.phase is phase  # never backwards


@pytest.mark.parametrize("phase", [Phase.SENT, Phase.ACCEPTED, Phase.PREAMBLE])
def test_boilerplate_is_held_and_earns_the_preamble_budget(phase):
    state = racer_in(phase)
    held_before = state.held
    assert race.step(state, BOILERPLATE, 3.0, LIMITS) == Hold(5.0 + 90.0)
    assert state.phase is Phase.PREAMBLE and state.held == (*held_before, ROLE)


def test_boilerplate_past_the_hold_limit_commits():
    state = racer_in(Phase.PREAMBLE)  # one held
    race.step(state, BOILERPLATE, 3.0, LIMITS)  # two held: the limit
    decision = race.step(state, BOILERPLATE, 3.5, LIMITS)
    assert decision == Commit((ROLE, ROLE, ROLE)) and state.phase is Phase.DONE


@pytest.mark.parametrize("phase", [Phase.SENT, Phase.ACCEPTED, Phase.PREAMBLE])
def test_content_commits_with_what_was_held(phase):
    state = racer_in(phase)
    decision = race.step(state, CONTENT, 3.0, LIMITS)
    assert decision == Commit((*racer_in(phase).held, TEXT))
    assert state.phase is Phase.DONE


@pytest.mark.parametrize("phase", [Phase.SENT, Phase.ACCEPTED, Phase.PREAMBLE])
def test_the_providers_own_end_marker_is_ignored(phase):
    state = racer_in(phase)
    assert race.step(state, TERMINAL, 3.0, LIMITS) == Hold()
    assert state.phase is phase


@pytest.mark.parametrize("phase", [Phase.SENT, Phase.ACCEPTED, Phase.PREAMBLE])
def test_a_clean_completion_before_content_is_an_empty_answer(phase):
    state = racer_in(phase)
    decision = race.step(state, Completed(Usage(3, 0)), 3.0, LIMITS)
    assert decision == Commit(racer_in(phase).held, Usage(3, 0))


@pytest.mark.parametrize(("phase", "after_boilerplate"), [
    (Phase.SENT, False), (Phase.ACCEPTED, False), (Phase.PREAMBLE, True)])
def test_a_provider_error_fails_with_its_status(phase, after_boilerplate):
    state = racer_in(phase)
    decision = race.step(state, Errored(500, "boom"), 3.0, LIMITS)
    assert decision == Fail(Failure("p", "0.7.0", 500, "boom", False, after_boilerplate),
                            Outcome.failure(500), cancel_provider=False)


@pytest.mark.parametrize("phase", [Phase.SENT, Phase.ACCEPTED, Phase.PREAMBLE])
def test_a_disconnect_or_bad_chunk_is_a_502_and_the_provider_is_told_to_stop(phase):
    state = racer_in(phase)
    decision = race.step(state, Broken("bad response chunk"), 3.0, LIMITS)
    assert isinstance(decision, Fail) and decision.failure.status == 502
    assert decision.verdict == Outcome.failure(502) and decision.cancel_provider


@pytest.mark.parametrize("observation", [Broken("provider disconnected"), Expired()])
def test_a_racer_whose_request_never_left_fails_without_telling_the_provider(observation):
    decision = race.step(racer_in(Phase.STARTING), observation, 3.0, LIMITS)
    assert isinstance(decision, Fail) and not decision.cancel_provider
    assert decision.verdict in (CANCELLED, Outcome.failure(502))


@pytest.mark.parametrize(("phase", "cancel", "evidence"), [
    (Phase.STARTING, False, None),  # its request never left: nothing to stop, nothing proven
    (Phase.SENT, True, Outpaced(4.0, boilerplate_only=False)),
    (Phase.ACCEPTED, True, Outpaced(4.0, boilerplate_only=False)),
    (Phase.PREAMBLE, True, Outpaced(4.0, boilerplate_only=True)),
])
def test_a_racer_that_lost_the_race(phase, cancel, evidence):
    withdraw = race.withdraw(racer_in(phase), 5.0, lost=True)
    assert withdraw == race.Withdraw(CANCELLED, cancel, evidence)


@pytest.mark.parametrize("phase", [Phase.STARTING, Phase.SENT, Phase.PREAMBLE])
def test_a_racer_cancelled_with_its_request_proves_nothing(phase):
    withdraw = race.withdraw(racer_in(phase), 5.0, lost=False)
    assert withdraw.evidence is None and withdraw.verdict == CANCELLED
    assert withdraw.cancel_provider is (phase is not Phase.STARTING)


@pytest.mark.parametrize(("phase", "verdict", "what"), [
    (Phase.SENT, CANCELLED, "produced nothing"),
    (Phase.ACCEPTED, Outcome.failure(504), "accepted the request, then went silent"),
    (Phase.PREAMBLE, Outcome.failure(504), "sent only boilerplate, then stalled"),
])
def test_expiry_is_a_timeout_and_silence_after_progress_is_sickness(phase, verdict, what):
    state = racer_in(phase)
    decision = race.step(state, Expired(), 7.0, LIMITS)
    assert isinstance(decision, Fail)
    assert decision.failure.timeout and decision.failure.status == 504
    assert decision.verdict == verdict and decision.cancel_provider
    assert decision.failure.message == f"provider {what} for 6.0s"


@pytest.mark.parametrize("observation", [Sent(), Accepted(), BOILERPLATE, CONTENT,
                                         Completed(Usage()), Errored(500, "x"), Broken("x"),
                                         Expired()])
def test_nothing_moves_a_racer_that_is_done(observation):
    state = racer_in(Phase.DONE)
    with pytest.raises(IllegalMove):
        race.step(state, observation, 3.0, LIMITS)


def test_sent_twice_is_illegal():
    with pytest.raises(IllegalMove):
        race.step(racer_in(Phase.PREAMBLE), Sent(), 3.0, LIMITS)


def test_nothing_is_heard_before_the_request_is_sent():
    for observation in (Accepted(), BOILERPLATE, CONTENT):
        with pytest.raises(IllegalMove):
            race.step(racer_in(Phase.STARTING), observation, 0.0, LIMITS)


@pytest.mark.parametrize(("phase", "timed_out", "verdict"), [
    (Phase.STARTING, False, CANCELLED), (Phase.SENT, False, CANCELLED),
    (Phase.ACCEPTED, False, CANCELLED), (Phase.PREAMBLE, False, CANCELLED),
    (Phase.SENT, True, CANCELLED), (Phase.ACCEPTED, True, Outcome.failure(504)),
    (Phase.PREAMBLE, True, Outcome.failure(504)),
])
def test_loser_verdicts(phase, timed_out, verdict):
    assert race.loser_verdict(phase, timed_out=timed_out) == verdict


def test_deadlines_are_computed_once_per_attempt():
    limits = race.Limits.from_config(
        Config(ttft_base=5.0, ttft_per_prompt_token=0.001, backup_fraction=0.5))
    assert limits.deadlines(100.0, prompt_tokens=2000) == race.Deadlines(107.0, 103.5, 3.5)
    assert limits.deadlines(100.0, 2000, hedge_after=0.2).hedge == 100.2


@pytest.mark.parametrize(("failures", "label"), [
    ([Failure("a", "1", 500, "x")], "retry"),
    ([Failure("a", "1", 500, "x", after_boilerplate=True)], "retry_precontent"),
    ([Failure("a", "1", 504, "x", timeout=True), Failure("b", "1", 500, "x")], "timeout"),
])
def test_retry_labels(failures, label):
    assert race.retry_label(failures) == label


@pytest.mark.parametrize(("last", "status", "code"), [
    (Failure("a", "1", 504, "silent", timeout=True), 504, "timeout"),
    (Failure("a", "1", 429, "busy"), 429, "capacity"),
    (Failure("a", "1", 503, "busy"), 429, "capacity"),
    (Failure("a", "1", 500, "boom"), 503, "provider_error"),
])
def test_what_an_exhausted_request_becomes(last, status, code):
    """The engine says why (a kind, never a status); the API edge picks the status."""
    failures = (Failure("b", "1", 500, "first"), last)
    kind = FailureKind(race.exhausted(list(failures)))
    error = dispatch_error(DispatchFailed(kind, failures))
    assert (error.status, error.code) == (status, code)
    assert error.message.startswith("all 2 provider(s) tried failed; last error: ")
    assert dispatch_error(DispatchFailed(FailureKind(race.exhausted([])))).status == 503


def test_deterministic_statuses_are_recognised():
    failures = [Failure("a", "1", 500, "x"), Failure("b", "1", 422, "bad parameter")]
    assert race.rejected(failures) == failures[1]
    assert race.rejected([Failure("a", "1", 429, "busy")]) is None


def test_a_refused_backup_is_asked_for_again_ever_less_often_up_to_the_fixed_delay():
    limits = race.Limits.from_config(
        Config(ttft_base=5.0, ttft_per_prompt_token=0.001, backup_fraction=0.5))
    deadlines = limits.deadlines(100.0, prompt_tokens=1000, hedge_after=0.2)
    asks = list(itertools.islice(deadlines.hedge_asks(), 9))
    waits = [b - a for a, b in itertools.pairwise(asks)]
    assert asks[0] == 100.2 and waits[0] == pytest.approx(race.MIN_HEDGE_RETRY)
    assert all(b == pytest.approx(min(a * 2, 3.0)) for a, b in itertools.pairwise(waits))
    assert waits[-1] == pytest.approx(3.0)  # (5 + 1) * 0.5: never longer than the fixed hedge
    tiny = race.Limits.from_config(
        Config(ttft_base=0.01, ttft_per_prompt_token=0.0, backup_fraction=0.5))
    first, second = itertools.islice(tiny.deadlines(0.0, 0).hedge_asks(), 2)
    assert second - first == race.MIN_HEDGE_RETRY  # never a busy loop


def test_a_late_backup_gets_as_long_as_one_started_on_time():
    deadlines = race.Deadlines(ttft=105.0, hedge=102.5, fixed_hedge=2.5)
    assert deadlines.backup_ttft(102.5) == 105.0  # on time: the attempt's deadline
    assert deadlines.backup_ttft(101.0) == 105.0  # never shorter than the attempt's
    assert deadlines.backup_ttft(103.0) == 105.5  # a little late: 2.5 s from its start
    assert deadlines.backup_ttft(112.5) == 115.0  # late: 2.5 s from its start

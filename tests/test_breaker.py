"""The shape-keyed circuit breaker, against a naive reference model."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from coordinator.registry.breaker import Breaker

KEY = ("p", "m", "tools")


def test_two_strikes_in_window_start_a_cooldown():
    b = Breaker(strikes=2, window=60.0, cooldown=300.0)
    assert not b.record_failure(KEY, 500, 0.0)
    assert b.record_failure(KEY, 502, 59.0)
    assert b.is_cooling(KEY, 60.0)
    assert b.is_cooling(KEY, 358.9)
    assert not b.is_cooling(KEY, 359.0)


def test_strikes_outside_the_window_do_not_add_up():
    b = Breaker(strikes=2, window=60.0, cooldown=300.0)
    b.record_failure(KEY, 500, 0.0)
    assert not b.record_failure(KEY, 500, 60.0)
    assert not b.is_cooling(KEY, 60.0)


def test_capacity_and_client_errors_are_not_strikes():
    b = Breaker(strikes=2, window=60.0, cooldown=300.0)
    for t, status in enumerate((503, 503, 400, 404, 429, 503)):
        assert not b.record_failure(KEY, status, float(t))
    assert not b.is_cooling(KEY, 10.0)


def test_failure_during_cooldown_extends_it_without_reentering():
    b = Breaker(strikes=2, window=60.0, cooldown=300.0)
    b.record_failure(KEY, 500, 0.0)
    assert b.record_failure(KEY, 500, 1.0)
    assert not b.record_failure(KEY, 504, 200.0)  # not a new *entry*
    assert b.is_cooling(KEY, 499.0)
    assert not b.is_cooling(KEY, 500.0)


def test_success_clears_only_its_own_key():
    b = Breaker(strikes=2, window=60.0, cooldown=300.0)
    other = ("p", "m", "base")
    for key in (KEY, other):
        b.record_failure(key, 500, 0.0)
        b.record_failure(key, 500, 1.0)
    b.record_success(other)
    assert b.is_cooling(KEY, 2.0) and not b.is_cooling(other, 2.0)


def test_forget_provider_gives_a_clean_slate():
    b = Breaker(strikes=2, window=60.0, cooldown=300.0)
    b.record_failure(KEY, 500, 0.0)
    b.record_failure(KEY, 500, 1.0)
    b.record_failure(("q", "m", "tools"), 500, 1.0)
    b.forget_provider("p")
    assert not b.is_cooling(KEY, 2.0)
    assert len(b) == 1


def test_memory_is_bounded_under_provider_churn():
    b = Breaker(strikes=2, window=60.0, cooldown=300.0)
    for i in range(10_000):
        now = float(i)  # one new provider id a second, each failing twice
        b.record_failure((f"p{i}", "m", "base"), 500, now)
        b.record_failure((f"p{i}", "m", "base"), 500, now + 0.5)
    # Only keys touched in the last window + cooldown can remain.
    assert len(b) <= b.window + b.cooldown + 2
    assert len(b.cooldowns(10_000.0)) <= b.cooldown + 1


class BreakerVersusModel(RuleBasedStateMachine):
    """Replay-from-log reference: recompute every verdict from the full history."""

    def __init__(self) -> None:
        super().__init__()
        self.breaker = Breaker(strikes=2, window=60.0, cooldown=300.0)
        self.now = 0.0
        self.log: list[tuple[float, str, tuple[str, str, str], int]] = []

    keys = st.tuples(st.sampled_from(["p1", "p2"]), st.just("m"),
                     st.sampled_from(["base", "tools"]))

    def _model_state(self, key):
        strikes: list[float] = []
        until = None
        entered = False
        for t, kind, k, status in self.log:
            if kind == "forget" and k[0] == key[0]:
                strikes, until = [], None
                continue
            if k != key:
                continue
            entered = False
            if kind == "success":
                strikes, until = [], None
            elif kind == "failure" and status in (500, 502, 504):
                if until is not None and t < until:
                    until = t + 300.0
                    continue
                strikes = [s for s in strikes if t - s < 60.0] + [t]
                if len(strikes) >= 2:
                    strikes, until, entered = [], t + 300.0, True
        return until, entered

    @rule(dt=st.floats(0, 400))
    def advance(self, dt):
        self.now += dt

    @rule(key=keys, status=st.sampled_from([500, 502, 504, 503, 400]))
    def failure(self, key, status):
        got = self.breaker.record_failure(key, status, self.now)
        self.log.append((self.now, "failure", key, status))
        _, entered = self._model_state(key)
        assert got == entered

    @rule(key=keys)
    def success(self, key):
        self.breaker.record_success(key)
        self.log.append((self.now, "success", key, 0))

    @rule(provider=st.sampled_from(["p1", "p2"]))
    def forget(self, provider):
        self.breaker.forget_provider(provider)
        self.log.append((self.now, "forget", (provider, "", ""), 0))

    @invariant()
    def cooling_matches(self):
        for p in ("p1", "p2"):
            for shape in ("base", "tools"):
                key = (p, "m", shape)
                until, _ = self._model_state(key)
                expected = until is not None and self.now < until
                assert self.breaker.is_cooling(key, self.now) == expected


TestBreakerStateful = BreakerVersusModel.TestCase

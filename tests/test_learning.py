"""Routing that learns: observed speed, outpaced losers, adaptive hedging, the hedge budget."""

from __future__ import annotations

import math
import random
from collections import deque

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from coordinator.capabilities import parse_version
from coordinator.dispatch import race
from coordinator.dispatch.race import Phase, RacerState
from coordinator.metrics import Metrics
from coordinator.protocol import ModelInfo, Usage
from coordinator.providers.admission import MAX_DECODE_TPS
from coordinator.registry import scheduler
from coordinator.registry.hedging import MIN_SAMPLES, HedgeBudget, hedge_delay
from coordinator.registry.speed import (
    MIN_SAMPLES as TRUST_AFTER,
)
from coordinator.registry.speed import (
    PENALTY_HALF_LIFE,
    ProviderSpeed,
    RecentTimes,
    ewma,
    outpaced_strike,
    size_class,
)
from coordinator.registry.state import AcquireRequest, RegistryState
from coordinator.registry.table import SUCCESS, Grant, Job, Observed, Outpaced, ProviderRecord
from coordinator.registry.traits import LOW_DETAIL_IMAGE_TOKENS, estimate_prompt_tokens
from provider_sim.behaviours import Behaviour, Fault

from .harness import ADMIN_KEY, MODEL, Harness, make_config, open_harness

# ---- the pure rules -----------------------------------------------------------------


def test_ewma_moves_a_fifth_of_the_way():
    assert ewma(None, 3.0) == 3.0
    assert ewma(1.0, 2.0) == pytest.approx(1.2)


def test_observed_speed_is_trusted_after_enough_samples():
    known = ProviderSpeed()
    for _ in range(TRUST_AFTER - 1):
        known.observe(0.5, 40.0)
    assert not known.trusted
    known.observe(0.5, 40.0)
    assert known.trusted and known.ttfc == pytest.approx(0.5)
    assert known.decode_tps == pytest.approx(40.0)


def test_the_outpaced_penalty_adds_up_and_halves_with_time():
    known = ProviderSpeed()
    known.outpaced(2.0, now=0.0)
    known.outpaced(2.0, now=0.0)
    assert known.penalty_now(0.0) == 4.0
    assert known.penalty_now(PENALTY_HALF_LIFE) == pytest.approx(2.0)
    assert known.penalty_now(10 * PENALTY_HALF_LIFE) < 0.01


@given(st.lists(st.floats(0, 100), min_size=1, max_size=200), st.floats(0.01, 1.0))
def test_recent_quantiles_are_exact_over_the_window(samples, q):
    recent = RecentTimes()
    for sample in samples:
        recent.add(sample)
    window = sorted(samples[-RecentTimes.SIZE:])
    value = recent.quantile(q)
    assert value in window
    assert sum(s <= value for s in window) >= q * len(window)  # nearest rank
    assert recent.quantile(0.01) <= value <= recent.quantile(1.0) == window[-1]


def test_an_empty_window_has_no_quantile():
    assert math.isnan(RecentTimes().quantile(0.95))


@pytest.mark.parametrize(("tokens", "klass"), [(1, 0), (256, 0), (257, 1), (1024, 1),
                                               (5000, 3), (10**9, 8)])
def test_prompt_size_classes(tokens, klass):
    assert size_class(tokens) == klass


def test_boilerplate_then_silence_three_times_in_the_window_is_a_strike():
    times: deque[float] = deque()
    assert not outpaced_strike(times, 0.0, window=60.0, threshold=3)
    assert not outpaced_strike(times, 10.0, window=60.0, threshold=3)
    assert outpaced_strike(times, 20.0, window=60.0, threshold=3)
    assert not times  # the count restarts
    for at in (100.0, 200.0, 300.0):  # spread out: never three within a minute
        assert not outpaced_strike(times, at, window=60.0, threshold=3)


def test_the_hedge_waits_for_evidence_then_follows_the_p95():
    recent = RecentTimes()
    assert hedge_delay(None, fixed=2.5, floor=0.1) == 2.5
    for i in range(MIN_SAMPLES - 1):
        recent.add(0.05 + i * 0.001)
    assert hedge_delay(recent, fixed=2.5, floor=0.1) == 2.5  # too few samples yet
    recent.add(0.07)
    assert hedge_delay(recent, fixed=2.5, floor=0.01) == pytest.approx(recent.quantile(0.95))
    assert hedge_delay(recent, fixed=2.5, floor=0.1) == 0.1  # clamped up to the floor
    for _ in range(64):
        recent.add(9.0)
    assert hedge_delay(recent, fixed=2.5, floor=0.1) == 2.5  # and down to the fixed fraction


@given(st.lists(st.tuples(st.sampled_from(["primary", "backup"]), st.floats(0, 5)),
                max_size=300))
def test_the_hedge_budget_is_never_exceeded(events):
    budget = HedgeBudget(fraction=0.05, window=60.0, burst=2)
    now = 0.0
    for kind, gap in events:
        now += gap
        if kind == "primary":
            budget.primary(now)
        elif budget.allows(now):
            budget.spend(now)
        primaries, backups = budget.counts(now)
        assert backups <= 0.05 * primaries + 2


def test_image_parts_count_as_images_not_bytes():
    data_url = "data:image/png;base64," + "A" * 300_000
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x" * 400},
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "image_url", "image_url": {"url": "https://example/i.png", "detail": "low"}},
    ]}]}
    text = len("x" * 400 + "user" + "text") // 4  # every string but the media parts counts
    assert estimate_prompt_tokens(body, image_tokens=765) == text + 765 + LOW_DETAIL_IMAGE_TOKENS
    anthropic = {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": "B" * 100_000}}]}]}
    assert estimate_prompt_tokens(anthropic, image_tokens=500) == 500 + len("user") // 4
    odd = {"messages": [{"role": "user", "content": [{"type": [1]}, {"type": {"a": 1}}]}]}
    assert estimate_prompt_tokens(odd) == len("user") // 4  # no TypeError on any JSON "type"


def test_outpaced_and_observed_evidence_from_the_racer():
    state = RacerState("p", "1", ttft_deadline=5.0, phase=Phase.PREAMBLE, sent_at=1.0)
    assert race.outpaced(state, 4.0, lost=True) == Outpaced(3.0, boilerplate_only=True)
    assert race.outpaced(state, 4.0, lost=False) is None  # cancelled, not outpaced
    state.phase = Phase.ACCEPTED
    # Loading a cold model while the other racer served: slow now, not sick (no strike).
    assert race.outpaced(state, 4.0, lost=True) == Outpaced(3.0, boilerplate_only=False)
    seen = race.observed(1.0, 1.5, 3.5, Usage(10, 41), prompt_tokens=300)
    assert seen == Observed(0.5, 20.5, 300)


def test_a_provider_claiming_a_billion_tokens_is_no_faster_than_one_may_declare():
    # The token count is the provider's word: an observed rate above the declared
    # ceiling would let one liar draw a whole model's traffic (probe, 82 of 90 requests).
    seen = race.observed(1.0, 1.5, 2.5, Usage(10, 10**9), prompt_tokens=10)
    assert seen.decode_tps == MAX_DECODE_TPS
    liar, honest = _record("liar", 100.0), _record("honest", MAX_DECODE_TPS)
    job = Job("r", "m", prompt_tokens=10, max_tokens=1000)
    for _ in range(TRUST_AFTER):
        liar.speeds.setdefault("m", ProviderSpeed()).observe(seen.ttfc, seen.decode_tps)
        honest.speeds.setdefault("m", ProviderSpeed()).observe(seen.ttfc, MAX_DECODE_TPS)
    assert scheduler.job_cost(liar, job) == scheduler.job_cost(honest, job)


# ---- the registry learning ------------------------------------------------------------


def _record(pid: str, decode_tps: float) -> ProviderRecord:
    return ProviderRecord(pid, 1, "0.7.0", parse_version("0.7.0"), {"m": ModelInfo("m")},
                          max_slots=4, decode_tps=decode_tps, prefill_tps=2000.0,
                          signing_key="k")


def test_observed_speed_overrides_what_was_declared():
    s = RegistryState(make_config(), Metrics(), rng=random.Random(1))
    s.register(_record("boaster", decode_tps=5000.0), 0.0)  # declares it is fast
    s.register(_record("honest", decode_tps=100.0), 0.0)
    for i in range(TRUST_AFTER):
        grant = s.acquire(AcquireRequest(Job(f"r{i}", "m"), exclude=frozenset({"honest"})), 1.0).value
        assert isinstance(grant, Grant) and grant.lease.provider_id == "boaster"
        s.release(grant.lease, SUCCESS, 2.0, Observed(ttfc=4.0, decode_tps=5.0,
                                                       prompt_tokens=10))
    view = next(p for p in s.snapshot(3.0).providers if p.id == "boaster").models[0].speed
    assert view is not None and view.source == "observed" and view.decode_tps == 5.0
    chosen = s.acquire(AcquireRequest(Job("next", "m")), 3.0).value
    assert isinstance(chosen, Grant) and chosen.lease.provider_id == "honest"


def test_evidence_of_slowness_counts_at_once_evidence_of_speed_only_when_trusted():
    job = Job("j", "m", max_tokens=16, prompt_tokens=100)
    claimed = scheduler.job_cost(_record("p", decode_tps=100.0), job)
    slow = _record("p", decode_tps=100.0)
    slow.speeds["m"] = ProviderSpeed()
    slow.speeds["m"].observe(1.0, 100.0)  # one request: a second to first content
    assert not slow.speeds["m"].trusted
    assert scheduler.job_cost(slow, job) == pytest.approx(1.0 + 16 / 100.0)
    assert scheduler.job_cost(slow, job) > claimed
    fast = _record("p", decode_tps=100.0)
    fast.speeds["m"] = ProviderSpeed()
    fast.speeds["m"].observe(0.0, 10_000.0)  # one lucky request proves nothing yet
    assert scheduler.job_cost(fast, job) == pytest.approx(claimed)
    for _ in range(TRUST_AFTER):
        fast.speeds["m"].observe(0.0, 10_000.0)
    assert scheduler.job_cost(fast, job) < claimed


def test_a_slow_newcomer_loses_the_first_choice_after_one_request():
    s = RegistryState(make_config(), Metrics(), rng=random.Random(1))
    s.register(_record("slow", decode_tps=5000.0), 0.0)  # claims to be the fastest
    s.register(_record("steady", decode_tps=100.0), 0.0)
    first = s.acquire(AcquireRequest(Job("r0", "m")), 1.0).value
    assert isinstance(first, Grant) and first.lease.provider_id == "slow"
    s.release(first.lease, SUCCESS, 6.0, Observed(ttfc=5.0, decode_tps=5000.0, prompt_tokens=10))
    for i in range(1, 4):
        grant = s.acquire(AcquireRequest(Job(f"r{i}", "m")), 6.0 + i).value
        assert isinstance(grant, Grant) and grant.lease.provider_id == "steady"
        s.release(grant.lease, SUCCESS, 6.5 + i)


def test_a_provider_outpaced_again_and_again_stops_being_first_and_gets_a_strike():
    s = RegistryState(make_config(outpaced_strikes=3), Metrics(), rng=random.Random(1))
    s.register(_record("zombie", decode_tps=500.0), 0.0)
    s.register(_record("steady", decode_tps=400.0), 0.0)
    first = s.acquire(AcquireRequest(Job("r0", "m")), 0.0).value
    assert isinstance(first, Grant) and first.lease.provider_id == "zombie"
    for i in range(3):
        grant = s.acquire(AcquireRequest(Job(f"z{i}", "m"), exclude=frozenset({"steady"})), 1.0).value
        assert isinstance(grant, Grant)
        s.release(grant.lease, race.loser_verdict(Phase.PREAMBLE, timed_out=False), 2.0 + i,
                  Outpaced(silent_for=2.5, boilerplate_only=True))
    assert s.breaker.cooldowns(5.0) == {}  # a single strike does not cool (2 needed)
    assert s.breaker._recent  # but it was counted
    chosen = s.acquire(AcquireRequest(Job("after", "m")), 5.0).value
    assert isinstance(chosen, Grant) and chosen.lease.provider_id == "steady"


def test_an_unmeasured_provider_takes_few_jobs_at_a_time_while_others_have_room():
    s = RegistryState(make_config(), Metrics(), rng=random.Random(1))
    s.register(_record("boaster", decode_tps=10_000.0), 0.0)  # claims it is fast
    s.register(_record("steady", decode_tps=100.0), 0.0)
    chosen = []
    for i in range(7):
        grant = s.acquire(AcquireRequest(Job(f"r{i}", "m")), 0.0).value
        assert isinstance(grant, Grant)
        chosen.append(grant.lease.provider_id)
    # Two each while the other has room under probation; then by estimate (never refused).
    assert chosen == ["boaster"] * 2 + ["steady"] * 2 + ["boaster"] * 2 + ["steady"]
    assert scheduler.PROBATION_SLOTS == 2


def test_a_measured_provider_is_off_probation():
    s = RegistryState(make_config(), Metrics(), rng=random.Random(1))
    s.register(_record("fast", decode_tps=100.0), 0.0)
    s.register(_record("slow", decode_tps=10.0), 0.0)
    for i in range(TRUST_AFTER):
        grant = s.acquire(AcquireRequest(Job(f"w{i}", "m"), exclude=frozenset({"slow"})), 0.0).value
        assert isinstance(grant, Grant)
        s.release(grant.lease, SUCCESS, 1.0, Observed(0.05, 1000.0, 10))
    held = [s.acquire(AcquireRequest(Job(f"r{i}", "m")), 2.0).value for i in range(4)]
    assert [g.lease.provider_id for g in held if isinstance(g, Grant)] == ["fast"] * 4
    assert scheduler.on_probation(s.providers["slow"], Job("x", "m")) is False  # nothing held


def test_a_grant_carries_the_adaptive_hedge_delay():
    s = RegistryState(make_config(hedge_floor=0.01), Metrics(), rng=random.Random(1))
    s.register(_record("a", decode_tps=100.0), 0.0)
    job = Job("r", "m", prompt_tokens=100)
    fixed = (5.0 + 0.001 * 100) * 0.5
    grant = s.acquire(AcquireRequest(job), 0.0).value
    assert isinstance(grant, Grant) and grant.hedge_after == pytest.approx(fixed)
    for i in range(MIN_SAMPLES):
        s.release(grant.lease, SUCCESS, 1.0, Observed(0.2 + i / 1000, 50.0, 100))
        grant = s.acquire(AcquireRequest(job), 1.0).value
        assert isinstance(grant, Grant)
    assert grant.hedge_after == pytest.approx(0.2 + 18 / 1000)  # nearest rank: 19th of 20
    assert scheduler.estimated_seconds(s.providers["a"], job, 1.0) > 0


# ---- end to end: the zombie ---------------------------------------------------------------


async def test_a_zombie_is_learned_and_no_longer_chosen_first(autojump_clock):
    """Role, then silence: once outpaced a few times it stops being the primary."""
    async with open_harness(hedge_floor=0.05) as h:
        zombie = await h.add_provider("zombie", behaviour=Behaviour(Fault.STALL_AFTER_ROLE),
                                      decode_tps=1000)
        await h.add_provider("good", decode_tps=400)
        for _ in range(30):
            result = await h.chat(stream=False)
            assert result.status == 200 and result.headers["x-provider-id"] == "good"
        sent_to_zombie = [rid for _, event, rid in zombie.log if event == "received"]
        assert len(sent_to_zombie) <= 3  # chosen first only while it was being learned
        snapshot = await h.registry.snapshot()
        zombie_view = next(p for p in snapshot.providers if p.id == "zombie")
        assert zombie_view.models[0].speed is not None
        assert zombie_view.models[0].speed.outpaced_penalty_s > 0
        # What operators see says which speeds are believed: measured, or only declared.
        admin = await h.request("/v1/admin/providers", method="GET",
                                headers={"authorization": f"Bearer {ADMIN_KEY}"})
        sources = {p["id"]: p["models"][0]["speed"]["source"] for p in admin.json()["providers"]}
        assert sources == {"good": "observed", "zombie": "declared"}
        page = await h.request("/status", method="GET",
                               headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert "tok/s observed" in page.body.decode() and "tok/s declared" in page.body.decode()
        await h.assert_quiescent()


async def _six_served_by_good(h: Harness) -> list[float]:
    """Six requests at once, each answered by "good"; how long each took."""
    took: list[float] = []

    async def one() -> None:
        started = trio.current_time()
        result = await h.chat(stream=False)
        assert result.status == 200 and result.headers["x-provider-id"] == "good"
        took.append(trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(one)
    return took


async def test_a_primary_loading_a_cold_model_gets_its_backup_past_a_spent_budget(
        autojump_clock):
    """A provider that answers "accepted" and then nothing (probe): once the hedge budget
    was spent its consumers waited up to the 600 s cold-load budget, and losing a race
    while "accepted" taught routing nothing, so it stayed first choice."""
    async with open_harness(hedge_budget=0.01, hedge_window=10.0,
                            adaptive_hedging=False) as h:
        cold = await h.add_provider("cold", behaviour=Behaviour(Fault.STALL, accepted_delay=0.0),
                                    decode_tps=100_000)
        await h.add_provider("good", decode_tps=1000)
        took = await _six_served_by_good(h)
        sent_to_cold = len([e for _, e, _ in cold.log if e == "received"])
        assert sent_to_cold >= 3  # past the burst of 2 the budget allows
        assert max(took) < 3.0  # each at its hedge time (2.5 s), none waiting for the window
        assert h.state.providers["cold"].speeds[MODEL].penalty > 0  # slow now: routed around
        started = trio.current_time()
        assert (await h.chat(stream=False)).headers["x-provider-id"] == "good"
        assert trio.current_time() - started < 1.0
        assert len([e for _, e, _ in cold.log if e == "received"]) == sent_to_cold
        assert not h.state.breaker._recent.get(("cold", MODEL, "base"))  # no strike
        await h.assert_quiescent()


async def test_a_backup_refused_by_the_budget_is_asked_for_again(autojump_clock):
    """With the budget spent, a zombie primary's consumer still gets a backup when it frees up.

    Burst only (1 % of a few primaries rounds to nothing): two backups per 10 s
    window. Four of six requests start on the zombie (two on probation, two
    more once the good provider has as many); before, the two whose backup was
    refused waited out the whole 600 s preamble budget.
    """
    async with open_harness(hedge_budget=0.01, hedge_window=10.0, preamble_timeout=600.0,
                            adaptive_hedging=False) as h:
        zombie = await h.add_provider("zombie", behaviour=Behaviour(Fault.STALL_AFTER_ROLE),
                                      decode_tps=100_000)
        await h.add_provider("good", decode_tps=10)
        took = await _six_served_by_good(h)
        assert len([e for _, e, _ in zombie.log if e == "received"]) == 4
        took.sort()
        assert max(took[:2]) < 1.0  # straight to the good provider
        assert took[2:4] == pytest.approx([2.5, 2.5], abs=0.2)  # backups from the burst
        assert 10.0 < took[4] <= took[5] < 15.0  # once the window let them, not 600 s later
        _, backups = h.state.hedge_budget.counts(trio.current_time())
        assert backups <= 2
        await h.assert_quiescent()

"""The registry's state, synchronously: no event loop, the clock is an argument."""

from __future__ import annotations

import inspect
import random
import typing

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.capabilities import parse_version
from coordinator.metrics import Metrics
from coordinator.protocol import ModelInfo
from coordinator.registry.index import reference_key
from coordinator.registry.mirror import Freed, Renewed, Struck
from coordinator.registry.models import CapabilityMemory
from coordinator.registry.state import (
    READS,
    AcquireRequest,
    Done,
    Refusal,
    Refused,
    RegisterRefused,
    RegistryState,
)
from coordinator.registry.table import (
    CANCELLED,
    SUCCESS,
    Grant,
    Job,
    Outcome,
    ProviderRecord,
    RecentVerdicts,
)
from coordinator.registry.traits import Traits

from .harness import make_config


def record(pid: str, *models: str, session: int = 1, slots: int = 1, version: str = "0.7.0",
           key: str = "key", **kw: object) -> ProviderRecord:
    return ProviderRecord(pid, session, version, parse_version(version),
                          {m: ModelInfo(m) for m in models or ("m",)}, max_slots=slots,
                          signing_key=key, **kw)  # type: ignore[arg-type]


def state(**config: object) -> RegistryState:
    return RegistryState(make_config(**config), Metrics(), rng=random.Random(1))


def ask(model: str = "m", rid: str = "r", **kw: object) -> AcquireRequest:
    return AcquireRequest(Job(rid, model, **kw))  # type: ignore[arg-type]


def test_a_free_slot_is_granted_with_a_unique_wire_id():
    s = state()
    s.register(record("a", slots=2), now=0.0)
    first, second = s.acquire(ask(), 1.0).value, s.acquire(ask(), 1.0).value
    assert isinstance(first, Grant) and isinstance(second, Grant)
    assert first.lease.request_id != second.lease.request_id
    assert first.lease.request_id.startswith("r.") and first.queued == 0.0
    assert s.providers["a"].free_slots == 0


def test_busy_providers_queue_and_a_release_grants_in_order():
    s = state()
    s.register(record("a"), now=0.0)
    held = s.acquire(ask(rid="held"), 0.0).value
    assert isinstance(held, Grant)
    first, second = ask(rid="first"), ask(rid="second")
    assert s.acquire(first, 1.0).value is None and s.acquire(second, 2.0).value is None
    assert len(s.queue) == 2
    [(ticket, decision)] = s.release(held.lease, SUCCESS, 5.0).answers
    assert ticket is first.ticket and isinstance(decision, Grant)
    assert decision.queued == 4.0 and decision.lease.request_id.startswith("first.")


def test_the_queue_is_bounded():
    s = state(queue_max=1)
    s.register(record("a"), now=0.0)
    s.acquire(ask(), 0.0)
    assert s.acquire(ask(), 0.0).value is None
    refused = s.acquire(ask(), 0.0).value
    assert isinstance(refused, Refused) and refused.kind is Refusal.QUEUE_FULL


def test_a_withdrawn_request_leaves_the_queue():
    s = state()
    s.register(record("a"), now=0.0)
    s.acquire(ask(), 0.0)
    waiting = ask(rid="w")
    s.acquire(waiting, 0.0)
    assert s.withdraw(waiting.ticket, 3.0).answers == ()
    assert not s.queue


def test_a_queued_request_that_became_unservable_is_refused_by_the_release():
    s = state(breaker_strikes=1)
    s.register(record("a"), now=0.0)
    held = s.acquire(ask(), 0.0).value
    assert isinstance(held, Grant)
    s.acquire(ask(rid="w"), 0.0)
    # a strike: "a" cools down
    [(_, decision)] = s.release(held.lease, Outcome.failure(500), 1.0).answers
    assert isinstance(decision, Refused) and decision.kind is Refusal.UNSERVABLE
    assert "cooling down" in decision.detail


def test_refusal_kinds():
    s = state()
    unknown = s.acquire(ask("nope"), 0.0).value
    assert isinstance(unknown, Refused) and unknown.kind is Refusal.UNKNOWN_MODEL
    s.register(record("a", max_request_bytes=1000), now=0.0)
    big = s.acquire(AcquireRequest(Job("r", "m", request_bytes=5000)), 0.0).value
    assert isinstance(big, Refused) and big.kind is Refusal.TOO_LARGE
    assert "accept at most 1000 bytes" in big.detail
    excluded = s.acquire(AcquireRequest(Job("r", "m"), exclude=frozenset({"a"})), 0.0).value
    assert isinstance(excluded, Refused) and excluded.kind is Refusal.EXHAUSTED
    s.register(record("b", version="0.6.0"), now=0.0)
    tools = s.acquire(AcquireRequest(Job("r", "m", traits=Traits(has_tools=True)),
                                     exclude=frozenset({"a"})), 0.0).value
    assert isinstance(tools, Refused) and tools.kind is Refusal.EXHAUSTED


def test_a_model_whose_providers_left_queues_until_it_is_forgotten():
    s = state(model_forget_after=60.0)
    s.register(record("a", "gone"), now=0.0)
    s.unregister("a", 1, now=10.0)
    assert s.acquire(ask("gone"), 20.0).value is None  # remembered: wait for its providers
    s.withdraw(s.queue[0].request.ticket, 20.0)
    forgotten = s.acquire(ask("gone"), 71.0).value
    assert isinstance(forgotten, Refused) and forgotten.kind is Refusal.UNKNOWN_MODEL


IMAGES = Traits(requires_vision=True)


def vision_record(pid: str, **kw: object) -> ProviderRecord:
    return ProviderRecord(pid, 1, "0.7.0", parse_version("0.7.0"),
                          {"m": ModelInfo("m", is_vision=True)}, signing_key="key",
                          **kw)  # type: ignore[arg-type]


def test_a_capability_no_known_provider_has_is_refused_for_good():
    s = state()
    s.register(record("blind"), now=0.0)
    refused = s.acquire(ask(traits=IMAGES), 0.0).value
    assert isinstance(refused, Refused) and refused.kind is Refusal.INCAPABLE
    old = state()
    old.register(record("old", version="0.6.0"), now=0.0)
    refused = old.acquire(ask(traits=Traits(has_tools=True)), 0.0).value
    assert isinstance(refused, Refused) and refused.kind is Refusal.INCAPABLE
    assert "tool calls" in refused.detail and "0.6.3" in refused.detail


def test_a_mirrored_capable_provider_keeps_the_refusal_retryable_even_after_it_goes():
    s = state(model_forget_after=60.0)
    s.register(record("blind"), now=0.0)
    s.mirror("other", [vision_record("eyes", instance="other")], 0.0)
    s.cool_remote(("eyes", "m", "vision"), 30.0, 0.0)
    cooling = s.acquire(ask(traits=IMAGES), 1.0).value
    assert isinstance(cooling, Refused) and cooling.kind is Refusal.UNSERVABLE
    s.forget_instance("other", 2.0)  # its instance went: remembered, it may come back
    away = s.acquire(ask(traits=IMAGES), 3.0).value
    assert isinstance(away, Refused) and away.kind is Refusal.UNSERVABLE
    forgotten = s.acquire(ask(traits=IMAGES), 62.0).value
    assert isinstance(forgotten, Refused) and forgotten.kind is Refusal.INCAPABLE


def test_an_allowlist_without_the_capable_provider_stays_retryable():
    """The allowlist is the consumer's choice of the moment; the model's capability is not."""
    s = state()
    s.register(record("blind"), now=0.0)
    s.register(vision_record("eyes"), now=0.0)
    refused = s.acquire(ask(traits=IMAGES, allowlist=frozenset({"blind"})), 0.0).value
    assert isinstance(refused, Refused) and refused.kind is Refusal.UNSERVABLE


def test_an_offline_model_queues_only_what_its_departed_providers_could_serve():
    s = state(model_forget_after=60.0)
    s.register(vision_record("eyes"), now=0.0)
    s.register(record("blind", "other"), now=0.0)
    s.unregister("eyes", 1, 1.0)
    s.unregister("blind", 1, 1.0)
    assert s.acquire(ask(traits=IMAGES), 2.0).value is None  # eyes may come back: wait
    refused = s.acquire(ask("other", traits=IMAGES), 2.0).value
    assert isinstance(refused, Refused) and refused.kind is Refusal.INCAPABLE
    assert s.acquire(ask("other"), 2.0).value is None  # plain requests still wait


def test_departed_capabilities_are_bounded_and_forgotten():
    memory = CapabilityMemory(forget_after=60.0, capacity=3)
    for i in range(10):
        for caps in (frozenset(), frozenset({"tools"}), frozenset({"tools"})):
            memory.left(f"m{i}", caps, float(i))
    assert len(memory) == 3 and memory.of("m0", 10.0) is None  # the oldest went first
    assert memory.of("m9", 10.0) == [frozenset(), frozenset({"tools"})]  # one per set
    assert memory.of("m9", 69.0) is None  # forgotten after forget_after
    memory.left("late", frozenset(), 200.0)
    assert len(memory) == 1  # expired models leave as new ones arrive


def test_errors_count_verdicts_on_the_providers_health_only():
    s = state(breaker_strikes=100)
    s.register(record("a", slots=8), now=0.0)
    for outcome in (SUCCESS, Outcome.failure(500), Outcome.failure(502), Outcome.failure(400),
                    Outcome.failure(503), CANCELLED, SUCCESS):
        grant = s.acquire(ask(), 1.0).value
        assert isinstance(grant, Grant)
        s.release(grant.lease, outcome, 2.0)
    [view] = s.snapshot(2.0).providers
    # 400 (the request's fault), 503 (capacity) and a cancel say nothing of its health.
    assert (view.served, view.failed, view.recent_verdicts, view.recent_errors) == (2, 2, 4, 2)
    assert s.snapshot(2.0).as_json()["providers"][0]["recent"] == {"verdicts": 4, "errors": 2}


def test_recent_verdicts_hold_the_last_64():
    recent = RecentVerdicts()
    for _ in range(10):
        recent.add(error=True)
    for _ in range(60):
        recent.add(error=False)
    assert (recent.count, recent.errors) == (64, 4)  # six of the ten errors have aged out


def test_try_acquire_never_queues():
    s = state()
    s.register(record("a"), now=0.0)
    assert isinstance(s.try_acquire(ask(), 0.0).value, Grant)
    assert s.try_acquire(ask(), 0.0).value is None and not s.queue


def test_a_new_session_supersedes_the_old_and_starts_clean():
    s = state(breaker_strikes=1)
    s.register(record("a", session=1), now=0.0)
    old = s.acquire(ask(), 0.0).value
    assert isinstance(old, Grant)
    s.release(old.lease, Outcome.failure(500), 1.0)
    assert s.breaker.is_cooling(("a", "m", "base"), 1.0)
    superseded = s.register(record("a", session=2), now=2.0).value
    assert superseded is not None and superseded.session == 1
    assert not s.breaker.is_cooling(("a", "m", "base"), 2.0)
    s.unregister("a", 1, now=3.0)  # the old session's late goodbye changes nothing
    assert s.providers["a"].session == 2


def test_a_live_id_is_not_taken_by_another_key():
    s = state()
    s.register(record("a", key="k1"), now=0.0)
    with pytest.raises(RegisterRefused):
        s.register(record("a", session=2, key="k2"), now=1.0)
    assert s.providers["a"].session == 1


@pytest.mark.parametrize(("outcome", "cooling", "served"), [
    (SUCCESS, False, 1), (CANCELLED, False, 0), (Outcome.failure(504), True, 0),
    (Outcome.failure(429), False, 0), (Outcome.failure(400), False, 0),
])
def test_release_verdicts(outcome, cooling, served):
    s = state(breaker_strikes=1)
    s.register(record("a"), now=0.0)
    grant = s.acquire(ask(), 0.0).value
    assert isinstance(grant, Grant)
    s.release(grant.lease, outcome, 1.0)
    assert s.breaker.is_cooling(("a", "m", "base"), 1.0) is cooling
    assert s.providers["a"].served == served and s.providers["a"].free_slots == 1


def test_a_verdict_on_an_old_session_is_ignored():
    s = state(breaker_strikes=1)
    s.register(record("a", session=1), now=0.0)
    grant = s.acquire(ask(), 0.0).value
    assert isinstance(grant, Grant)
    s.register(record("a", session=2), now=1.0)
    s.release(grant.lease, Outcome.failure(500), 2.0)
    assert not s.breaker.is_cooling(("a", "m", "base"), 2.0)


# -- scale-out: what other instances publish (docs/scale-out.md)

def test_a_reservation_never_replaces_a_lease_with_the_same_id():
    """Another instance's relay named the wire id of a request already on the provider and
    took over its lease (and, in the peer server, its stream). Found by the fuzz campaign."""
    s = state()
    s.register(record("a", slots=4), now=0.0)
    grant = s.acquire(ask(), 1.0).value
    assert isinstance(grant, Grant)
    clash = attrs.evolve(grant.lease, cost=99.0)
    assert s.reserve(clash, 2.0).value == "duplicate"
    assert s.providers["a"].leases == {grant.lease.request_id: grant.lease}
    assert s.reserve(attrs.evolve(clash, request_id="other.1"), 2.0).value is None  # others still fit


def test_mirrored_work_weighs_like_own_work():
    s = state()
    s.register(record("here", slots=8), now=0.0)
    s.mirror("b", [record("there", slots=8, external_in_use=3, external_seconds=30.0, instance="b")], 0.0)
    grant = s.acquire(ask(), 1.0).value
    assert isinstance(grant, Grant) and grant.lease.provider_id == "here"
    assert s.providers["there"].free_slots == 5
    ours = s.acquire(AcquireRequest(Job("r2", "m"), exclude=frozenset({"here"})), 1.0).value
    assert isinstance(ours, Grant) and ours.lease.provider_id == "there"
    # The home counts our lease in its figures too: not counted twice here.
    s.mirror("b", [record("there", slots=8, external_in_use=4, instance="b",
                          external_seconds=30.0 + ours.lease.cost)], 2.0)
    assert s.providers["there"].queued_seconds == pytest.approx(30.0 + ours.lease.cost)
    assert s.providers["there"].free_slots == 4


def test_a_local_session_wins_over_a_mirrored_one_and_supersedes_no_socket():
    s = state()
    s.mirror("b", [record("p", session=1, instance="b")], 0.0)
    old = s.register(record("p", session=1), now=1.0).value  # it moved here; same number
    assert old is not None and old.instance == "b"
    s.mirror("b", [record("p", session=1, instance="b")], 2.0)  # b's stale page
    assert s.providers["p"].instance == ""


def test_a_failure_through_a_gone_instance_is_no_strike():
    s = state(breaker_strikes=1)
    s.mirror("b", [record("p", instance="b")], 0.0)
    grant = s.acquire(ask(), 0.0).value
    assert isinstance(grant, Grant) and grant.lease.instance == "b"
    s.forget_instance("b", 1.0)
    s.release(grant.lease, Outcome.failure(502), 1.0)
    assert not s.breaker.knows(("p", "m", "base"))


def test_the_snapshot_shows_the_table():
    s = state(breaker_strikes=1)
    s.register(record("b", "m", "v"), now=0.0)
    s.register(record("a"), now=0.0)
    grant = s.acquire(ask(), 0.0).value
    assert isinstance(grant, Grant)
    s.release(grant.lease, Outcome.failure(500), 10.0)
    snapshot = s.snapshot(20.0)
    assert [p.id for p in snapshot.providers] == ["a", "b"]
    cooled = next(p for p in snapshot.providers if p.cooldowns)
    assert cooled.cooldowns[0].seconds_left == 290.0
    assert snapshot.models == ("m", "v") and snapshot.leases == 0
    assert snapshot.as_json()["providers"][0]["slots"] == {"in_use": 0, "max": 1}


# ---- the index never disagrees with a full scan -----------------------------------------

MODELS = ("m", "n", "v")
operations = st.lists(st.one_of(
    st.tuples(st.just("register"), st.sampled_from("abcdefgh"), st.sets(st.sampled_from(MODELS),
              min_size=1), st.integers(1, 3), st.sampled_from(["0.6.0", "0.7.0", "x"]),
              st.floats(10, 2000)),
    st.tuples(st.just("unregister"), st.sampled_from("abcdefgh")),
    st.tuples(st.just("acquire"), st.sampled_from(MODELS), st.booleans(), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 50), st.sampled_from([0, 500, 504, 429])),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(operations, st.sampled_from(MODELS), st.booleans(), st.booleans(),
       st.sets(st.sampled_from("abcdefgh")))
def test_the_index_returns_what_a_full_scan_would(ops, model, tools, vision, exclude):
    s = state(breaker_strikes=1, queue_max=1000)
    sessions = iter(range(1, 10_000))
    leases = []
    now = 0.0
    for op in ops:
        now += 1.0
        done = None
        match op:
            case ("register", pid, models, slots, version, tps):
                done = s.register(
                    ProviderRecord(pid, next(sessions), version, parse_version(version),
                                   {m: ModelInfo(m, is_vision=m == "v") for m in models},
                                   max_slots=slots, decode_tps=tps, signing_key="k"), now)
            case ("unregister", pid):
                if pid in s.providers:
                    done = s.unregister(pid, s.providers[pid].session, now)
            case ("acquire", m, t, v):
                done = s.acquire(AcquireRequest(Job(f"r{now}", m, traits=Traits(t, v))), now)
                if isinstance(done.value, Grant):
                    leases.append(done.value.lease)
            case ("release", i, status):
                if leases:
                    lease = leases.pop(i % len(leases))
                    done = s.release(lease, SUCCESS if not status else Outcome.failure(status),
                                     now)
        for _, decision in done.answers if done is not None else ():
            if isinstance(decision, Grant):
                leases.append(decision.lease)
        # 1. Each index holds exactly the model's providers with a free slot, keyed afresh.
        for m, serving in s.by_model.items():
            assert s.free[m].contents() == {
                pid: reference_key(r, m) for pid, r in serving.items() if r.free_slots > 0}
        assert set(s.free) == set(s.by_model)
    # 2. A decision from the index agrees with the full scan.
    if model not in s.by_model:
        return
    request = AcquireRequest(Job("probe", model, traits=Traits(tools, vision)),
                             exclude=frozenset(exclude))
    # The full scan: every provider's answer from the one gate function.
    reasons = {pid: s.router.gate(r, request, now) for pid, r in s.by_model[model].items()}
    eligible = {pid for pid, why in reasons.items() if why is None}
    free = {pid for pid in eligible if s.providers[pid].free_slots > 0}
    chosen, gated = s.router.pick(request, now)
    assert (chosen is None) == (not free)
    assert chosen is None or chosen.provider_id in free
    assert all(reasons[pid] == why for pid, why in gated.items())  # the same gate's answers
    if chosen is None:  # queue while someone eligible is busy; else refuse with every reason
        why = s.router.why_not(request, now, gated)
        assert why == (None if eligible else set(reasons.values()))


def test_an_encryption_key_used_on_another_instance_is_refused():
    """Nobody may register the X25519 key a provider uses, on this instance or another."""
    s = state()
    s.mirror("other", [record("remote-a", public_key="KEY-A", instance="other")], 0.0)
    with pytest.raises(RegisterRefused, match="public_key"):
        s.register(record("copycat", public_key="KEY-A"), 1.0)
    s.register(record("honest", public_key="KEY-B"), 1.0)
    s.forget_instance("other", 2.0)  # gone with its instance: the key is free again
    s.register(record("copycat", public_key="KEY-A"), 3.0)
    assert set(s.providers) == {"honest", "copycat"}


def test_a_cooldown_from_another_instance_answers_its_models_waiters():
    s = state()
    s.register(record("a"), now=0.0)
    held = s.acquire(ask(), 0.0).value
    assert isinstance(held, Grant)
    waiting = s.acquire(ask(rid="w"), 0.0)
    assert waiting.value is None and waiting.answers == ()
    [(_, decision)] = s.cool_remote(("a", "m", "base"), 300.0, 1.0).answers
    assert isinstance(decision, Refused) and decision.kind is Refusal.UNSERVABLE


# ---- every mutation answers the waiters it makes answerable (no event loop) ------------

def queued_behind_a_busy_provider(**config: object) -> tuple[RegistryState, Grant, AcquireRequest]:
    """``a`` (one slot, held) serves m; ``b`` serves it too but cools; one request waits."""
    s = state(**config)
    s.register(record("a"), now=0.0)
    s.register(record("b"), now=0.0)
    s.cool_remote(("b", "m", "base"), 300.0, 0.0)
    held = s.acquire(ask(rid="held"), 0.0).value
    assert isinstance(held, Grant) and held.lease.provider_id == "a"
    waiting = ask(rid="w")
    assert s.acquire(waiting, 1.0).value is None
    return s, held, waiting


def test_a_departure_refuses_the_waiters_it_leaves_without_a_provider():
    s, _, waiting = queued_behind_a_busy_provider()
    [(ticket, decision)] = s.unregister("a", 1, 2.0).answers
    assert ticket is waiting.ticket and isinstance(decision, Refused)
    assert decision.kind is Refusal.UNSERVABLE and "cooling down" in decision.detail
    assert not s.queue


def test_a_cooldown_from_another_instance_refuses_the_waiters_it_strands():
    s, _, waiting = queued_behind_a_busy_provider()
    [(ticket, decision)] = s.cool_remote(("a", "m", "base"), 300.0, 2.0).answers
    assert ticket is waiting.ticket and isinstance(decision, Refused)
    assert decision.kind is Refusal.UNSERVABLE


def test_a_release_grants_the_slot_to_the_first_waiter():
    s, held, waiting = queued_behind_a_busy_provider()
    [(ticket, decision)] = s.release(held.lease, SUCCESS, 2.0).answers
    assert ticket is waiting.ticket and isinstance(decision, Grant)
    assert decision.lease.provider_id == "a" and decision.queued == 1.0


def test_a_superseding_session_answers_the_waiters_at_once():
    s, _, waiting = queued_behind_a_busy_provider()
    # The new session holds none of the old one's leases: its slot is the waiter's.
    [(ticket, decision)] = s.register(record("a", session=2), now=2.0).answers
    assert ticket is waiting.ticket and isinstance(decision, Grant)
    assert decision.lease.session == 2
    s = state()
    s.register(record("a"), now=0.0)
    assert isinstance(s.acquire(ask(rid="held"), 0.0).value, Grant)
    tools = ask(rid="t", traits=Traits(has_tools=True))
    assert s.acquire(tools, 1.0).value is None  # a tools request waits for "a"
    # "a" comes back too old for tool calls: nobody connected can serve the request now.
    [(ticket, refused)] = s.register(record("a", session=2, version="0.6.0"), now=2.0).answers
    assert ticket is tools.ticket and isinstance(refused, Refused)
    assert refused.kind is Refusal.UNSERVABLE and "capability floor" in refused.detail


def test_a_provider_renewed_elsewhere_is_back_for_the_waiters_here():
    """Its cooldowns are gone with its new session; a waiter need not wait for a release
    (this once waited: the renewal marked none of its models)."""
    s, _, waiting = queued_behind_a_busy_provider()
    [(ticket, decision)] = s.renewed_remote("b", 2.0).answers
    assert ticket is waiting.ticket and isinstance(decision, Grant)
    assert decision.lease.provider_id == "b"


def test_a_cleared_cooldown_and_a_freed_remote_slot_answer_waiters():
    s, _, waiting = queued_behind_a_busy_provider()
    [(ticket, decision)] = s.clear_remote(("b", "m", "base"), 2.0).answers
    assert ticket is waiting.ticket and isinstance(decision, Grant)
    s = state()
    s.mirror("other", [record("far", instance="other", external_in_use=1)], 0.0)
    waiting = ask(rid="w")
    assert s.acquire(waiting, 0.0).value is None
    [(ticket, decision)] = s.freed_remote("far", 0, 1.0).answers
    assert ticket is waiting.ticket and isinstance(decision, Grant)


def test_a_gone_instance_answers_the_waiters_for_its_providers():
    s = state()
    s.register(record("here"), now=0.0)
    s.cool_remote(("here", "m", "base"), 300.0, 0.0)
    s.mirror("other", [record("far", instance="other", external_in_use=1)], 0.0)
    waiting = ask(rid="w")
    assert s.acquire(waiting, 0.0).value is None
    [(ticket, decision)] = s.forget_instance("other", 1.0).answers
    assert ticket is waiting.ticket and isinstance(decision, Refused)
    assert decision.kind is Refusal.UNSERVABLE


def test_every_mutation_of_the_facade_returns_what_must_be_sent():
    """A public method of RegistryState is a read, or a mutation that returns a Done
    (its answers): none can change the table and leave the queue un-rechecked."""
    hints = {name: typing.get_type_hints(method).get("return")
             for name, method in inspect.getmembers(RegistryState, inspect.isfunction)
             if not name.startswith("_")}
    mutations = {name for name in hints if name not in READS}
    assert mutations >= {"register", "unregister", "acquire", "try_acquire", "withdraw",
                         "release", "mirror", "forget_instance", "reserve", "cool_remote",
                         "clear_remote", "freed_remote", "renewed_remote"}
    for name in mutations:
        assert typing.get_origin(hints[name]) is Done, name
    for name in READS - {n for n, _ in inspect.getmembers(RegistryState)}:
        raise AssertionError(f"{name} is not a member of RegistryState")


def test_events_to_share_leave_with_the_mutation_that_made_them():
    s = state(breaker_strikes=1)
    s.register(record("a"), now=0.0)
    grant = s.acquire(ask(), 0.0).value
    assert isinstance(grant, Grant)
    assert s.release(grant.lease, Outcome.failure(500), 1.0).shared == (
        Freed("a", 0), Struck(("a", "m", "base"), 500))
    assert s.register(record("a", session=2), now=2.0).shared == (Renewed("a"),)

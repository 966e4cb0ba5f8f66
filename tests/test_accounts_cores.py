"""The accounts' pure cores (limits, ledger, keys) and the SQLite store, without a network.

Limits and the ledger are arithmetic on values: every rule is checked with the clock
and the calendar as arguments. The store runs in memory (inline) or on a file.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.accounts import limits
from coordinator.accounts.keys import (
    BudgetWindow,
    KeyRecord,
    KeySpecError,
    KeyState,
    Limits,
    check_name,
    hash_secret,
    limits_from,
    models_from,
    new_secret,
)
from coordinator.accounts.ledger import Close, Ledger, Reservation, prompt_ceiling
from coordinator.accounts.service import UNNAMED as UNNAMED_ACCOUNT
from coordinator.accounts.service import Accounts, Granted
from coordinator.accounts.sqlite import PRUNE_EVERY, SqliteStore
from coordinator.accounts.store import UNNAMED, KeyExists

DAY = 86400.0
T0 = datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.UTC).timestamp()


def _reservation(request_id: str = "r1", *, prompt: int = 10, completion: int = 100,
                 ceiling: int | None = None, key: str | None = "k") -> Reservation:
    return Reservation(request_id, key, "m1", prompt, completion,
                       completion if ceiling is None else ceiling, "all")


# ---- limits -----------------------------------------------------------------------


def test_a_bucket_refills_at_its_limit_per_minute_and_never_past_it() -> None:
    bucket = limits.Bucket.full(60, now=0.0)
    bucket.take(60, 0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(1.0)  # one a second
    assert bucket.wait_for(30, 10.0) == pytest.approx(20.0)
    assert bucket.wait_for(61, 10.0) == math.inf  # more than it ever holds
    bucket.give(1000, 10.0)
    assert bucket.level == 60
    assert bucket.until_full(10.0) == 0


def test_admission_takes_a_request_and_the_bound_and_settling_gives_back_the_unused() -> None:
    key = Limits(requests_per_minute=2, tokens_per_minute=1000, concurrent_requests=1,
                 token_budget=5000)
    use = limits.KeyUse.fresh(key, 0.0)
    first = limits.admit(key, use, 400, 0.0, "all", None)
    assert isinstance(first, limits.Admitted)
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-tokens"] == "600"
    busy = limits.admit(key, use, 400, 0.0, "all", None)
    assert isinstance(busy, limits.Throttled) and busy.refusal is limits.Refusal.CONCURRENCY
    limits.settle(use, 400, 150, 0.0, "all")  # used 150 of 400
    assert use.in_flight == 0 and use.budget_used == 150
    assert use.tokens is not None and use.tokens.level == pytest.approx(850)
    limits.admit(key, use, 400, 0.0, "all", None)
    limits.settle(use, 400, 500, 0.0, "all")  # a prompt longer than estimated: taken too
    assert use.budget_used == 650
    assert use.tokens is not None and use.tokens.level == pytest.approx(350)
    over = limits.admit(key, use, 10, 0.0, "all", None)
    assert isinstance(over, limits.Throttled) and over.refusal is limits.Refusal.REQUESTS
    assert over.retry_after == pytest.approx(30.0)
    assert over.headers["x-ratelimit-remaining-requests"] == "0"


def test_refusals_say_whether_waiting_helps() -> None:
    key = Limits(tokens_per_minute=1000, token_budget=2000)
    use = limits.KeyUse.fresh(key, 0.0)
    too_big = limits.admit(key, use, 1001, 0.0, "all", None)
    assert isinstance(too_big, limits.Throttled)
    assert (too_big.refusal, too_big.retry_after) == (limits.Refusal.TOO_BIG, None)
    use.budget_used = 1900
    gone = limits.admit(key, use, 200, 0.0, "all", None)
    assert isinstance(gone, limits.Throttled)
    assert (gone.refusal, gone.retry_after) == (limits.Refusal.BUDGET_GONE, None)
    daily = limits.admit(key, use, 200, 0.0, "all", period_left=3600.0)
    assert isinstance(daily, limits.Throttled)
    assert (daily.refusal, daily.retry_after) == (limits.Refusal.BUDGET, 3600.0)
    # A new window starts empty.
    fresh = limits.admit(key, use, 200, 0.0, "2026-12-08", period_left=DAY)
    assert isinstance(fresh, limits.Admitted) and use.budget_used == 200


def test_nothing_is_taken_when_a_request_is_refused() -> None:
    key = Limits(requests_per_minute=10, tokens_per_minute=100)
    use = limits.KeyUse.fresh(key, 0.0)
    assert isinstance(limits.admit(key, use, 101, 0.0, "all", None), limits.Throttled)
    assert use.requests is not None and use.requests.level == 10
    assert use.tokens is not None and use.tokens.level == 100 and use.in_flight == 0


def test_budget_windows_follow_the_utc_calendar() -> None:
    december = limits.window_of(BudgetWindow.MONTHLY, T0)
    assert december.name == "2026-12"
    assert december.left(T0) == pytest.approx(24.5 * DAY)
    day = limits.window_of(BudgetWindow.DAILY, T0)
    assert (day.name, day.left(T0)) == ("2026-12-07", pytest.approx(DAY / 2))
    assert limits.window_of(BudgetWindow.NONE, T0).left(T0) is None
    new_year = limits.window_of(BudgetWindow.MONTHLY, T0 + 25 * DAY)
    assert new_year.name == "2027-01"


@pytest.mark.parametrize(("seconds", "shown"), [(0.25, "250ms"), (6.0, "6s"), (90.0, "1m30s"),
                                                (59.2, "1m0s"), (0.0, "0ms")])
def test_reset_headers_read_as_openai_writes_them(seconds: float, shown: str) -> None:
    assert limits.duration(seconds) == shown


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 30), st.integers(1, 400), st.integers(0, 500)),
                max_size=40))
def test_a_key_never_gets_more_than_its_rate_allows(steps: list[tuple[float, int, int]]) -> None:
    """Over any schedule, tokens admitted within the run never exceed the bucket's
    capacity plus its refill, whatever was given back."""
    key = Limits(tokens_per_minute=1000)
    use = limits.KeyUse.fresh(key, 0.0)
    now, taken, returned = 0.0, 0, 0
    for wait, bound, used in steps:
        now += wait
        if isinstance(limits.admit(key, use, bound, now, "all", None), limits.Admitted):
            taken += bound
            charged = min(used, bound)
            limits.settle(use, bound, charged, now, "all")
            returned += bound - charged
    assert taken - returned <= 1000 + now * 1000 / 60 + 1e-6


# ---- the ledger -------------------------------------------------------------------


def test_a_reservation_closes_exactly_once() -> None:
    ledger = Ledger()
    ledger.reserve(_reservation("a"))
    with pytest.raises(ValueError):
        ledger.reserve(_reservation("a"))
    closed = ledger.settle("a", "p1", 12, 30, at=T0)
    assert closed is not None and closed[1].charged == 42 and closed[1].close is Close.SETTLED
    assert ledger.settle("a", "p1", 12, 30, at=T0) is None
    assert ledger.refund("a", at=T0) is None
    ledger.reserve(_reservation("b"))
    refunded = ledger.refund("b", at=T0)
    assert refunded is not None and refunded[1].charged == 0 and refunded[1].provider is None
    assert ledger.settle("b", "p1", 1, 1, at=T0) is None
    assert ledger.open == {}


def test_a_provider_cannot_charge_past_what_the_consumer_asked_for() -> None:
    ledger = Ledger()
    ledger.reserve(_reservation("a", prompt=10, completion=100))
    _, entry = ledger.settle("a", "p", 10**9, 10**9, at=T0) or (None, None)
    assert entry is not None
    assert (entry.prompt_tokens, entry.completion_tokens) == (prompt_ceiling(10), 100)
    ledger.reserve(_reservation("b"))
    _, negative = ledger.settle("b", "p", -5, -5, at=T0) or (None, None)
    assert negative is not None and negative.charged == 0
    # Without max_tokens: the default is reserved, the engine's count is charged.
    ledger.reserve(_reservation("c", completion=4096, ceiling=1_000_000))
    _, long = ledger.settle("c", "p", 10, 9000, at=T0) or (None, None)
    assert long is not None and long.completion_tokens == 9000


# ---- keys -------------------------------------------------------------------------


def test_a_secret_is_random_and_only_its_hash_is_kept() -> None:
    secret, digest = new_secret("team-a")
    again, _ = new_secret("team-a")
    assert secret != again and secret.startswith("sk-team-a-") and len(secret) > 50
    assert digest == hash_secret(secret) and secret not in digest


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "é", None, 3, "a/b"])
def test_names_outside_the_rule_are_refused(name: object) -> None:
    with pytest.raises(KeySpecError) as refused:
        check_name(name)
    assert refused.value.field == "name"


def test_limits_from_an_admin_body() -> None:
    base = limits_from({"requests_per_minute": 5, "budget_window": "daily"})
    assert base == Limits(requests_per_minute=5, budget_window=BudgetWindow.DAILY)
    changed = limits_from({"requests_per_minute": None, "token_budget": 10}, base)
    assert changed == Limits(token_budget=10, budget_window=BudgetWindow.DAILY)
    for bad in ({"requests_per_minute": 0}, {"tokens_per_minute": 1.5},
                {"concurrent_requests": 100_001}, {"token_budget": "9"},
                {"budget_window": "weekly"}, {"budget_window": None}):
        with pytest.raises(KeySpecError):
            limits_from(bad)
    assert models_from(["a", "b"]) == frozenset({"a", "b"})
    for bad_models in ("a", [""], [1], ["x" * 257], ["a"] * 257):
        with pytest.raises(KeySpecError):
            models_from(bad_models)


# ---- the SQLite store -------------------------------------------------------------


async def test_the_store_keeps_keys_and_bumps_its_version_on_every_change() -> None:
    store = await SqliteStore.open(":memory:")
    start = await store.version()
    record = KeyRecord("a", hash_secret("s"), Limits(requests_per_minute=3),
                       frozenset({"m1"}), KeyState.ACTIVE, T0)
    await store.add(record)
    with pytest.raises(KeyExists):
        await store.add(record)
    assert await store.keys() == [record]
    revoked = KeyRecord("a", record.secret_hash, record.limits, None, KeyState.REVOKED, T0)
    await store.update(revoked)
    assert await store.keys() == [revoked]
    assert await store.version() == start + 2
    await store.aclose()


async def test_the_ledger_records_a_request_once_and_reports_by_key_and_provider() -> None:
    store = await SqliteStore.open(":memory:", retention=30 * DAY)
    ledger = Ledger()
    entries = []
    for request_id, key, provider, tokens in (("1", "a", "p1", (10, 5)),
                                              ("2", "a", "p2", (20, 7)),
                                              ("3", None, "p1", (1, 1))):
        ledger.reserve(_reservation(request_id, key=key))
        closed = ledger.settle(request_id, provider, *tokens, at=T0)
        assert closed is not None
        entries.append(closed[1])
    ledger.reserve(_reservation("4", key="a"))
    refunded = ledger.refund("4", at=T0)
    assert refunded is not None
    entries.append(refunded[1])
    await store.record(entries)
    await store.record(entries[:2])  # a retried write
    report = await store.usage(T0 - 1, T0 + 1)
    assert [(r.name, r.requests, r.prompt_tokens, r.completion_tokens)
            for r in report.by_key] == [("(unnamed)", 1, 1, 1), ("a", 2, 30, 12)]
    assert UNNAMED == "(unnamed)"
    assert [(r.name, r.requests) for r in report.by_provider] == [("p1", 2), ("p2", 1)]
    assert await store.charged_since("a", T0 - 1) == 42
    assert await store.charged_since("a", T0 + 1) == 0
    assert (await store.usage(T0 + 1, T0 + 2)).by_key == ()
    # Entries past retention go as new ones are written (at most every PRUNE_EVERY).
    later = T0 + 31 * DAY + PRUNE_EVERY
    ledger.reserve(_reservation("5", key="a"))
    closed = ledger.settle("5", "p1", 1, 1, at=later)
    assert closed is not None
    await store.record([closed[1]])
    assert await store.charged_since("a", 0.0) == 2
    await store.aclose()


async def test_any_model_a_consumer_names_can_be_written() -> None:
    # JSON may carry a lone surrogate; UTF-8 (and so every store) may not.
    store = await SqliteStore.open(":memory:", retention=30 * DAY)
    ledger = Ledger()
    ledger.reserve(Reservation("r1", "a", "\ud800m", 1, 1, 1, "all"))
    closed = ledger.settle("r1", "p1", 1, 1, at=T0)
    assert closed is not None
    await store.record([closed[1]])
    assert await store.charged_since("a", T0 - 1) == 2
    await store.aclose()


async def test_a_file_the_store_cannot_open_is_one_clear_error(tmp_path: Path) -> None:
    from coordinator.accounts.store import StoreError

    not_a_database = tmp_path / "keys.db"
    not_a_database.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=str(not_a_database)):
        await SqliteStore.open(str(not_a_database))
    with pytest.raises(StoreError, match="keys_db"):
        await SqliteStore.open(str(tmp_path / "missing" / "deeper" / "\0bad"))
    with trio.fail_after(10):
        store = await SqliteStore.open(str(tmp_path / "fine" / "keys.db"))
    assert (tmp_path / "fine").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "fine" / "keys.db").stat().st_mode & 0o777 == 0o600
    await store.aclose()


async def test_the_ledger_is_written_without_waiting_on_the_clock(mock_clock: Any) -> None:
    # mock_clock never moves (no autojump): a writer that waited on a timer before
    # writing would hold every entry, as it did in the fuzz campaign's long-lived worlds.
    store = await SqliteStore.open(":memory:", retention=30 * DAY)
    accounts = Accounts(store, wall=lambda: T0)
    await accounts.load()
    async with trio.open_nursery() as nursery:
        await nursery.start(accounts.run)
        for request_id in ("1", "2", "3"):
            granted = await accounts.admit(UNNAMED_ACCOUNT, request_id, "m1", 10, 100, 100)
            assert isinstance(granted, Granted)
            accounts.settle(request_id, "p1", 10, 5)
        await trio.testing.wait_all_tasks_blocked()
        assert [(r.name, r.requests) for r in (await store.usage(T0 - 1, T0 + 1)).by_key] == [
            ("(unnamed)", 3)]
        nursery.cancel_scope.cancel()

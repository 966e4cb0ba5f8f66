"""Accounts in Redis (issue 25, item 1: every instance sees the same keys, limits and
counters; item 3: limits that hold across instances; item 6: a store that fails while
serving fails closed and recovers by itself).

In real time against a real redis-server (tests/redis_server.py), each bounded: Redis
is another process, which virtual time cannot wait for. The Lua limiter is checked
against the pure rules of coordinator/accounts/limits.py on the same sequences, with
the clock given to both; the two-instance tests run two coordinators in this process
sharing one Redis, each with its own provider (of its own model: the peer links these
harnesses advertise lead nowhere, and nothing here is about routing).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.accounts import limits
from coordinator.accounts.keys import BudgetWindow, KeyRecord, KeyState, Limits, hash_secret
from coordinator.accounts.ledger import Close, Entry
from coordinator.accounts.redis import RedisLink, RedisStore, key_hash
from coordinator.accounts.redislimits import RedisLimits, redis_keys
from coordinator.accounts.service import Accounts
from coordinator.accounts.store import KeyExists, StoreError, StoreUnavailable
from coordinator.config import Config, ConfigError

from .harness import ADMIN_KEY, API_KEY, Harness, make_config, model, open_harness, poll
from .redis_server import RedisServer, needs_redis

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
FAST_CLUSTER = dict(cluster_token="c", cluster_refresh=0.1, cluster_ttl=1.0, redis_timeout=0.5)
WALL = 1_767_225_600.0 + 5 * 3600 + 17.25  # 2026-01-01 05:00:17.25 UTC
_names = itertools.count()


@asynccontextmanager
async def open_link(url: str) -> AsyncIterator[RedisLink]:
    async with trio.open_nursery() as nursery:
        link = await RedisLink.open(nursery, make_config(redis_url=url, cluster_token="c",
                                                          redis_timeout=0.5))
        yield link
        nursery.cancel_scope.cancel()


def key(name: str, **limit: Any) -> KeyRecord:
    return KeyRecord(name, hash_secret(f"secret-{name}"), Limits(**limit))


# -- the store, alone
@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_keys_are_kept_hashed_and_every_change_moves_the_version(
        redis_server: RedisServer):
    with trio.fail_after(10):
        async with open_link(redis_server.url) as link:
            store = RedisStore(link, 86400.0)
            assert await store.version() == 0 and await store.keys() == []
            alice = KeyRecord("alice", hash_secret("sk-alice-x"),
                              Limits(requests_per_minute=3, token_budget=10,
                                     budget_window=BudgetWindow.DAILY),
                              frozenset({"m1", "m2"}), created=WALL)
            await store.add(alice)
            first = await store.version()
            with pytest.raises(KeyExists):
                await store.add(attrs.evolve(alice, secret_hash=hash_secret("other")))
            assert await store.version() == first  # a refused add changes nothing
            revoked = attrs.evolve(alice, state=KeyState.REVOKED, limits=Limits())
            await store.update(revoked)
            assert await store.version() == first + 1
            assert await store.keys() == [revoked]
            kept = await link.client.hgetall(key_hash("alice"))
            assert b"sk-alice-x" not in b"".join([*kept.keys(), *kept.values()])
            # What Redis holds is outside input: a key that breaks the rules is left out.
            await link.client.sadd("coord:acct:{keys}", ["bad"])
            await link.client.hset(key_hash("bad"), {"secret_hash": "nope", "state": "active"})
            assert await store.keys() == [revoked]


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_a_version_restarts_from_a_random_number_when_redis_lost_its_data(
        redis_server: RedisServer):
    with trio.fail_after(10):
        async with open_link(redis_server.url) as link:
            store = RedisStore(link, 86400.0)
            await store.add(key("a"))
            held = await store.version()
            await link.client.flushdb()
            await store.add(key("b"))
            # The same number of changes since empty: another number all the same, so an
            # instance holding the old one reloads (and no longer serves "a").
            assert await store.version() != held


def entry(request_id: str, key_name: str | None, provider: str | None, prompt: int,
          completion: int, at: float, close: Close = Close.SETTLED) -> Entry:
    return Entry(request_id, key_name, "m1", provider, 1000, prompt, completion, close, at)


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_the_ledger_counts_a_request_once_by_key_and_provider_per_hour(
        redis_server: RedisServer):
    with trio.fail_after(10):
        async with open_link(redis_server.url) as link:
            # This hour, as Redis's expiries are real; a month of retention is ~720 hours
            # to read for a whole-life budget (charged_since(0)).
            wall = time.time() // 3600 * 3600 + 17.25
            store = RedisStore(link, 30 * 86400.0, wall=lambda: wall)
            hour = wall - wall % 3600
            first = [entry("r1", "alice", "p1", 10, 5, wall), entry("r2", None, "p1", 3, 1, wall),
                     entry("r3", "alice", None, 0, 0, wall, Close.REFUNDED),
                     entry("r4", "alice", "p2", 7, 2, hour - 1.0)]
            await store.record(first)
            await store.record(first[:2])  # a retried write (its answer lost): no change
            report = await store.usage(hour - 3600, wall)
            assert report.as_json() == {
                "since": hour - 3600, "until": hour + 3600,  # widened to whole hours
                "by_key": [{"name": "(unnamed)", "requests": 1, "prompt_tokens": 3,
                            "completion_tokens": 1},
                           {"name": "alice", "requests": 2, "prompt_tokens": 17,
                            "completion_tokens": 7}],
                "by_provider": [{"name": "p1", "requests": 2, "prompt_tokens": 13,
                                 "completion_tokens": 6},
                                {"name": "p2", "requests": 1, "prompt_tokens": 7,
                                 "completion_tokens": 2}]}
            assert (await store.usage(hour, wall)).by_key[1].requests == 1  # this hour only
            assert await store.charged_since("alice", hour) == 15
            assert await store.charged_since("alice", 0.0) == 24
            assert await store.charged_since("bob", 0.0) == 0


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_a_stopped_redis_is_unavailable_within_the_timeout_and_then_back(
        redis_server: RedisServer):
    with trio.fail_after(20):
        async with open_link(redis_server.url) as link:
            store = RedisStore(link, 86400.0)
            redis_server.freeze()
            try:
                start = trio.current_time()
                with pytest.raises(StoreUnavailable, match=r"Redis did not answer within 0\.5s"):
                    await store.version()
                assert trio.current_time() - start < 1.0
            finally:
                redis_server.thaw()
            redis_server.stop()
            with pytest.raises(StoreUnavailable, match="Redis is unreachable"):
                await store.version()
            redis_server.start()
            await poll_async(lambda: store.version())  # the same client, by itself


async def poll_async(probe: Callable[[], Any], interval: float = 0.05) -> Any:
    """``await probe()``'s answer, once it stops raising StoreUnavailable."""
    while True:
        try:
            return await probe()
        except StoreUnavailable:
            await trio.sleep(interval)


async def test_a_redis_that_cannot_be_reached_at_start_up_is_one_line():
    url = RedisServer().url.replace("redis://", "redis://:hunter2@")  # a free port
    config = make_config(redis_url=url, cluster_token="c", redis_timeout=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with pytest.raises(StoreError) as raised:
                await RedisLink.open(nursery, config)
    message = str(raised.value)
    assert message.startswith("redis_url redis://:***@127.0.0.1:") and "hunter2" not in message
    assert "\n" not in message


def test_keys_db_and_redis_url_are_one_or_the_other():
    with pytest.raises(ConfigError, match="keys_db: not used with redis_url"):
        Config(redis_url="redis://127.0.0.1:6379/0", cluster_token="c", keys_db="k.db")


# -- the Lua limiter against limits.py
def test_a_throttled_answer_says_what_the_bucket_holds_now():
    """limits.rate_headers read a bucket's level before refilling it: a refusal said what
    was left at the previous request (found comparing the Lua limiter with limits.py)."""
    lim = Limits(tokens_per_minute=100)
    use = limits.KeyUse.fresh(lim, 0.0)
    assert isinstance(limits.admit(lim, use, 90, 0.0, "all", None), limits.Admitted)
    refused = limits.admit(lim, use, 90, 30.0, "all", None)  # 10 + 50 refilled < 90
    assert isinstance(refused, limits.Throttled)
    assert refused.headers["x-ratelimit-remaining-tokens"] == "60"
    assert refused.headers["x-ratelimit-reset-tokens"] == "24s"


@attrs.define
class Reference:
    """limits.py's rules, as LocalLimits applies them, at the clock the test sets."""

    key: KeyRecord
    use: limits.KeyUse | None = None

    def admit(self, bound: int, now: float) -> limits.Admitted | limits.Throttled:
        window = limits.window_of(self.key.limits.budget_window, WALL)
        if self.use is None:
            self.use = limits.KeyUse.fresh(self.key.limits, now)
        return limits.admit(self.key.limits, self.use, bound, now, window.name,
                            window.left(WALL))

    def release(self, bound: int, charged: int, now: float) -> None:
        assert self.use is not None
        window = limits.window_of(self.key.limits.budget_window, WALL)
        limits.settle(self.use, bound, charged, now, window.name)


async def same_decisions(link: RedisLink, record: KeyRecord,
                         steps: list[tuple[float, int, float | None]]
                         ) -> list[limits.Admitted | limits.Throttled]:
    """Run ``steps`` — (seconds later, bound, None to admit or the share of the bound a
    request admitted before charges as it is released) — through both; same answers."""
    now = [1_767_225_617.123456]  # seconds as Redis's TIME gives them
    lua = RedisLimits(link, wall=lambda: WALL, clock=lambda: now[0])
    reference = Reference(record)
    admitted: list[int] = []
    decisions = []
    for later, bound, share in steps:
        now[0] += later
        await lua.push_deadlines()  # what the heartbeat does every 10 s
        if share is None:
            got, want = await lua.admit(record, bound, 0.0), reference.admit(bound, now[0])
            assert got == want, (now[0], bound)
            decisions.append(got)
            if isinstance(got, limits.Admitted):
                admitted.append(bound)
        elif admitted:
            held = admitted.pop(0)
            charged = int(held * share)
            lua.release(record, held, charged, limits.window_of(
                record.limits.budget_window, WALL).name, 0.0)
            await lua.send_releases()
            reference.release(held, charged, now[0])
    return decisions


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_the_lua_limiter_decides_as_limits_py_on_a_known_sequence(
        redis_server: RedisServer):
    record = key("seq", requests_per_minute=3, tokens_per_minute=100, concurrent_requests=2,
                 token_budget=250, budget_window=BudgetWindow.DAILY)
    steps: list[tuple[float, int, float | None]] = [
        (0, 40, None), (0.5, 40, None),  # both in
        (0.1, 10, None),  # concurrency: 2 in flight
        (1.0, 0, 0.5),  # one back, 20 unused tokens given back
        (0, 60, None),  # tokens: about 43 there
        (9.0, 30, None),  # refilled enough
        (0, 0, 1.0), (0, 0, 1.0),
        (0, 101, None),  # more than the bucket holds: too big
        (0, 10, None),  # requests: half of one left
        (60, 50, None), (0, 0, 0.0), (0, 50, None), (0, 0, 1.0),
        (0, 50, None), (0, 0, 1.0), (60, 100, None),  # the budget of the day is spent
    ]
    with trio.fail_after(20):
        async with open_link(redis_server.url) as link:
            decisions = await same_decisions(link, record, steps)
    refusals = [d.refusal for d in decisions if isinstance(d, limits.Throttled)]
    assert set(refusals) == {limits.Refusal.CONCURRENCY, limits.Refusal.TOKENS,
                             limits.Refusal.TOO_BIG, limits.Refusal.REQUESTS,
                             limits.Refusal.BUDGET}, refusals


STEP = st.tuples(st.floats(0, 40, allow_nan=False), st.integers(0, 160),
                 st.none() | st.floats(0, 1))


@pytest.mark.slow  # a redis-server, in real time; a property
@needs_redis
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.fixed_dictionaries({
    "requests_per_minute": st.none() | st.integers(1, 5),
    "tokens_per_minute": st.none() | st.integers(20, 200),
    "concurrent_requests": st.none() | st.integers(1, 3),
    "token_budget": st.none() | st.integers(50, 600),
    "budget_window": st.sampled_from(list(BudgetWindow))}),
    steps=st.lists(STEP, max_size=25))
async def test_the_lua_limiter_decides_as_limits_py_on_any_sequence(
        redis_server: RedisServer, limit: dict[str, Any],
        steps: list[tuple[float, int, float | None]]):
    with trio.fail_after(20):
        async with open_link(redis_server.url) as link:
            await same_decisions(link, key(f"prop-{next(_names)}", **limit), steps)


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_a_dead_instances_slots_free_themselves_and_a_live_ones_do_not(
        redis_server: RedisServer):
    record = key("slots", concurrent_requests=2)
    now = [1_767_225_617.0]
    with trio.fail_after(20):
        async with open_link(redis_server.url) as link:
            dead = RedisLimits(link, clock=lambda: now[0])
            live = RedisLimits(link, clock=lambda: now[0])
            assert isinstance(await dead.admit(record, 1, 0.0), limits.Admitted)
            assert isinstance(await live.admit(record, 1, 0.0), limits.Admitted)
            refused = await live.admit(record, 1, 0.0)
            assert isinstance(refused, limits.Throttled)
            assert refused.refusal is limits.Refusal.CONCURRENCY
            for _ in range(12):  # two minutes: the live one pushes its deadline, the dead not
                now[0] += 10.0
                await live.push_deadlines()
            assert isinstance(await live.admit(record, 1, 0.0), limits.Admitted)
            assert isinstance(await live.admit(record, 1, 0.0), limits.Throttled)  # 2 live
            assert await link.client.zcard(redis_keys("slots")[1]) == 2


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_a_release_waits_for_redis_and_is_applied_once(redis_server: RedisServer):
    record = key("later", concurrent_requests=1, tokens_per_minute=100)
    with trio.fail_after(20):
        async with open_link(redis_server.url) as link:
            limiter = RedisLimits(link)
            assert isinstance(await limiter.admit(record, 60, 0.0), limits.Admitted)
            redis_server.freeze()
            try:
                limiter.release(record, 60, 10, "all", 0.0)  # noted; Redis does not answer
                with pytest.raises(StoreUnavailable):
                    await limiter.send_releases()  # kept (Redis may yet run what it got)
            finally:
                redis_server.thaw()
            await limiter.send_releases()
            assert await link.client.zcard(redis_keys("later")[1]) == 0  # the slot is back
            again = await limiter.admit(record, 1, 0.0)
            assert isinstance(again, limits.Admitted)
            # 40 left, 50 given back once (twice: full), 1 taken, and a few refilled.
            assert 89 <= int(again.headers["x-ratelimit-remaining-tokens"]) <= 93


class LostAnswers(RedisLink):
    """A link whose commands run (``applied``) or not, and whose answers never come."""

    applied: bool = True

    async def call(self, command: Any) -> Any:
        if self.applied:
            await command  # (a coredis command not awaited is never sent)
        raise StoreUnavailable("no answer")


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
@pytest.mark.parametrize("applied", [True, False])
async def test_an_admission_whose_answer_was_lost_is_taken_back_if_it_was_applied(
        redis_server: RedisServer, applied: bool):
    record = key(f"lost-{applied}", concurrent_requests=1, tokens_per_minute=100)
    with trio.fail_after(20):
        async with open_link(redis_server.url) as link:
            limiter = RedisLimits(link)
            lost = LostAnswers(link.client, link.timeout)
            lost.applied = applied
            limiter.link = lost
            with pytest.raises(StoreUnavailable, match="accounts store is unavailable"):
                await limiter.admit(record, 60, 0.0)
            in_flight = await link.client.zcard(redis_keys(record.name)[1])
            assert in_flight == (1 if applied else 0)
            limiter.link = link
            await limiter.send_releases()
            assert await link.client.zcard(redis_keys(record.name)[1]) == 0
            again = await limiter.admit(record, 60, 0.0)  # its one slot, and its tokens
            assert isinstance(again, limits.Admitted)
            assert int(again.headers["x-ratelimit-remaining-tokens"]) == 40


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_the_service_recovers_from_a_redis_outage_with_nothing_to_write(
        redis_server: RedisServer):
    with trio.fail_after(30):
        async with open_link(redis_server.url) as link, trio.open_nursery() as nursery:
            accounts = Accounts(RedisStore(link, 86400.0), limiter=RedisLimits(link))
            await accounts.load()
            await nursery.start(accounts.run)
            redis_server.freeze()
            try:
                await poll(lambda: accounts.failing is not None)
                assert "Redis did not answer" in str(accounts.failing)
            finally:
                redis_server.thaw()
            await poll(lambda: accounts.failing is None)  # no reservation was open
            nursery.cancel_scope.cancel()


# -- two instances sharing one Redis, black-box
@asynccontextmanager
async def two_instances(url: str) -> AsyncIterator[tuple[Harness, Harness]]:
    async with open_harness(redis_url=url, instance_id="a", **FAST_CLUSTER) as a, \
            open_harness(redis_url=url, instance_id="b", **FAST_CLUSTER) as b:
        await a.add_provider("pa", model("ma"))
        await b.add_provider("pb", model("mb"))
        yield a, b


async def new_key(h: Harness, name: str, *others: Harness, **limit: Any) -> str:
    """A key made through ``h``'s admin API, once every one of ``others`` knows it too."""
    made = await h.request("/v1/admin/keys", {"name": name, "limits": limit}, headers=ADMIN)
    assert made.status == 201, made.body
    for other in others:
        await poll(lambda other=other: other.coordinator.accounts.key(name) is not None, 0.01)
    return str(made.json()["secret"])


async def chat(h: Harness, secret: str, model_id: str) -> Any:
    body = {"model": model_id, "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    return await h.request("/v1/chat/completions", body,
                           headers={"authorization": f"Bearer {secret}"})


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_a_key_revoked_on_one_instance_is_refused_on_both_within_a_second(
        redis_server: RedisServer):
    with trio.fail_after(30):
        async with two_instances(redis_server.url) as (a, b):
            secret = await new_key(a, "leaver", b)
            assert (await chat(a, secret, "ma")).status == 200
            assert (await chat(b, secret, "mb")).status == 200
            revoked = await a.request("/v1/admin/keys/leaver", method="DELETE", headers=ADMIN)
            assert revoked.status == 200 and revoked.json()["state"] == "revoked"
            start = trio.current_time()
            refused_after = {}
            while len(refused_after) < 2:  # Redis and B's poll of it: another "process"
                for name, h in (("a", a), ("b", b)):
                    if name not in refused_after:
                        seen = await h.request("/v1/models", method="GET", headers={
                            "authorization": f"Bearer {secret}"})
                        if seen.status == 401:
                            refused_after[name] = trio.current_time() - start
                await trio.sleep(0.005)
            print(f"revoked key refused after: {refused_after}")
            assert max(refused_after.values()) < 1.0, refused_after
            for h, model_id in ((a, "ma"), (b, "mb")):
                refused = await chat(h, secret, model_id)
                assert refused.status == 401, refused.body
            assert [len(p.received) for p in (a.providers["pa"], b.providers["pb"])] == [1, 1]


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_a_keys_rpm_holds_across_instances_and_their_ledger_is_one(
        redis_server: RedisServer):
    with trio.fail_after(30):
        async with two_instances(redis_server.url) as (a, b):
            secret = await new_key(a, "busy", b, requests_per_minute=3)
            answers = [await chat(h, secret, m) for h, m in
                       ((a, "ma"), (a, "ma"), (b, "mb"), (b, "mb"))]
            assert [r.status for r in answers] == [200, 200, 200, 429]
            over = answers[3]
            assert over.json()["error"]["type"] == "rate_limit_error"
            assert int(over.headers["retry-after"]) >= 1
            assert over.headers["x-ratelimit-limit-requests"] == "3"
            assert over.headers["x-ratelimit-remaining-requests"] == "0"
            assert over.headers["x-ratelimit-reset-requests"].endswith("s")
            assert answers[2].headers["x-ratelimit-remaining-requests"] == "0"  # B saw A's 2
            assert len(b.providers["pb"].received) == 1  # the 4th was dispatched nowhere
            # The ledger is one: what A charged is in B's report, and a request id kept
            # twice (by either instance) counts once.
            await a.coordinator.accounts.flush()
            again = entry("same-request", "busy", "pa", 10, 5, a.coordinator.accounts.wall())
            await a.coordinator.accounts.store.record([again])
            await b.coordinator.accounts.store.record([again])
            report = await b.request("/v1/admin/usage", method="GET", headers=ADMIN)
            assert report.status == 200, report.body
            by_key = {row["name"]: row for row in report.json()["by_key"]}
            by_provider = {row["name"]: row["requests"] for row in report.json()["by_provider"]}
            assert by_key["busy"]["requests"] == 4  # 3 served + the one kept twice
            assert by_provider == {"pa": 3, "pb": 1}
            first = answers[0].json()["usage"]
            assert by_key["busy"]["completion_tokens"] >= first["completion_tokens"] * 3


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_redis_stopped_while_serving_refuses_named_keys_saying_why_then_recovers(
        redis_server: RedisServer):
    with trio.fail_after(60):
        async with open_harness(redis_url=redis_server.url, instance_id="a",
                                **FAST_CLUSTER) as h:
            provider = await h.add_provider("pa", model("ma"))
            secret = await new_key(h, "named")
            assert (await chat(h, secret, "ma")).status == 200
            redis_server.stop()
            refused = await until_status(h, secret, 503)
            served = len(provider.received)
            message = refused.json()["error"]["message"]
            assert "accounts store is unavailable" in message and "Redis" in message, message
            assert refused.headers["retry-after"] == "5"
            assert len(provider.received) == served  # nothing dispatched for it
            # The shared keys have no limit to check: they go on, their charges kept.
            for _ in range(3):
                assert (await chat(h, API_KEY, "ma")).status == 200
            redis_server.start()  # empty: without persistence it kept nothing
            accounts = h.coordinator.accounts
            while accounts.failing is not None:  # back by itself
                await accounts.progressed()
            await accounts.flush()  # and what was kept is written
            usage = await h.request("/v1/admin/usage", method="GET", headers=ADMIN)
            assert usage.status == 200, usage.body
            by_key = {row["name"]: row["requests"] for row in usage.json()["by_key"]}
            assert by_key.get("(unnamed)", 0) >= 3, by_key
            # Redis restarted empty forgot the named keys (docs: run it with persistence).
            await poll(lambda: h.coordinator.accounts.key("named") is None, 0.01)
            assert (await chat(h, secret, "ma")).status == 401


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_a_hung_redis_refuses_named_keys_within_its_timeout_then_serves_them_again(
        redis_server: RedisServer):
    with trio.fail_after(60):
        async with open_harness(redis_url=redis_server.url, instance_id="a",
                                **FAST_CLUSTER) as h:
            await h.add_provider("pa", model("ma"))
            secret = await new_key(h, "patient", requests_per_minute=100)
            assert (await chat(h, secret, "ma")).status == 200
            redis_server.freeze()
            try:
                start = trio.current_time()
                refused = await chat(h, secret, "ma")
                assert refused.status == 503, refused.body
                assert trio.current_time() - start < 1.5  # redis_timeout (0.5 s), not more
                assert "Redis" in refused.json()["error"]["message"]
            finally:
                redis_server.thaw()
            back = await until_status(h, secret, 200)
            assert back.headers["x-ratelimit-limit-requests"] == "100"


async def until_status(h: Harness, secret: str, status: int) -> Any:
    """Chat until the answer has ``status`` (Redis, another process, decides when)."""
    while True:
        answer = await chat(h, secret, "ma")
        if answer.status == status:
            return answer
        await trio.sleep(0.05)


@pytest.mark.slow  # a redis-server and a process, in real time
@needs_redis
async def test_the_keys_command_with_redis_url_manages_the_keys_every_instance_reads(
        redis_server: RedisServer, tmp_path: Any):
    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
        env.pop("COORDINATOR_CLUSTER_TOKEN", None)  # the command needs none
        return subprocess.run([sys.executable, "-m", "coordinator", "keys", "--redis-url",
                               redis_server.url, *args, "--json"], env=env,
                              capture_output=True, text=True, timeout=60)

    with trio.fail_after(60):
        async with open_harness(redis_url=redis_server.url, instance_id="a",
                                **FAST_CLUSTER) as h:
            await h.add_provider("pa", model("ma"))
            added = await trio.to_thread.run_sync(keys, "add", "ops", "--rpm", "5")
            assert added.returncode == 0, added.stderr
            secret = json.loads(added.stdout)["secret"]
            assert not (tmp_path / "trio-inference-coordinator").exists()  # no SQLite file
            await poll(lambda: h.coordinator.accounts.authenticate(secret) is not None)
            served = await chat(h, secret, "ma")
            assert served.headers["x-ratelimit-limit-requests"] == "5"
            revoked = await trio.to_thread.run_sync(keys, "revoke", "ops")
            assert json.loads(revoked.stdout)["state"] == "revoked"
            await poll(lambda: h.coordinator.accounts.authenticate(secret) is None)
    redis_server.stop()
    gone = await trio.to_thread.run_sync(keys, "list")
    assert gone.returncode == 2 and "Traceback" not in gone.stderr, gone.stderr
    assert "redis_url" in gone.stderr and len(gone.stderr.splitlines()) == 1, gone.stderr

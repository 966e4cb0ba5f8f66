"""Limits that hold across instances: the rules of :mod:`.limits`, applied in Redis atomically.

One Lua script admits a request (:data:`ADMIT`): it refills the key's token buckets
(requests and tokens per minute), counts its requests in flight on every instance,
reads its budget's use in the window, and either takes one request and the
request's bound from each, or says why not — the same arithmetic as
:func:`.limits.admit`, in the same order, on the same doubles, so two instances can
never both take the last request of a minute. Another (:data:`RELEASE`) gives back
what a request did not use, as :func:`.limits.settle` does.

**Time.** Each script reads Redis's clock (``TIME``): one clock for every instance,
whatever theirs say. The budget's window (daily, monthly: UTC calendar) is named by
the caller from its wall clock (:func:`.limits.window_of`); a second's skew at
midnight only moves which window a request counts in.

**Release is synchronous for the service** (a request's ``finally``), so
:meth:`RedisLimits.release` only notes it; a background task (:meth:`RedisLimits.run`)
sends what was noted, per key, and keeps it until Redis has it: a release is not
lost while the instance lives, however long Redis is away. What it holds is bounded
by the requests admitted here and not yet released.

**Requests in flight** are a sorted set per key: one member per admitted request
(a random token), scored with a deadline. Counting it first drops members past
their deadline. Each instance pushes the deadlines of its own requests
:data:`SAFETY` seconds ahead every :data:`HEARTBEAT` seconds, so:

* an instance that dies with requests in flight strands their slots for at most
  :data:`SAFETY` seconds, and a request that runs for an hour keeps its slot;
* a plain counter with a TTL cannot do both: refreshed on every use it never expires
  while the key is busy (a stranded slot stays for as long as traffic lasts), and
  not refreshed it drops live requests from the count;
* a release names its own member, so one sent twice (a reply lost, a retry) takes
  one slot back once, and the tokens and budget it gives back are given once;
* an admission whose answer was lost (Redis went away mid-call, the request was
  cancelled) is taken back by a release that applies only if that member exists.

Keys (``{name}`` a Redis Cluster hash tag: one script's keys share a slot):
``coord:acct:limit:{<name>}`` (a hash: the buckets' capacity, level and time; after
a minute untouched a bucket is full, so the hash expires then and nothing is lost),
``coord:acct:inflight:{<name>}`` (the sorted set), ``coord:acct:budget:{<name>}``
(the window's name and the tokens counted in it; kept while the window lasts, for
ever for a whole-life budget).
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

from coordinator.untrusted import printable

from . import limits
from .keys import KeyRecord, Limits
from .redis import RedisLink
from .store import StoreUnavailable

log = logging.getLogger(__name__)

HEARTBEAT: Final = 10.0  # seconds between two pushes of this instance's deadlines
SAFETY: Final = 60.0  # a request's slot counts this long after its instance's last push
RETRY: Final = 0.5  # seconds before sending releases again after Redis failed
# Releases waiting for Redis, at most, before an unanswered admission is no longer taken
# back (a release of a request admitted is always kept: there are no more of those than
# requests admitted here).
MAX_NOTED: Final = 10_000
CHUNK: Final = 256  # releases or members in one script call, at most

_COMMON = """
local WINDOW = 60
local function num(s)
  if s == nil or s == false or s == '' then return nil end
  return tonumber(s)
end
local function fmt(x) return string.format('%.17g', x) end
local function clock(given)
  if given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- limits.py's Bucket: {capacity, level, at} kept in hash `key` under p..'c', p..'l',
-- p..'a'; refilled to `now`, resized to `limit` (keeping its level, at most the new
-- size); none when `limit` is none; full when new.
local function bucket(key, p, limit, now)
  if limit == nil then
    redis.call('HDEL', key, p .. 'c', p .. 'l', p .. 'a')
    return nil
  end
  local got = redis.call('HMGET', key, p .. 'c', p .. 'l', p .. 'a')
  local cap, level, at = num(got[1]), num(got[2]), num(got[3])
  if cap == nil or level == nil or at == nil then return {limit, limit, now} end
  if now > at then
    level = math.min(cap, level + (now - at) * cap / WINDOW)
    at = now
  end
  if cap ~= limit then return {limit, math.min(level, limit), now} end
  return {cap, level, at}
end
local function save(key, p, b)
  if b then
    redis.call('HSET', key, p .. 'c', fmt(b[1]), p .. 'l', fmt(b[2]), p .. 'a', fmt(b[3]))
    redis.call('PEXPIRE', key, (WINDOW + 1) * 1000)
  end
end
local function level(b)
  if b then return fmt(b[2]) end
  return ''
end
"""
# KEYS: the buckets, the requests in flight, the budget.
# ARGV: now ('' for Redis's TIME), the request's member, its bound, requests and tokens
# per minute, concurrent requests, token budget ('' for none), the budget window's
# name, seconds until it ends ('' for never), SAFETY.
# Returns {'ok' or a limits.Refusal value, the wait ('inf' for never), the requests
# and tokens buckets' levels ('' for none): after the take when admitted}.
ADMIT: Final = _COMMON + """
local now = clock(ARGV[1])
local member, bound = ARGV[2], tonumber(ARGV[3])
local most, budget = num(ARGV[6]), num(ARGV[7])
local period, left, safety = ARGV[8], num(ARGV[9]), tonumber(ARGV[10])
local requests = bucket(KEYS[1], 'r', num(ARGV[4]), now)
local tokens = bucket(KEYS[1], 't', num(ARGV[5]), now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. fmt(now))
local in_flight = redis.call('ZCARD', KEYS[2])
local used = 0
if redis.call('HGET', KEYS[3], 'period') == period then
  used = num(redis.call('HGET', KEYS[3], 'used')) or 0
end
-- limits.admit: the longest wait wins, the first of equals.
local refusal, wait = nil, 0
local function consider(why, w)
  if w > 0 and (refusal == nil or w > wait) then refusal, wait = why, w end
end
local function wait_for(b, amount)
  if amount > b[1] then return math.huge end
  return math.max(0, (amount - b[2]) * WINDOW / b[1])
end
if requests then consider('requests', wait_for(requests, 1)) end
if tokens then
  local w = wait_for(tokens, bound)
  if w == math.huge then consider('too_big', w) else consider('tokens', w) end
end
if most and in_flight >= most then consider('concurrency', 1.0) end
if budget and used + bound > budget then
  if bound > budget then consider('too_big', math.huge)
  elseif left == nil then consider('budget_gone', math.huge)
  else consider('budget', left) end
end
if refusal then
  save(KEYS[1], 'r', requests)  -- refilled: kept, for the same doubles as limits.py's
  save(KEYS[1], 't', tokens)
  if wait == math.huge then return {refusal, 'inf', level(requests), level(tokens)} end
  return {refusal, fmt(wait), level(requests), level(tokens)}
end
if requests then requests[2] = requests[2] - 1 end
if tokens then tokens[2] = tokens[2] - bound end
save(KEYS[1], 'r', requests)
save(KEYS[1], 't', tokens)
redis.call('ZADD', KEYS[2], fmt(now + safety), member)
redis.call('PEXPIRE', KEYS[2], math.ceil(safety * 1000))
redis.call('HSET', KEYS[3], 'period', period, 'used', fmt(used + bound))
if left then
  redis.call('PEXPIRE', KEYS[3], math.ceil((left + 3600) * 1000))
else
  redis.call('PERSIST', KEYS[3])
end
return {'ok', '0', level(requests), level(tokens)}
"""
# KEYS: as ADMIT's. ARGV: now, tokens per minute ('' for none), then four a release:
# its member, the tokens it did not use, its budget window's name, and '1' when it
# applies only if the member is still there ('0': a first try, applied even if the
# member's deadline passed while Redis was away). limits.settle, once per member.
RELEASE: Final = _COMMON + """
local now = clock(ARGV[1])
local tpm = num(ARGV[2])
local tokens = nil
local period = redis.call('HGET', KEYS[3], 'period')
local used = num(redis.call('HGET', KEYS[3], 'used'))
local was = used
for i = 3, #ARGV, 4 do
  local gone = redis.call('ZREM', KEYS[2], ARGV[i])
  if gone == 1 or ARGV[i + 3] == '0' then
    local unused = tonumber(ARGV[i + 1])
    if tpm then
      tokens = tokens or bucket(KEYS[1], 't', tpm, now)
      tokens[2] = math.min(tokens[1], tokens[2] + unused)
    end
    if used and period == ARGV[i + 2] then used = math.max(0, used - unused) end
  end
end
save(KEYS[1], 't', tokens)
if used ~= was then redis.call('HSET', KEYS[3], 'used', fmt(used)) end
return 1
"""
# KEYS: the requests in flight. ARGV: now, SAFETY, then this instance's members there.
HEARTBEAT_SCRIPT: Final = _COMMON + """
local deadline = fmt(clock(ARGV[1]) + tonumber(ARGV[2]))
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], deadline, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return 1
"""


def redis_keys(name: str) -> list[str]:
    """The buckets, the requests in flight and the budget of key ``name``."""
    return [f"coord:acct:limit:{{{name}}}", f"coord:acct:inflight:{{{name}}}",
            f"coord:acct:budget:{{{name}}}"]


@attrs.frozen
class _Release:
    member: str
    unused: int
    period: str
    unsure: bool  # applies only if the member is there (its admission may not have been)


@attrs.define(eq=False)
class RedisLimits:
    """A :class:`~coordinator.accounts.service.Limiter` in Redis, shared by every instance."""

    link: RedisLink
    wall: Callable[[], float] = time.time  # budget windows (UTC calendar)
    clock: Callable[[], float] | None = None  # None: Redis's TIME (the tests give their own)
    _held: dict[str, list[str]] = attrs.field(factory=dict)  # members admitted here, by key
    _pending: dict[str, list[_Release]] = attrs.field(factory=dict)
    _records: dict[str, KeyRecord] = attrs.field(factory=dict)  # with pending releases
    _noted: int = 0  # releases noted and not yet sent
    _wake: trio.Event = attrs.field(factory=trio.Event)
    _prefix: str = attrs.field(factory=lambda: secrets.token_hex(6))  # this process's
    _serial: itertools.count[int] = attrs.field(factory=itertools.count)
    _admit: Any = attrs.field(init=False)  # the scripts, registered on the client
    _release: Any = attrs.field(init=False)
    _beat: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        client = self.link.client
        self._admit = client.register_script(ADMIT)
        self._release = client.register_script(RELEASE)
        self._beat = client.register_script(HEARTBEAT_SCRIPT)

    def _now(self) -> str:
        return "" if self.clock is None else repr(float(self.clock()))

    async def admit(self, key: KeyRecord, bound: int, now: float
                    ) -> limits.Admitted | limits.Throttled:
        """``now`` (this process's clock) is not used: Redis's is every instance's."""
        wall = self.wall()
        window = limits.window_of(key.limits.budget_window, wall)
        left = window.left(wall)
        member = f"{self._prefix}:{next(self._serial)}"
        lim = key.limits
        args: list[Any] = [
            self._now(), member, bound, _opt(lim.requests_per_minute),
            _opt(lim.tokens_per_minute), _opt(lim.concurrent_requests), _opt(lim.token_budget),
            window.name, "" if left is None else repr(left), SAFETY]
        answered = False
        try:
            answer: Any = await self.link.call(self._admit(keys=redis_keys(key.name), args=args))
            decision = _decision(lim, answer)
            answered = True
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"the accounts store is unavailable ({exc}); try again "
                                   "shortly") from None
        finally:
            if not answered:  # it may have been admitted all the same: take it back if so
                self._take_back(key, member, bound, window.name)
        if isinstance(decision, limits.Admitted):
            self._held.setdefault(key.name, []).append(member)
        return decision

    def release(self, key: KeyRecord, bound: int, charged: int, period: str, now: float) -> None:
        """Note that a request admitted with ``bound`` is over, having cost ``charged``."""
        held = self._held.get(key.name)
        member = held.pop() if held else ""  # any of the key's: they are alike
        if held is not None and not held:
            del self._held[key.name]
        self._note(key, _Release(member, max(0, bound - charged), period, unsure=False))

    def _take_back(self, key: KeyRecord, member: str, bound: int, period: str) -> None:
        if self._noted >= MAX_NOTED:  # its slot frees itself after SAFETY seconds
            log.warning("accounts: too many releases waiting for Redis; an unanswered "
                        "admission of %s is left to expire", printable(key.name, 64))
            return
        self._note(key, _Release(member, bound, period, unsure=True))

    def _note(self, key: KeyRecord, release: _Release) -> None:
        self._pending.setdefault(key.name, []).append(release)
        self._records[key.name] = key
        self._noted += 1
        self._wake.set()

    # -- the background: releases out, deadlines pushed
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        beat_at = trio.current_time() + HEARTBEAT
        while True:
            if not self._pending:
                with trio.move_on_at(beat_at):
                    await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self.send_releases()
                if trio.current_time() >= beat_at:
                    await self.push_deadlines()
                    beat_at = trio.current_time() + HEARTBEAT
            except StoreUnavailable:
                await trio.sleep(RETRY)  # the service says Redis is failing; kept till then

    async def send_releases(self) -> None:
        """Send every noted release; what could not be sent stays noted (and unsure)."""
        while self._pending:
            name, releases = next(iter(self._pending.items()))
            record = self._records[name]
            chunk = releases[:CHUNK]
            args: list[Any] = [self._now(), _opt(record.limits.tokens_per_minute)]
            for r in chunk:
                args += [r.member, r.unused, r.period, "1" if r.unsure else "0"]
            try:
                await self.link.call(self._release(keys=redis_keys(name), args=args))
            except BaseException:
                # Its answer lost, it may have been applied: sent again, it applies only
                # where its member is still there.
                releases[:len(chunk)] = [attrs.evolve(r, unsure=True) for r in chunk]
                raise
            self._noted -= len(chunk)
            del releases[:len(chunk)]  # more may have been noted meanwhile
            del self._pending[name]
            if releases:  # to the back: a busy key does not hold the others' back
                self._pending[name] = releases
            else:
                del self._records[name]

    async def push_deadlines(self) -> None:
        """This instance's requests in flight count for :data:`SAFETY` seconds more."""
        for name, members in list(self._held.items()):
            for start in range(0, len(members), CHUNK):
                args: list[Any] = [self._now(), SAFETY, *members[start:start + CHUNK]]
                await self.link.call(self._beat(keys=redis_keys(name)[1:2], args=args))


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _decision(lim: Limits, answer: Any) -> limits.Admitted | limits.Throttled:
    """The admission script's answer as :func:`.limits.admit` would have given it."""
    try:
        verdict, wait, requests, tokens = (part.decode() for part in answer)
        use = limits.KeyUse(_bucket(lim.requests_per_minute, requests),
                            _bucket(lim.tokens_per_minute, tokens))
        headers = limits.rate_headers(lim, use, 0.0)
        if verdict == "ok":
            return limits.Admitted(headers)
        seconds = float(wait)
        return limits.Throttled(limits.Refusal(verdict),
                                None if math.isinf(seconds) else seconds, headers)
    except (TypeError, ValueError, AttributeError):
        raise StoreUnavailable("Redis answered the limits script oddly") from None


def _bucket(limit: int | None, level: str) -> limits.Bucket | None:
    if limit is None or not level:
        return None
    return limits.Bucket(float(limit), float(level), 0.0)  # as of now: nothing to refill

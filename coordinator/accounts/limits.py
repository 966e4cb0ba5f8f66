"""A key's limits as arithmetic: may this request go now, and what the headers say. Pure.

* **Requests and tokens per minute** are token buckets: a bucket holds up to the
  per-minute limit and refills continuously (the limit every 60 s), so a key may burst
  its whole minute at once and then goes at the limit's pace. A request takes one
  request and its token *bound* (prompt estimate + ``max_tokens``) at admission; what
  it did not use goes back when it settles.
* **Concurrent requests** count what is in flight.
* **A token budget** is a running total per calendar window (none, daily, monthly;
  UTC): the bound is counted at admission, and corrected to what was charged when
  the request settles.

``now`` is Trio's clock; the calendar (for budget windows) is an argument too
(:func:`window_of`), so every rule is tested without a clock of its own.
"""

from __future__ import annotations

import datetime
import enum
import math
from typing import Final

import attrs

from .keys import BudgetWindow, Limits

WINDOW: Final = 60.0  # seconds a bucket takes to refill from empty


@attrs.define
class Bucket:
    """Up to ``capacity``, refilling ``capacity`` every :data:`WINDOW` seconds."""

    capacity: float
    level: float
    at: float

    @classmethod
    def full(cls, capacity: int, now: float) -> Bucket:
        return cls(float(capacity), float(capacity), now)

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.capacity / WINDOW)
            self.at = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (0: now; inf: never, it is over capacity)."""
        self._refill(now)
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) * WINDOW / self.capacity)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def until_full(self, now: float) -> float:
        self._refill(now)
        return (self.capacity - self.level) * WINDOW / self.capacity


@attrs.define
class KeyUse:
    """What one key is using now: its buckets, its requests in flight, its budget."""

    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0
    period: str = ""
    budget_used: int = 0

    @classmethod
    def fresh(cls, limits: Limits, now: float) -> KeyUse:
        return cls(_bucket(limits.requests_per_minute, now), _bucket(limits.tokens_per_minute, now))

    def follow(self, limits: Limits, now: float) -> None:
        """The key's limits changed: buckets of the new sizes, their levels kept."""
        self.requests = _resized(self.requests, limits.requests_per_minute, now)
        self.tokens = _resized(self.tokens, limits.tokens_per_minute, now)


def _bucket(limit: int | None, now: float) -> Bucket | None:
    return None if limit is None else Bucket.full(limit, now)


def _resized(bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
    if limit is None:
        return None
    if bucket is None:
        return Bucket.full(limit, now)
    bucket._refill(now)
    return Bucket(float(limit), min(bucket.level, float(limit)), now)


class Refusal(enum.Enum):
    """Why a request may not go now (or ever, for this key)."""

    REQUESTS = "requests"  # requests per minute
    TOKENS = "tokens"  # tokens per minute
    CONCURRENCY = "concurrency"
    BUDGET = "budget"  # the window's budget is spent (until it resets)
    BUDGET_GONE = "budget_gone"  # the key's whole-life budget is spent
    TOO_BIG = "too_big"  # the request's bound is more than the key can ever take at once


@attrs.frozen
class Throttled:
    refusal: Refusal
    retry_after: float | None  # seconds; None: not by waiting
    headers: dict[str, str]


@attrs.frozen
class Admitted:
    headers: dict[str, str]


def admit(limits: Limits, use: KeyUse, bound: int, now: float, period: str,
          period_left: float | None) -> Admitted | Throttled:
    """Take one request and ``bound`` tokens for a request now, or say why not.

    ``period`` names the budget window ``now`` falls in (:func:`window_of`), and
    ``period_left`` the seconds until it ends (None: it never does).
    Nothing is taken when the answer is :class:`Throttled`.
    """
    if use.period != period:  # a new budget window: it starts empty
        use.period, use.budget_used = period, 0
    headers = rate_headers(limits, use, now)
    waits: list[tuple[Refusal, float]] = []
    if use.requests is not None:
        waits.append((Refusal.REQUESTS, use.requests.wait_for(1, now)))
    if use.tokens is not None:
        wait = use.tokens.wait_for(bound, now)
        waits.append((Refusal.TOO_BIG if math.isinf(wait) else Refusal.TOKENS, wait))
    if limits.concurrent_requests is not None and use.in_flight >= limits.concurrent_requests:
        waits.append((Refusal.CONCURRENCY, 1.0))
    if limits.token_budget is not None and use.budget_used + bound > limits.token_budget:
        if bound > limits.token_budget:
            waits.append((Refusal.TOO_BIG, math.inf))
        elif period_left is None:
            waits.append((Refusal.BUDGET_GONE, math.inf))
        else:
            waits.append((Refusal.BUDGET, period_left))
    refused = [(r, w) for r, w in waits if w > 0]
    if refused:
        refusal, wait = max(refused, key=lambda rw: rw[1])
        return Throttled(refusal, None if math.isinf(wait) else wait, headers)
    if use.requests is not None:
        use.requests.take(1, now)
    if use.tokens is not None:
        use.tokens.take(bound, now)
    use.in_flight += 1
    use.budget_used += bound
    return Admitted(rate_headers(limits, use, now))


def settle(use: KeyUse, bound: int, charged: int, now: float, period: str) -> None:
    """A request admitted with ``bound`` is over, having cost ``charged``: what it did
    not use goes back; what it used beyond (a prompt longer than estimated) is taken."""
    use.in_flight = max(0, use.in_flight - 1)
    over = charged - bound
    if use.tokens is not None:
        if over < 0:
            use.tokens.give(-over, now)
        else:
            use.tokens.take(over, now)
    if use.period == period:
        use.budget_used = max(0, use.budget_used + over)


def rate_headers(limits: Limits, use: KeyUse, now: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the limits the key has."""
    headers: dict[str, str] = {}
    for kind, bucket, limit in (("requests", use.requests, limits.requests_per_minute),
                                ("tokens", use.tokens, limits.tokens_per_minute)):
        if bucket is None or limit is None:
            continue
        reset = bucket.until_full(now)  # refills first: the level is as of now
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
        headers[f"x-ratelimit-reset-{kind}"] = duration(reset)
    return headers


def duration(seconds: float) -> str:
    """``1m30s``, ``6s``, ``250ms``: how OpenAI writes its reset headers."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@attrs.frozen
class Window:
    """A budget window: its name, and when it began and ends (UTC seconds; None: never)."""

    name: str
    start: float
    end: float | None

    def left(self, wall: float) -> float | None:
        return None if self.end is None else self.end - wall


def window_of(window: BudgetWindow, wall: float) -> Window:
    """The budget window ``wall`` (UTC seconds) falls in."""
    if window is BudgetWindow.NONE:
        return Window("all", 0.0, None)
    at = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    if window is BudgetWindow.DAILY:
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + datetime.timedelta(days=1)
        return Window(start.strftime("%Y-%m-%d"), start.timestamp(), end.timestamp())
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + datetime.timedelta(days=32)).replace(day=1)
    return Window(start.strftime("%Y-%m"), start.timestamp(), end.timestamp())

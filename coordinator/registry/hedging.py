"""When to start a speculative backup, and how many backups the fleet can afford. Pure.

*Budget for first content.* A request's time to first content is budgeted at
``ttft_base + ttft_per_prompt_token * prompt tokens`` (:class:`TtftBudget`, the
one home of that formula: the engine's deadlines and the registry's hedge
delay both use it); its fixed hedge delay is ``backup_fraction`` of that.

*Delay.* "The Tail at Scale" hedges at the observed 95th percentile of the
latency, not at a fixed fraction: a backup then races only the slowest 5 % of
primaries. The hedge delay for a request is the 95th percentile of recent
times to first content for its model and prompt-size class, clamped between
``hedge_floor`` and the fixed ``backup_fraction`` times the TTFT budget — and that
fixed fraction until ``MIN_SAMPLES`` times have been seen.

*Budget.* Backups may add at most ``fraction`` extra provider requests over the
last ``window`` seconds (plus a small ``burst``, so a quiet coordinator can
still hedge); above that no backup is started, and the metric
``coordinator_hedge_budget_exhausted_total`` counts what was given up.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

import attrs

from coordinator.config import Config
from coordinator.registry.speed import RecentTimes

MIN_SAMPLES: Final = 20


@attrs.frozen
class TtftBudget:
    """How long a request's first content may take, and when its backup is due."""

    base: float
    per_prompt_token: float
    backup_fraction: float

    @classmethod
    def from_config(cls, c: Config) -> TtftBudget:
        return cls(c.ttft_base, c.ttft_per_prompt_token, c.backup_fraction)

    def ttft(self, prompt_tokens: int) -> float:
        """Seconds from the dispatch to the first content."""
        return self.base + self.per_prompt_token * prompt_tokens

    def fixed_hedge(self, prompt_tokens: int) -> float:
        """Seconds from the dispatch to the backup, before any time is learned."""
        return self.ttft(prompt_tokens) * self.backup_fraction


def hedge_delay(recent: RecentTimes | None, *, fixed: float, floor: float) -> float:
    """Seconds after the primary's dispatch to start a backup."""
    if recent is None or len(recent) < MIN_SAMPLES:
        return fixed
    p95 = recent.quantile(0.95)
    return fixed if math.isnan(p95) else min(max(p95, floor), fixed)


@attrs.define
class HedgeBudget:
    fraction: float  # config.py's hedge_budget
    window: float  # config.py's hedge_window
    burst: int = 2
    _primaries: deque[float] = attrs.field(factory=deque)
    _backups: deque[float] = attrs.field(factory=deque)

    def primary(self, now: float) -> None:
        self._primaries.append(now)
        self._trim(now)

    def allows(self, now: float) -> bool:
        """Whether one more backup now stays within the budget."""
        self._trim(now)
        return len(self._backups) + 1 <= self.fraction * len(self._primaries) + self.burst

    def spend(self, now: float) -> None:
        self._backups.append(now)

    def counts(self, now: float) -> tuple[int, int]:
        """Primaries and backups within the window."""
        self._trim(now)
        return len(self._primaries), len(self._backups)

    def _trim(self, now: float) -> None:
        for times in (self._primaries, self._backups):
            while times and now - times[0] > self.window:
                times.popleft()

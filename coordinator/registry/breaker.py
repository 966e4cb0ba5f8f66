"""Shape-keyed circuit breaker: a pure table of strikes and cooldowns.

Keyed by (provider id, model, shape). Sickness-shaped statuses are strikes:
500 (provider bug), 502 (disconnect), 504 (accepted or preamble, then
silence). 503 (capacity, lifecycle) and 4xx are the consumer's or the
fleet's business, not sickness. ``strikes`` strikes inside ``window`` seconds
start a ``cooldown``; a strike while cooling extends it; a clean success
clears only its own key. The clock is an argument, never read here.
"""

from __future__ import annotations

from typing import Final

import attrs

STRIKE_STATUSES: Final = frozenset({500, 502, 504})

BreakerKey = tuple[str, str, str]  # (provider id, model, shape)


def is_strike(status: int) -> bool:
    return status in STRIKE_STATUSES


@attrs.define
class Breaker:
    # No defaults here: config.py's breaker_strikes, _window and _cooldown are the ones.
    strikes: int
    window: float
    cooldown: float
    _recent: dict[BreakerKey, list[float]] = attrs.field(factory=dict, init=False)
    _cooling_until: dict[BreakerKey, float] = attrs.field(factory=dict, init=False)
    _next_sweep: float = attrs.field(default=float("-inf"), init=False)
    # Counts changes to the cooldowns: a reader's copy of them is stale once it moves.
    version: int = attrs.field(default=0, init=False)

    def record_failure(self, key: BreakerKey, status: int, now: float) -> bool:
        """Count a failure; return True exactly when the key *enters* cooldown."""
        self._maybe_sweep(now)
        if not is_strike(status):
            return False
        if self.is_cooling(key, now):
            self._cooling_until[key] = now + self.cooldown
            self.version += 1
            return False
        recent = [t for t in self._recent.get(key, ()) if now - t < self.window]
        recent.append(now)
        if len(recent) >= self.strikes:
            self._recent.pop(key, None)
            self._cooling_until[key] = now + self.cooldown
            self.version += 1
            return True
        self._recent[key] = recent
        return False

    def record_success(self, key: BreakerKey) -> None:
        self._recent.pop(key, None)
        if self._cooling_until.pop(key, None) is not None:
            self.version += 1

    def knows(self, key: BreakerKey) -> bool:
        """Whether ``key`` has strikes or a cooldown on record."""
        return key in self._recent or key in self._cooling_until

    def cool(self, key: BreakerKey, until: float) -> None:
        """Cool ``key`` until ``until`` (a cooldown entered elsewhere: another instance)."""
        self._recent.pop(key, None)
        self._cooling_until[key] = max(until, self._cooling_until.get(key, until))
        self.version += 1

    def is_cooling(self, key: BreakerKey, now: float) -> bool:
        until = self._cooling_until.get(key)
        return until is not None and now < until

    def forget_provider(self, provider_id: str) -> None:
        """A fresh session of a provider starts with a clean slate."""
        for table in (self._recent, self._cooling_until):
            for key in [k for k in table if k[0] == provider_id]:
                del table[key]
                self.version += table is self._cooling_until

    def cooldowns(self, now: float) -> dict[BreakerKey, float]:
        """Active cooldowns with their expiry time."""
        return {k: until for k, until in self._cooling_until.items() if now < until}

    def cooling_until(self) -> tuple[float, ...]:
        """When each cooldown on record ends (some may have ended already), in order."""
        return tuple(sorted(self._cooling_until.values()))

    def __len__(self) -> int:
        return len(self._recent) + len(self._cooling_until)

    def _maybe_sweep(self, now: float) -> None:
        # Sweeping at most once per window keeps the cost amortized O(1) while
        # bounding memory to the keys touched in the last window + cooldown.
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.window
        self._recent = {
            k: ts for k, ts in self._recent.items() if ts and now - ts[-1] < self.window
        }
        self._cooling_until = {k: u for k, u in self._cooling_until.items() if now < u}

"""What the registry learns about speed from the requests it routes. Pure.

* Per (provider, model): an exponentially weighted mean of the time to first
  content (from the send) and of the decode rate (tokens per second after the
  first content), from every committed request. Once a provider has
  ``MIN_SAMPLES`` of them the scheduler believes these over what it declared
  (docs/architecture.md, "Routing that learns").
* Per (provider, model), too: *outpaced* evidence — the racer lost because the
  other racer committed content while it had sent nothing or only boilerplate.
  Each loss adds its silence, in seconds, to a penalty that halves every
  ``PENALTY_HALF_LIFE`` seconds; the penalty is added to the provider's
  estimated time to serve, so a provider that keeps stalling stops being picked
  first, and forgiven as it ages.
* Per (model, prompt-size class): the last ``RecentTimes.SIZE`` times to first
  content, whose 95th percentile times the hedge (:mod:`.hedging`).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

import attrs

ALPHA: Final = 0.2  # weight of a new sample in the running means
MIN_SAMPLES: Final = 5  # believe observed speeds from this many samples on
PENALTY_HALF_LIFE: Final = 300.0  # seconds for outpaced evidence to lose half its weight


def ewma(mean: float | None, sample: float, alpha: float = ALPHA) -> float:
    return sample if mean is None else mean + alpha * (sample - mean)


@attrs.define
class ProviderSpeed:
    """One provider's observed speed for one model."""

    ttfc: float | None = None  # seconds from send to first content
    decode_tps: float | None = None
    samples: int = 0
    penalty: float = 0.0  # seconds, as of ``penalty_at``
    penalty_at: float = 0.0

    @property
    def trusted(self) -> bool:
        return self.samples >= MIN_SAMPLES

    def observe(self, ttfc: float, decode_tps: float | None) -> None:
        self.ttfc = ewma(self.ttfc, max(ttfc, 0.0))
        if decode_tps is not None and decode_tps > 0:
            self.decode_tps = ewma(self.decode_tps, decode_tps)
        self.samples += 1

    def outpaced(self, silent_for: float, now: float) -> None:
        self.penalty = self.penalty_now(now) + max(silent_for, 0.0)
        self.penalty_at = now

    def penalty_now(self, now: float) -> float:
        if not self.penalty:
            return 0.0
        return self.penalty * math.pow(0.5, max(now - self.penalty_at, 0.0) / PENALTY_HALF_LIFE)


@attrs.define
class RecentTimes:
    """The last :attr:`SIZE` samples, and their quantiles (exact over that window)."""

    SIZE = 64
    _samples: deque[float] = attrs.field(factory=lambda: deque(maxlen=RecentTimes.SIZE))

    def add(self, value: float) -> None:
        self._samples.append(value)

    def __len__(self) -> int:
        return len(self._samples)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (nearest rank) of the window; NaN when it is empty."""
        if not self._samples:
            return math.nan
        ordered = sorted(self._samples)
        rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[rank]


def size_class(prompt_tokens: int) -> int:
    """Prompt-size classes for the hedge timer: powers of four from 256 tokens up."""
    size, klass = 256, 0
    while prompt_tokens > size and klass < 8:
        size, klass = size * 4, klass + 1
    return klass


def outpaced_strike(times: deque[float], now: float, *, window: float, threshold: int) -> bool:
    """Record one boilerplate-then-silence loss at ``now``; True when it makes a strike.

    A racer that had sent only boilerplate when the other racer committed,
    ``threshold`` times within ``window`` seconds, counts as a breaker strike
    for its (provider, model, shape): the evidence is then a pattern, not bad
    luck. The count restarts after a strike.
    """
    times.append(now)
    while times and now - times[0] > window:
        times.popleft()
    if len(times) >= threshold:
        times.clear()
        return True
    return False

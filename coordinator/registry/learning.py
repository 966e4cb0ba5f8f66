"""What routing learns from the requests it routes: speeds, hedge timing, hedge budget. Pure.

:class:`Learning` keeps what is learned across providers — the recent times to
first content per (model, prompt-size class) that time the hedge, the hedge
budget, the outpaced losses per breaker key — and writes what is learned of
one provider into its record's ``speeds``. The rules are in :mod:`.speed` and
:mod:`.hedging` (docs/architecture.md, "Routing that learns").
"""

from __future__ import annotations

import logging
from collections import deque

import attrs

from coordinator.config import Config
from coordinator.metrics import Metrics
from coordinator.registry import hedging, speed
from coordinator.registry.breaker import BreakerKey
from coordinator.registry.hedging import HedgeBudget, TtftBudget
from coordinator.registry.table import (
    Evidence,
    Job,
    Lease,
    Observed,
    Outcome,
    Outpaced,
    ProviderRecord,
)
from coordinator.untrusted import printable

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Learning:
    config: Config
    metrics: Metrics
    ttft: TtftBudget = attrs.field(init=False)
    hedge_budget: HedgeBudget = attrs.field(init=False)
    # Recent times to first content per (model, prompt-size class): the hedge timer.
    recent_ttfc: dict[tuple[str, int], speed.RecentTimes] = attrs.field(factory=dict)
    # Boilerplate-then-silence losses per breaker key (speed.outpaced_strike).
    _outpaced: dict[BreakerKey, deque[float]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.ttft = TtftBudget.from_config(self.config)
        self.hedge_budget = HedgeBudget(self.config.hedge_budget, self.config.hedge_window)

    def hedge_delay(self, job: Job) -> float:
        """Seconds after a primary's dispatch to start its backup."""
        fixed = self.ttft.fixed_hedge(job.prompt_tokens)
        if not self.config.adaptive_hedging:
            return fixed
        recent = self.recent_ttfc.get((job.model, speed.size_class(job.prompt_tokens)))
        return hedging.hedge_delay(recent, fixed=fixed, floor=self.config.hedge_floor)

    def learn(self, record: ProviderRecord, lease: Lease, evidence: Evidence,
              outcome: Outcome, now: float) -> Outcome:
        """Take in what a request showed of the provider; return the verdict to record."""
        known = record.speeds.setdefault(lease.model, speed.ProviderSpeed())
        match evidence:
            case Observed(ttfc, decode_tps, prompt_tokens):
                known.observe(ttfc, decode_tps)
                klass = (lease.model, speed.size_class(prompt_tokens))
                self.recent_ttfc.setdefault(klass, speed.RecentTimes()).add(ttfc)
            case Outpaced(silent_for, boilerplate_only):
                known.outpaced(silent_for, now)
                self.metrics.outpaced.inc()
                times = self._outpaced.setdefault(
                    (lease.provider_id, lease.model, lease.shape), deque())
                if boilerplate_only and speed.outpaced_strike(
                        times, now, window=self.config.breaker_window,
                        threshold=self.config.outpaced_strikes):
                    log.warning("%s/%s/%s outpaced with only boilerplate %d times: a strike",
                                printable(lease.provider_id), printable(lease.model),
                                lease.shape, self.config.outpaced_strikes)
                    return Outcome.failure(504)
        return outcome

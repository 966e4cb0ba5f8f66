"""Scheduler: choose a provider for a job from eligible candidates. Pure.

The estimated time to serve is the work already leased to the provider plus
this job's prefill and decode time at the provider's advertised rates.
Candidates within ``tie_tolerance`` of the best are a near-tie and one is
chosen at random, so equal providers share load instead of the first in the
table taking everything.

*Probation* (slow start, :func:`on_probation`): a provider whose speed on the
model is not yet measured takes at most ``PROBATION_SLOTS`` jobs at a time
while a measured provider, or one with fewer jobs, has a free slot (the
registry skips it while it looks for candidates). What a provider declares is
only a claim; a zombie declaring a high decode rate would otherwise take the
whole first wave of requests, each then waiting for its hedge.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from coordinator.registry.table import Job, ProviderRecord

_FALLBACK_TPS = 50.0
TIE_TOLERANCE = 0.1  # within 10 % of the best estimate is a near-tie
PROBATION_SLOTS = 2


def job_cost(record: ProviderRecord, job: Job, now: float | None = None) -> float:
    """Seconds this job would keep ``record`` busy.

    From the provider's observed time to first content and decode rate once
    they are trusted, from its declared rates before — unless the few samples
    seen so far are worse than the claim: evidence of slowness counts at once,
    evidence of speed only once there is enough of it. Plus its decaying
    penalty for having been outpaced (registry/speed.py).
    """
    speed = record.speeds.get(job.model)
    decode = record.decode_tps if record.decode_tps > 0 else _FALLBACK_TPS
    prefill = record.prefill_tps if record.prefill_tps > 0 else _FALLBACK_TPS * 10
    declared = job.prompt_tokens / prefill + job.max_tokens / decode
    if speed is None or speed.ttfc is None:
        cost = declared
    else:
        observed = speed.ttfc + job.max_tokens / (speed.decode_tps or decode)
        cost = observed if speed.trusted else max(declared, observed)
    if speed is not None and now is not None:
        cost += speed.penalty_now(now)
    return cost


def estimated_seconds(record: ProviderRecord, job: Job, now: float | None = None) -> float:
    return record.queued_seconds + job_cost(record, job, now)


def pick(
    candidates: Sequence[ProviderRecord],
    job: Job,
    rng: random.Random,
    *,
    avoid_version: str | None = None,
    tie_tolerance: float = TIE_TOLERANCE,
    now: float | None = None,
) -> ProviderRecord | None:
    """Best candidate with a free slot, preferring a version other than ``avoid_version``."""
    free = [c for c in candidates if c.free_slots > 0]
    if avoid_version is not None:
        # Soft preference: never fail closed when only that version is free.
        diverse = [c for c in free if c.version_text != avoid_version]
        free = diverse or free
    if not free:
        return None
    scored = sorted((estimated_seconds(c, job, now), i, c) for i, c in enumerate(free))
    best = scored[0][0]
    ties = [c for score, _, c in scored if score <= best * (1 + tie_tolerance) + 1e-9]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


def on_probation(record: ProviderRecord, job: Job) -> bool:
    """Whether ``record`` already has as many jobs as an unmeasured provider may take."""
    speed = record.speeds.get(job.model)
    measured = speed is not None and speed.trusted
    return not measured and record.max_slots - record.free_slots >= PROBATION_SLOTS

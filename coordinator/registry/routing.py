"""The routing decision for one request: which provider, or why none. Pure, read-only.

:class:`Router` walks the model's free-slot index from the front, asks the one
gate function (:mod:`.gates`) about each provider it meets and lets the
scheduler (:mod:`.scheduler`) weigh the near-ties; when nobody free is
eligible it says whether to wait (someone eligible is busy) or why not, as a
:class:`~coordinator.registry.table.Refused`. It changes nothing: taking the
slot is the facade's (:mod:`.state`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import attrs

from coordinator.config import Config
from coordinator.registry import scheduler
from coordinator.registry.breaker import Breaker
from coordinator.registry.fleet import Fleet
from coordinator.registry.gates import (
    Gate,
    capabilities,
    fail_fast_message,
    gate,
    incapable_message,
    needs,
)
from coordinator.registry.table import Job, ProviderRecord, Refusal, Refused
from coordinator.registry.waitqueue import AcquireRequest

# A decision weighs at most this many eligible providers from the front of the
# model's index (and a few more, on a retry, to find another version).
PICK_WIDTH = 8
DIVERSITY_WINDOW = 32

Choice = ProviderRecord | Refused | None  # None: someone eligible is busy; wait


@attrs.define(eq=False)
class Router:
    config: Config
    fleet: Fleet
    breaker: Breaker
    rng: random.Random

    def choose(self, request: AcquireRequest, now: float) -> Choice:
        """The provider to lease, a refusal, or None to mean "wait in the queue"."""
        job = request.job
        if job.model not in self.fleet.by_model:
            if self.fleet.offline_models.remembers(job.model, now):
                # Its providers are momentarily offline: wait for them, unless none
                # of them could ever have served this request.
                return self.incapable(job, now)
            return _unknown(job.model)
        chosen, gated = self.pick(request, now)
        if chosen is not None:
            return chosen
        why = self.why_not(request, now, gated)
        if why is None:
            return None  # eligible providers exist; every one of them is busy
        return self._refusal(job, why, now)

    def pick(self, request: AcquireRequest,
             now: float) -> tuple[ProviderRecord | None, dict[str, Gate]]:
        """The best eligible free provider, from the front of the model's index, and the
        gate's answer for every provider it turned down on the way."""
        avoid = request.avoid_version
        gated: dict[str, Gate] = {}
        candidates: list[ProviderRecord] = []
        on_probation: list[ProviderRecord] = []  # only if nobody else is free
        cutoff, extra = 0.0, 0
        for key, pid in self.fleet.free[request.job.model].best_first():
            if len(on_probation) >= PICK_WIDTH * 8:
                break  # a bounded look past a fleet of newcomers
            if candidates and (len(candidates) >= PICK_WIDTH or key > cutoff):
                # Enough near the best; on a retry, look a little further for another version.
                if avoid is None or any(c.version_text != avoid for c in candidates) \
                        or extra >= DIVERSITY_WINDOW:
                    break
                extra += 1
            record = self.fleet.providers[pid]
            reason = self.gate(record, request, now)
            if reason is not None:
                gated[pid] = reason
                continue
            if scheduler.on_probation(record, request.job):
                on_probation.append(record)
                continue
            if not candidates:
                cutoff = key * (1 + scheduler.TIE_TOLERANCE) + 1e-9
            candidates.append(record)
        chosen = scheduler.pick(candidates or on_probation[:PICK_WIDTH], request.job, self.rng,
                                avoid_version=avoid, now=now)
        return chosen, gated

    def why_not(self, request: AcquireRequest, now: float,
                known: Mapping[str, Gate]) -> set[Gate] | None:
        """None when some provider could serve the request once it has a free slot;
        otherwise every reason the gate gave. ``known``: answers already had (from
        :meth:`pick`), so that a refusal asks about each provider once, not three times."""
        why = set(known.values())
        for pid, record in self.fleet.by_model[request.job.model].items():
            if pid in known:
                continue
            reason = self.gate(record, request, now)
            if reason is None:
                return None
            why.add(reason)
        return why

    def gate(self, record: ProviderRecord, request: AcquireRequest, now: float) -> Gate | None:
        return gate(record, request.job, floors=self.fleet.floors, breaker=self.breaker,
                    now=now, exclude=request.exclude,
                    memory_fraction=self.config.model_memory_fraction)

    def absent(self, model: str, now: float) -> Refused | None:
        """Why a request waited in vain when its model has no provider connected any
        more (not "no slot came free"); None while some provider serves it."""
        if model in self.fleet.by_model:
            return None
        if self.fleet.offline_models.remembers(model, now):
            return Refused(Refusal.OFFLINE, f"no provider of the model {model!r} is connected: "
                           "they went offline and have not come back")
        return _unknown(model)

    def _refusal(self, job: Job, why: set[Gate], now: float) -> Refused:
        if Gate.EXCLUDED in why:
            return Refused(Refusal.EXHAUSTED, "no further provider available for this request")
        incapable = self.incapable(job, now)
        if incapable is not None:
            return incapable
        if why - {Gate.NOT_ALLOWED} == {Gate.REQUEST_TOO_LARGE}:
            largest = max(r.max_request_bytes for r in self.fleet.by_model[job.model].values())
            return Refused(Refusal.TOO_LARGE,
                           f"this request needs a {job.request_bytes}-byte frame; the providers "
                           f"of model {job.model} accept at most {largest} bytes")
        return Refused(Refusal.UNSERVABLE, fail_fast_message(job, why))

    def incapable(self, job: Job, now: float) -> Refused | None:
        """A refusal for good when no known provider of the model — connected here or
        mirrored from another instance, or departed within ``model_forget_after`` — has
        the capabilities the request needs; None when one has, or when nothing is known.

        Judged over all the model's providers, whatever the request's allowlist: a
        capable provider outside it keeps the refusal retryable (the allowlist may be
        the consumer's mistake of the moment, the model's capability is not).
        """
        needed = needs(job)
        floors = self.fleet.floors
        known = [capabilities(r, r.models[job.model], floors)
                 for r in self.fleet.by_model.get(job.model, {}).values()]
        departed = self.fleet.departed_capabilities.of(job.model, now)
        if departed is None and not known:
            return None  # the model is remembered, its providers' capabilities are not
        known.extend(departed or ())
        if any(needed <= caps for caps in known):
            return None
        return Refused(Refusal.INCAPABLE, incapable_message(job, known, floors))


def _unknown(model: str) -> Refused:
    return Refused(Refusal.UNKNOWN_MODEL, f"the model {model!r} does not exist or is not served")

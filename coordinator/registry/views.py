"""What the registry shows of its table: the snapshot for the admin endpoint and the
status page. Pure reads: building one changes nothing."""

from __future__ import annotations

from coordinator.registry import speed
from coordinator.registry.breaker import Breaker
from coordinator.registry.fleet import Fleet
from coordinator.registry.table import (
    CooldownView,
    ModelView,
    ProviderRecord,
    ProviderView,
    RegistrySnapshot,
    SpeedView,
)


def snapshot(fleet: Fleet, breaker: Breaker, queued: int, now: float) -> RegistrySnapshot:
    cooldowns = breaker.cooldowns(now)
    return RegistrySnapshot(
        providers=tuple(
            ProviderView(
                id=r.provider_id, version=r.version_text, hardware=r.hardware,
                in_use=len(r.leases), max_slots=r.max_slots, served=r.served,
                failed=r.failed, recent_verdicts=r.recent.count,
                recent_errors=r.recent.errors,
                models=tuple(ModelView(m.id, bool(m.is_vision), m.template_render_ok,
                                       _speed_view(r, m.id, now))
                             for m in r.models.values()),
                cooldowns=tuple(
                    CooldownView(model, shape, round(until - now, 3))
                    for (pid, model, shape), until in sorted(cooldowns.items())
                    if pid == r.provider_id),
            )
            for r in sorted(fleet.providers.values(), key=lambda r: r.provider_id)
        ),
        queue_depth=queued,
        leases=sum(len(r.leases) for r in fleet.providers.values()),
        models=tuple(sorted({*fleet.by_model, *fleet.offline_models.remembered(now)})),
    )


def _speed_view(record: ProviderRecord, model: str, now: float) -> SpeedView:
    known = record.speeds.get(model) or speed.ProviderSpeed()
    observed = known.trusted
    return SpeedView(
        source="observed" if observed else "declared",
        ttfc_s=round(known.ttfc, 4) if observed and known.ttfc is not None else None,
        decode_tps=round(known.decode_tps if observed and known.decode_tps
                         else record.decode_tps, 1),
        samples=known.samples, outpaced_penalty_s=round(known.penalty_now(now), 3))

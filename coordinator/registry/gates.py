"""The one eligibility function.

Selection, the speculative backup, the fail-fast preflight and queue admission
all ask :func:`gate`, so they cannot drift apart (the reference coordinator
had four bugs of exactly that drift). It answers *structural* eligibility:
slots and liveness are the scheduler's business, not the gate's.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

from coordinator.capabilities import Version, meets_floor
from coordinator.registry.breaker import Breaker
from coordinator.registry.table import Job, ProviderRecord

GIB = 1024**3


class Gate(enum.Enum):
    """Why a provider may not serve a request. Declared from most to least specific."""

    NOT_ALLOWED = "not in the request's provider allowlist"
    EXCLUDED = "already failed this request"
    NO_MODEL = "does not serve the model"
    TOO_LARGE = "model does not fit in the provider's memory"
    REQUEST_TOO_LARGE = "request is larger than the provider accepts"
    TEMPLATE = "model's chat template does not render"
    VISION = "model does not accept images or video"
    FLOOR = "provider version is below the capability floor"
    COOLING = "cooling down after repeated errors"


def gate(
    record: ProviderRecord,
    job: Job,
    *,
    floors: Mapping[str, Version | None],
    breaker: Breaker,
    now: float,
    exclude: Collection[str] = (),
    memory_fraction: float = 0.9,
) -> Gate | None:
    """``None`` when ``record`` may serve ``job``; otherwise the first reason it may not."""
    if job.allowlist is not None and record.provider_id not in job.allowlist:
        return Gate.NOT_ALLOWED
    if record.provider_id in exclude:
        return Gate.EXCLUDED
    model = record.models.get(job.model)
    if model is None:
        return Gate.NO_MODEL
    if record.memory_gb > 0 and model.size_bytes > record.memory_gb * GIB * memory_fraction:
        return Gate.TOO_LARGE
    if job.request_bytes > record.max_request_bytes:
        return Gate.REQUEST_TOO_LARGE
    # False fences the model for every shape: the self-check renders plain
    # chat too, so a False may mean ordinary prompts crash as well.
    if model.template_render_ok is False:
        return Gate.TEMPLATE
    if job.traits.requires_vision and not model.is_vision:
        return Gate.VISION
    if not all(meets_floor(record.version, floors.get(t)) for t in job.traits.names):
        return Gate.FLOOR
    if breaker.is_cooling((record.provider_id, job.model, job.traits.shape), now):
        return Gate.COOLING
    return None


def fail_fast_message(job: Job, reasons: Collection[Gate]) -> str:
    """A specific message for a request no provider can structurally serve."""
    # Providers outside the allowlist say nothing about what the request
    # needs; the reasons of the allowed ones do.
    telling = set(reasons) - {Gate.NOT_ALLOWED, Gate.EXCLUDED}
    scope = " among the request's allowed providers" if job.allowlist is not None else ""
    if not telling:
        return f"no provider in the request's allowlist serves model {job.model}"
    if telling == {Gate.TOO_LARGE}:
        return f"model {job.model} is too large for every provider that serves it"
    what = "this request"
    if job.traits.has_tools and telling <= {Gate.FLOOR, Gate.TEMPLATE, Gate.COOLING}:
        what = "tool calls"
    if job.traits.requires_vision and Gate.VISION in telling:
        what = "image or video input"
    detail = "; ".join(sorted(r.value for r in telling))
    return f"no provider for model {job.model} can serve {what}{scope} ({detail})"

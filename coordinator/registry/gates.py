"""The one eligibility function.

Selection, the speculative backup, the fail-fast preflight and queue admission
all ask :func:`gate`, so they cannot drift apart (the reference coordinator
had four bugs of exactly that drift). It answers *structural* eligibility:
slots and liveness are the scheduler's business, not the gate's.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from typing import Final

from coordinator.capabilities import TRAIT_NAMES, Version, meets_floor
from coordinator.protocol import ModelInfo
from coordinator.protocol.endpoints import Endpoint
from coordinator.registry.breaker import Breaker
from coordinator.registry.table import Job, ProviderRecord

GIB = 1024**3


class Gate(enum.Enum):
    """Why a provider may not serve a request. Declared from most to least specific."""

    NOT_ALLOWED = "not in the request's provider allowlist"
    EXCLUDED = "already failed this request"
    NO_MODEL = "does not serve the model"
    ENDPOINT = "does not serve the model on this endpoint"
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
    if model.endpoints is not None and job.endpoint not in model.endpoints:
        return Gate.ENDPOINT
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


def capabilities(record: ProviderRecord, model: ModelInfo,
                 floors: Mapping[str, Version | None]) -> frozenset[str]:
    """The request traits ``record`` can serve on ``model`` at all — what :func:`gate`'s
    vision and floor checks let through: tools when its version meets the tools floor,
    vision when the model takes images and the version meets the vision floor.

    Fixed for a session (floors are configuration; version and models are the
    registration's): what a provider that leaves is remembered to have been able to do.
    """
    _, vision = TRAIT_NAMES
    traits = (t for t in TRAIT_NAMES
              if (t != vision or model.is_vision) and meets_floor(record.version, floors.get(t)))
    endpoints = model.endpoints if model.endpoints is not None else ALL_ENDPOINTS
    return frozenset((*traits, *(endpoint_need(e) for e in endpoints)))


ALL_ENDPOINTS: Final = tuple(e.value for e in Endpoint)


def endpoint_need(endpoint: str) -> str:
    """How :func:`capabilities` names serving ``endpoint`` (next to the trait names)."""
    return f"endpoint {endpoint}"


def needs(job: Job) -> frozenset[str]:
    """What a provider must be able to do at all for ``job``: its traits and its endpoint."""
    return frozenset((*job.traits.names, endpoint_need(job.endpoint)))


_CAPABILITY_WORDS = {"tools": "tool calls", "vision": "image or video input"}


def incapable_message(job: Job, known: Collection[frozenset[str]],
                      floors: Mapping[str, Version | None]) -> str:
    """For a request no known provider of its model could ever serve: what it needs that
    none has (``known``: the capability sets of the model's providers, live and departed)."""
    endpoint = endpoint_need(job.endpoint)
    if not any(endpoint in caps for caps in known):
        return f"model {job.model} is not served on {job.endpoint} by any of its providers"
    missing = [t for t in job.traits.names if not any(t in caps for caps in known)]
    if not missing:  # each need somewhere, never all on one provider
        both = " together with ".join(_CAPABILITY_WORDS[t] for t in job.traits.names)
        if not both:
            return f"model {job.model} is not served on {job.endpoint} by any of its providers"
        return (f"model {job.model} does not support {both} on {job.endpoint}: none of its "
                "providers has all of them")
    clauses = []
    for trait in missing:
        floor = floors.get(trait)
        at_floor = f"runs version {floor} or later (the capability floor for {trait})"
        if trait == "vision":
            has = "serves it as a vision model" + (f" and {at_floor}" if floor else "")
        else:
            has = at_floor
        clauses.append(f"{_CAPABILITY_WORDS[trait]}: none of its providers {has}")
    return f"model {job.model} does not support " + "; nor ".join(clauses)


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

"""The registry's values: jobs, providers, leases, grants and refusals, verdicts, and
what it shows (the snapshot and the census).

The table holds values only — no sockets. A lease names a slot on one session
of one provider; whoever needs the connection behind it asks the provider
edge's directory. Only the registry actor mutates a :class:`ProviderRecord`.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import attrs

from coordinator.capabilities import Version
from coordinator.protocol import ModelInfo
from coordinator.registry.speed import ProviderSpeed
from coordinator.registry.traits import Traits


@attrs.frozen
class Job:
    """What routing needs to know about one consumer request."""

    request_id: str
    model: str
    traits: Traits = attrs.field(factory=Traits)
    prompt_tokens: int = 1
    max_tokens: int = 256
    # Optional allowlist of provider ids from the request; None = any.
    allowlist: frozenset[str] | None = None
    # The inference_request frame's size (an upper bound), for providers' limits.
    request_bytes: int = 0
    # The endpoint it came to: a provider may serve a model on some endpoints only.
    endpoint: str = "/v1/chat/completions"


@attrs.frozen
class Lease:
    """One slot on one provider session, held by one racer of one request."""

    request_id: str  # the wire id, unique per lease
    provider_id: str
    session: int
    model: str
    shape: str
    version: str
    cost: float  # seconds of the provider's time this job is estimated to take
    instance: str = ""  # the instance the provider is connected to; "" for this one


@attrs.frozen
class Grant:
    lease: Lease
    queued: float = 0.0  # seconds spent in the queue before the grant
    # Seconds after dispatch to start a speculative backup (registry/hedging.py).
    hedge_after: float | None = None


class Refusal(enum.Enum):
    UNKNOWN_MODEL = "unknown_model"
    UNSERVABLE = "unservable"  # providers serve the model, none can serve this request
    TOO_LARGE = "too_large"  # no provider of the model accepts a frame this large
    EXHAUSTED = "exhausted"  # every otherwise eligible provider already failed this request
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    OFFLINE = "offline"  # waited in the queue while no provider of the model was connected
    # The request needs a capability (tool calls, images) no known provider of the
    # model has — live, or departed and still remembered: for good, not for now.
    INCAPABLE = "incapable"


@attrs.frozen
class Refused:
    """A request the registry will not serve (now, or for good): what kind, and a
    sentence for the consumer. HTTP is the API edge's business (api/outcomes.py)."""

    kind: Refusal
    detail: str


Decision = Grant | Refused | None  # None: wait in the queue


@attrs.frozen
class Observed:
    """What a committed request showed of its provider's speed."""

    ttfc: float  # seconds from the send to the first content
    decode_tps: float | None  # output tokens per second after it, when known
    prompt_tokens: int


@attrs.frozen
class Outpaced:
    """A racer that lost because the other one committed content first."""

    silent_for: float  # seconds since its send, with nothing (or only boilerplate) to show
    boilerplate_only: bool


Evidence = Observed | Outpaced

class OutcomeKind(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"  # no verdict on the provider's health


@attrs.frozen
class Outcome:
    """The verdict a lease is released with."""

    kind: OutcomeKind
    status: int = 0

    @classmethod
    def failure(cls, status: int) -> Outcome:
        return cls(OutcomeKind.FAILURE, status)


SUCCESS = Outcome(OutcomeKind.SUCCESS)
CANCELLED = Outcome(OutcomeKind.CANCELLED)


@attrs.define
class RecentVerdicts:
    """The last :attr:`SIZE` verdicts on a provider's health — a success, or an error
    (a breaker strike: 500, 502, 504) — as bits: its recent error rate in a few bytes,
    updated in O(1) (the status page shows it)."""

    SIZE: ClassVar[int] = 64
    _bits: int = 0  # 1 = an error; the newest verdict in the lowest bit
    count: int = 0  # verdicts held, at most SIZE

    def add(self, *, error: bool) -> None:
        self._bits = ((self._bits << 1) | error) & ((1 << self.SIZE) - 1)
        self.count = min(self.count + 1, self.SIZE)

    @property
    def errors(self) -> int:
        return self._bits.bit_count()


@attrs.define(eq=False)
class ProviderRecord:
    provider_id: str
    session: int
    version_text: str
    version: Version | None
    models: dict[str, ModelInfo]
    memory_gb: float = 0.0
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    max_slots: int = 8
    hardware: str = ""
    signing_key: str = ""
    max_request_bytes: int = 1024 * 1024
    leases: dict[str, Lease] = attrs.field(factory=dict)
    served: int = 0
    failed: int = 0  # errors (breaker strikes) this session, as seen from this instance
    recent: RecentVerdicts = attrs.field(factory=RecentVerdicts)
    # What routing has learned of its speed, per model (registry/speed.py).
    speeds: dict[str, ProviderSpeed] = attrs.field(factory=dict)
    # Scale-out (docs/scale-out.md): the instance a remote provider is connected to
    # ("" for this one's own), and the slots and estimated work other instances
    # have on it: both weigh in its estimate as this instance's own leases do.
    instance: str = ""
    public_key: str = ""
    encrypted_chunks: bool = True
    external_in_use: int = 0
    external_seconds: float = 0.0

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self.leases) - self.external_in_use

    @property
    def queued_seconds(self) -> float:
        return sum(lease.cost for lease in self.leases.values()) + self.external_seconds


# ---- what the registry shows (the admin endpoint and the status page) -------------


@attrs.frozen
class SpeedView:
    source: str  # "observed" once trusted, else "declared"
    ttfc_s: float | None
    decode_tps: float
    samples: int
    outpaced_penalty_s: float


@attrs.frozen
class ModelView:
    id: str
    is_vision: bool
    template_render_ok: bool | None
    speed: SpeedView | None = None


@attrs.frozen
class CooldownView:
    model: str
    shape: str
    seconds_left: float


@attrs.frozen
class ProviderView:
    id: str
    version: str
    hardware: str
    in_use: int
    max_slots: int
    served: int
    models: tuple[ModelView, ...]
    cooldowns: tuple[CooldownView, ...]
    failed: int = 0
    recent_verdicts: int = 0  # the last successes and errors, at most RecentVerdicts.SIZE …
    recent_errors: int = 0  # … and the errors among them


@attrs.frozen
class Census:
    """Providers online (local and mirrored) and requests queued: for health checks."""

    providers: int
    queued: int


@attrs.frozen
class RegistrySnapshot:
    providers: tuple[ProviderView, ...]
    queue_depth: int
    leases: int
    models: tuple[str, ...]  # served now, or remembered while their providers are away

    def as_json(self) -> dict[str, Any]:
        """The documented JSON shape (docs/operations.md, ``/v1/admin/providers``)."""
        return {
            "providers": [
                {"id": p.id, "version": p.version, "hardware": p.hardware,
                 "slots": {"in_use": p.in_use, "max": p.max_slots}, "served": p.served,
                 "failed": p.failed,
                 "recent": {"verdicts": p.recent_verdicts, "errors": p.recent_errors},
                 "models": [attrs.asdict(m) for m in p.models],
                 "cooldowns": [attrs.asdict(c) for c in p.cooldowns]}
                for p in self.providers
            ],
            "queue_depth": self.queue_depth,
            "leases": self.leases,
            "models": list(self.models),
        }

"""Configuration: one frozen attrs value, built from defaults, environment and flags.

Every knob is documented in docs/configuration.md; keep the two in step.
Environment variables are ``COORDINATOR_<FIELD>`` (upper case); list-valued
fields take comma-separated values; ``capability_floors`` takes
``trait=version`` pairs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from coordinator import sizes


def _pairs(value: Any, what: str) -> Mapping[str, str]:
    """``name=value,name=value`` text (or a mapping) as a mapping."""
    if not isinstance(value, str):
        return dict(value)
    out: dict[str, str] = {}
    for pair in (p.strip() for p in value.split(",")):
        if not pair:
            continue
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{pair!r} is not {what}")
        out[name.strip()] = text.strip()
    return out


def _floors(value: Any) -> Mapping[str, str]:
    return _pairs(value, "trait=version")


def _bindings(value: Any) -> Mapping[str, str]:
    return _pairs(value, "provider_id=signing_key")


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


@attrs.frozen
class Config:
    # -- listeners
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    provider_host: str = "127.0.0.1"
    provider_port: int = 8001
    # -- credentials
    api_keys: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    admin_keys: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    provider_tokens: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    # -- limits on what consumers and providers send
    max_body_bytes: int = 10 * 1024 * 1024
    max_frame_bytes: int = 4 * 1024 * 1024
    register_frame_bytes: int = 256 * 1024
    max_json_depth: int = 64
    max_tokens_limit: int = 1_000_000
    request_buffer_chunks: int = 256
    request_buffer_bytes: int = 8 * 1024 * 1024
    # -- consumer connections
    max_connections: int = 1000
    keep_alive_timeout: float = 5.0
    request_head_timeout: float = 10.0
    write_timeout: float = 30.0
    status_public: bool = False
    # -- dispatch budgets (seconds)
    max_attempts: int = 3
    ttft_base: float = 5.0
    ttft_per_prompt_token: float = 0.001
    backup_fraction: float = 0.5
    speculative_backup: bool = True
    preamble_timeout: float = 90.0
    inference_timeout: float = 600.0
    idle_timeout: float = 600.0
    max_held_chunks: int = 8
    cancel_send_timeout: float = 2.0
    # -- routing health
    breaker_strikes: int = 2
    breaker_window: float = 60.0
    breaker_cooldown: float = 300.0
    capability_floors: Mapping[str, str] = attrs.field(
        factory=lambda: {"tools": "0.6.3"}, converter=_floors
    )
    model_memory_fraction: float = 0.9
    # -- queue
    queue_max: int = 256
    queue_timeout: float = 120.0
    # -- providers
    default_provider_slots: int = 8
    max_provider_slots: int = 256
    max_pending_providers: int = 64
    max_models_per_provider: int = 256
    max_known_models: int = 10_000
    model_forget_after: float = 3600.0
    provider_bindings: Mapping[str, str] = attrs.field(
        factory=dict, converter=_bindings
    )
    max_identity_pins: int = 100_000
    register_timeout: float = 10.0
    challenge_interval: float = 300.0
    challenge_timeout: float = 10.0
    heartbeat_timeout: float = 90.0
    # -- misc
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        problems = sizes.check(self.max_body_bytes, self.max_frame_bytes,
                               self.register_frame_bytes, self.request_buffer_bytes)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Config:
        """Defaults, then ``COORDINATOR_*`` variables, then explicit overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            raw = environ.get(f"COORDINATOR_{field.name.upper()}")
            if raw is not None:
                values[field.name] = _parse(field, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(field: attrs.Attribute[Any], raw: str) -> Any:
    kind = field.type
    if kind in ("int", int):
        return int(raw)
    if kind in ("float", float):
        return float(raw)
    if kind in ("bool", bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind in ("int | None",):
        return int(raw) if raw else None
    return raw

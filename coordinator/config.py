"""Configuration: one frozen attrs value, built from defaults, environment and flags.

Every knob is documented in docs/configuration.md; keep the two in step.
Environment variables are ``COORDINATOR_<FIELD>`` (upper case); list-valued
fields take comma-separated values; ``capability_floors`` takes
``trait=version`` pairs.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import attrs

from coordinator import sizes
from coordinator.capabilities import TRAIT_NAMES, parse_version
from coordinator.protocol.crypto import load_verify_key


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
    floors = _pairs(value, "trait=version")
    for trait, version in floors.items():
        # A misspelled trait would otherwise drop the floor it meant (the default
        # tools=0.6.3 included) without a word.
        if trait not in TRAIT_NAMES:
            raise ValueError(f"{trait!r} is not a trait ({', '.join(TRAIT_NAMES)})")
        if parse_version(version) is None:
            raise ValueError(f"{version!r} is not a version (MAJOR[.MINOR[.PATCH]])")
    return floors


def _bindings(value: Any) -> Mapping[str, str]:
    bindings = _pairs(value, "provider_id=signing_key")
    for provider_id, key in bindings.items():
        try:
            load_verify_key(key)
        except ValueError as exc:
            raise ValueError(f"the key bound to {provider_id!r} is not an Ed25519 public "
                             f"key in base64 ({exc})") from None
    return bindings


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
    # A non-streaming answer is held whole until it completes: this bounds it (its events'
    # JSON, in bytes). Streamed answers flow through and are bounded by the buffer above.
    max_response_bytes: int = 16 * 1024 * 1024
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
    adaptive_hedging: bool = True
    hedge_floor: float = 0.1
    hedge_budget: float = 0.05
    hedge_window: float = 60.0
    image_prompt_tokens: int = 765
    cancel_send_timeout: float = 2.0
    close_timeout: float = 1.0
    withdraw_timeout: float = 5.0
    drain_timeout: float = 30.0
    # -- routing health
    breaker_strikes: int = 2
    breaker_window: float = 60.0
    breaker_cooldown: float = 300.0
    outpaced_strikes: int = 3
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
    # One instance: keep explicit ids' key pins here across restarts (with redis_url
    # they live in Redis). Empty: in memory, forgotten on restart.
    identity_pins_file: str = ""
    register_timeout: float = 10.0
    challenge_interval: float = 300.0
    challenge_timeout: float = 10.0
    heartbeat_timeout: float = 90.0
    # -- scale-out (docs/scale-out.md): empty redis_url = one process, nothing shared
    redis_url: str = ""
    instance_id: str = ""
    cluster_token: str = ""
    cluster_host: str = "127.0.0.1"
    cluster_port: int = 8002
    advertise_host: str = ""
    advertise_port: int = 0  # 0: the cluster port bound (set it behind NAT or a port map)
    cluster_refresh: float = 1.0
    cluster_ttl: float = 5.0
    # Every Redis call (connect, command, a connection from the pool) waits at most this
    # long: a hung Redis reads "degraded" instead of stalling admissions silently.
    redis_timeout: float = 2.0
    # -- accounts (docs/accounts.md): named keys, limits, the usage ledger
    # False: none of it — api_keys alone, nothing counted, no keys file.
    accounts: bool = True
    # The SQLite file of named keys and the ledger (one instance; with redis_url they live
    # in Redis). Empty: kept in memory, forgotten at exit (`coordinator serve` sets a file).
    keys_db: str = ""
    # A request without max_tokens reserves its prompt estimate plus this many tokens.
    token_bound_default: int = 4096
    ledger_retention: float = 90 * 86400.0  # seconds of ledger kept for usage reports
    metrics_per_key: bool = False  # a tokens-charged series per key name
    # -- misc
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        problems = [f"{name}: {problem}" for name, problem in self._field_problems()]
        if self.redis_url and not self.cluster_token:
            problems.append("cluster_token: required with redis_url (instances authenticate "
                            "each other with it)")
        if self.redis_url and self.identity_pins_file:
            problems.append("identity_pins_file: not used with redis_url (the pins live in "
                            "Redis); set one or the other")
        if self.redis_url and self.keys_db:
            problems.append("keys_db: not used with redis_url (keys and the ledger live in "
                            "Redis); set one or the other")
        problems += sizes.check(self.max_frame_bytes, self.register_frame_bytes,
                                self.request_buffer_bytes)
        if problems:
            raise ConfigError("; ".join(problems))

    def _field_problems(self) -> list[tuple[str, str]]:
        out = []
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if value != value:  # NaN
                out.append((field.name, "must be a number"))
            elif field.name in _PORTS and not 0 <= value <= 65535:
                out.append((field.name, f"must be a port number 0-65535, not {value}"))
            elif field.name in _FRACTIONS and not 0 < value <= 1:
                out.append((field.name, f"must be in (0, 1], not {value}"))
            elif field.name in _AT_LEAST_ONE and value < 1:
                out.append((field.name, f"must be at least 1, not {value}"))
            elif value < 0:
                out.append((field.name, f"must not be negative, not {value}"))
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Config:
        """Defaults, then ``COORDINATOR_*`` variables, then explicit overrides.

        Raises :class:`ConfigError` naming the variable or setting at fault.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            variable = f"COORDINATOR_{field.name.upper()}"
            raw = environ.get(variable)
            if raw is not None:
                try:
                    values[field.name] = _parse(field, raw)
                except ValueError as exc:
                    raise ConfigError(f"{variable}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(_name_variables(str(exc), environ)) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


_PORTS = frozenset({"http_port", "provider_port", "cluster_port", "advertise_port"})
_FRACTIONS = frozenset({"backup_fraction", "model_memory_fraction", "hedge_budget"})
_AT_LEAST_ONE = frozenset({
    "token_bound_default", "ledger_retention",
    "max_body_bytes", "max_frame_bytes", "max_json_depth", "max_tokens_limit",
    "request_buffer_chunks", "max_response_bytes", "max_connections", "max_attempts", "breaker_strikes",
    "default_provider_slots", "max_provider_slots", "max_pending_providers",
    "max_models_per_provider", "max_identity_pins", "outpaced_strikes",
})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _name_variables(message: str, environ: Mapping[str, str]) -> str:
    """Say ``COORDINATOR_X`` for settings that came from the environment (each problem)."""
    return "; ".join(_name_variable(problem, environ) for problem in message.split("; "))


def _name_variable(problem: str, environ: Mapping[str, str]) -> str:
    for field in attrs.fields(Config):
        variable = f"COORDINATOR_{field.name.upper()}"
        if variable in environ and problem.startswith(f"{field.name}:"):
            return f"{variable}={environ[variable]!r}" + problem[len(field.name):]
    return problem


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``COORDINATOR_*`` variable that names no setting."""
    environ = os.environ if environ is None else environ
    known = [f.name.upper() for f in attrs.fields(Config)]
    warnings = []
    for name in sorted(environ):
        setting = name.removeprefix("COORDINATOR_")
        if setting != name and setting not in known:
            # Compared without the common prefix, which made every name look alike.
            close = difflib.get_close_matches(setting, known, n=1)
            hint = f"; did you mean COORDINATOR_{close[0]}?" if close else ""
            if setting == "LOG_LEVEL":
                hint = "; the log level is the --log-level flag"
            warnings.append(f"{name} is not a coordinator setting{hint}")
    return warnings


def _parse(field: attrs.Attribute[Any], raw: str) -> Any:
    converter: Any = field.converter
    if converter is not None:  # lists and pairs parse themselves
        return converter(raw)
    kind: Any = field.type
    text = raw.strip()
    if kind in ("int", int, "int | None"):
        if not text and kind == "int | None":
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError("not an integer") from None
    if kind in ("float", float):
        try:
            return float(text)
        except ValueError:
            raise ValueError("not a number") from None
    if kind in ("bool", bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("not a boolean (use true/false, yes/no, on/off or 1/0)")
    return raw

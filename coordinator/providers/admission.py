"""What a ``register`` frame must satisfy, and the record it becomes. Pure.

A provider's claims end up in HTTP headers (``X-Provider-Id``,
``X-Provider-Version``), metric labels, the status page and the scheduler's
arithmetic, so each is checked before the provider is admitted: text that
could break a header is refused (1008 with the reason), numbers outside a
plausible range are clamped to it. The ranges are documented in
docs/protocol.md (admission).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from coordinator import sizes
from coordinator.config import Config
from coordinator.protocol import ModelInfo, Register
from coordinator.protocol.endpoints import Endpoint

# Header-safe tokens: what may appear in X-Provider-Id / X-Provider-Version.
_TOKEN: Final = re.compile(r"[A-Za-z0-9._+:\-]{1,64}")
# Model ids: printable ASCII without spaces (e.g. "mlx-community/Qwen2.5-7B-4bit").
_MODEL_ID: Final = re.compile(r"[\x21-\x7e]{1,256}")
_MAX_LABEL: Final = 128
MAX_HARDWARE_LABEL: Final = 2 * _MAX_LABEL + 1  # hardware_label(): two labels and a space

# Plausible declared rates (tokens per second); 0 means "not declared".
MAX_DECODE_TPS: Final = 5_000.0
MAX_PREFILL_TPS: Final = 500_000.0
MAX_MEMORY_GB: Final = 65_536.0
MAX_MODEL_BYTES: Final = 2**50
_ENDPOINTS: Final = frozenset(e.value for e in Endpoint)


class AdmissionError(Exception):
    """A provider that may not be admitted; the message is the close reason."""


def check_register(message: Register, config: Config) -> None:
    """Raise :class:`AdmissionError` naming the first claim that cannot be accepted."""
    if not message.models:
        raise AdmissionError("register lists no models")
    if len(message.models) > config.max_models_per_provider:
        raise AdmissionError(
            f"register lists {len(message.models)} models; at most "
            f"{config.max_models_per_provider} are accepted")
    problem = names_problem(message.provider_id, message.version, message.models, (
        message.backend, message.hardware.machine_model, message.hardware.chip_name))
    if problem is not None:
        raise AdmissionError(problem)
    for model in message.models:
        if not 0 <= model.size_bytes <= MAX_MODEL_BYTES:
            raise AdmissionError(f"model {model.id} has an implausible size_bytes")
        if model.endpoints is not None and not set(model.endpoints) <= _ENDPOINTS:
            raise AdmissionError(f"model {model.id} lists an unknown endpoint (known: "
                                 f"{', '.join(sorted(_ENDPOINTS))})")
    if message.max_concurrency is not None and message.max_concurrency < 1:
        raise AdmissionError("max_concurrency must be at least 1")
    if (message.max_request_bytes is not None
            and message.max_request_bytes < sizes.MIN_PROVIDER_REQUEST_BYTES):
        raise AdmissionError(
            f"max_request_bytes must be at least {sizes.MIN_PROVIDER_REQUEST_BYTES}")


def names_problem(provider_id: str | None, version: str, models: Iterable[ModelInfo],
                  labels: Iterable[str]) -> str | None:
    """Why these names could not go into a header, a metric label or a log line, if so.

    What a ``register`` must satisfy, and what a directory page from another instance
    (cluster/entries.py) is held to as well.
    """
    if provider_id is not None and not _TOKEN.fullmatch(provider_id):
        return "provider_id must be 1-64 characters of [A-Za-z0-9._+:-]"
    if version and not _TOKEN.fullmatch(version):
        return "version must be at most 64 characters of [A-Za-z0-9._+:-]"
    models = tuple(models)
    if any(not _MODEL_ID.fullmatch(model.id) for model in models):
        return "model ids must be 1-256 printable ASCII characters"
    for label in (*labels, *(m.model_type for m in models), *(m.quantization for m in models)):
        if len(label) > _MAX_LABEL or not label.isprintable():
            return f"descriptive fields must be at most {_MAX_LABEL} printable characters"
    return None


def clamp(value: float, high: float) -> float:
    """``value`` within ``[0, high]``; anything negative means "not declared"."""
    return min(max(value, 0.0), high)


def slots(message: Register, config: Config) -> int:
    declared = message.max_concurrency or config.default_provider_slots
    return min(declared, config.max_provider_slots)


def request_limit(message: Register) -> int:
    """The largest request frame to send this provider."""
    if message.max_request_bytes is None:
        return sizes.DEFAULT_PROVIDER_REQUEST_BYTES
    return min(message.max_request_bytes, sizes.MAX_PROVIDER_REQUEST_BYTES)


def unique_models(message: Register) -> dict[str, ModelInfo]:
    """Models by id; a repeated id keeps its first declaration."""
    out: dict[str, ModelInfo] = {}
    for model in message.models:
        out.setdefault(model.id, model)
    return out


def hardware_label(message: Register) -> str:
    return f"{message.hardware.machine_model} {message.hardware.chip_name}".strip()

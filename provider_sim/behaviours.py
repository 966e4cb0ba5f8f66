"""Fault scripts: what a simulated provider does with one request.

A :class:`Behaviour` is a small value; a provider has a default behaviour and
an optional script of behaviours consumed one per request (then the default
again), so a test can say "fail the first request after the role chunk,
serve the rest". Every wait is ``trio.sleep``, so the whole fleet runs under
a virtual clock in tests.
"""

from __future__ import annotations

import enum

import attrs


class Fault(enum.Enum):
    HEALTHY = "healthy"
    ROLE_THEN_ERROR = "role_then_error"
    ROLE_THEN_DISCONNECT = "role_then_disconnect"
    ROLE_THEN_CLOSE = "role_then_close"  # boilerplate, then a clean inference_complete
    ERROR = "error"  # immediate inference_error
    STALL = "stall"  # never answers
    STALL_AFTER_ROLE = "stall_after_role"
    ERROR_AFTER_CONTENT = "error_after_content"
    DISCONNECT_AFTER_CONTENT = "disconnect_after_content"
    PLAINTEXT_CHUNKS = "plaintext_chunks"  # declares encryption, sends plaintext
    GARBAGE_CHUNK = "garbage_chunk"  # a chunk that does not decrypt
    # Sends ``raw`` as one chunk's payload, verbatim, after ``after_chunks`` content
    # chunks (0: right after the preamble), then carries on: hostile-output tests.
    RAW_CHUNK = "raw_chunk"


@attrs.frozen
class Behaviour:
    fault: Fault = Fault.HEALTHY
    status: int = 500
    error_message: str = "simulated provider failure"
    # Content chunks sent before ERROR_AFTER_CONTENT / DISCONNECT_AFTER_CONTENT.
    after_chunks: int = 2
    # Seconds before the first event (prefill), and between tokens.
    first_token_delay: float = 0.0
    token_interval: float = 0.0
    # Send inference_accepted, then wait this long before the preamble.
    accepted_delay: float | None = None
    tokens: int = 8
    # Say exactly this (split on spaces) instead of the default sentence.
    text: str | None = None
    ignore_cancel: bool = False
    failure_probability: float = 0.0
    raw: str = ""  # the payload RAW_CHUNK sends


HEALTHY = Behaviour()


def parse_behaviour(spec: str) -> Behaviour:
    """``fault[:key=value,...]``, e.g. ``role_then_error:status=500`` (CLI and fleet files)."""
    name, _, rest = spec.partition(":")
    try:
        fault = Fault(name.strip())
    except ValueError:
        raise ValueError(f"unknown behaviour {name.strip()!r} (known: "
                         f"{', '.join(f.value for f in Fault)})") from None
    fields: dict[str, object] = {"fault": fault}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, _, value = pair.partition("=")
        attr = attrs.fields_dict(Behaviour).get(key)
        if attr is None or key == "fault":
            raise ValueError(f"unknown behaviour field {key!r}")
        try:
            fields[key] = _coerce(attr.type, value)
        except ValueError:
            raise ValueError(f"behaviour field {key}={value!r}: expected {attr.type}") from None
    return Behaviour(**fields)  # type: ignore[arg-type]


def _coerce(kind: object, value: str) -> object:
    if kind in ("int", int):
        return int(value)
    if kind in ("bool", bool):
        return value.lower() in ("1", "true", "yes")
    if kind in ("float", float, "float | None"):
        return float(value)
    return value

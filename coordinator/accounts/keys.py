"""A named API key's values, and its secret. Pure.

A secret is 32 random bytes, shown once at creation as ``sk-<name>-<base64url>``
(the name is only a hint for its owner; it proves nothing) and kept as its
SHA-256: a stolen key table opens no door. Looking a key up is a dictionary
lookup of the offered secret's hash, the same cost for every secret.

Everything an admin sends is checked here before it is kept (:func:`check_name`,
:func:`limits_from`): a clear error naming the field, never a half-made key.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
import secrets
from collections.abc import Mapping
from typing import Any, Final

import attrs

from coordinator.untrusted import printable

NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_MODELS: Final = 256
MAX_MODEL_ID: Final = 256
MAX_RATE: Final = 10**9  # requests or tokens per minute
MAX_CONCURRENT: Final = 100_000
MAX_BUDGET: Final = 10**15


class KeySpecError(ValueError):
    """An admin's key description that cannot be kept; the message names the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BudgetWindow(enum.Enum):
    NONE = "none"  # the budget is for the key's whole life
    DAILY = "daily"  # resets at 00:00 UTC
    MONTHLY = "monthly"  # resets on the 1st, 00:00 UTC


class KeyState(enum.Enum):
    ACTIVE = "active"
    REVOKED = "revoked"


@attrs.frozen
class Limits:
    """What a key may do; None: no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    token_budget: int | None = None
    budget_window: BudgetWindow = BudgetWindow.NONE

    def as_json(self) -> dict[str, Any]:
        return {"requests_per_minute": self.requests_per_minute,
                "tokens_per_minute": self.tokens_per_minute,
                "concurrent_requests": self.concurrent_requests,
                "token_budget": self.token_budget,
                "budget_window": self.budget_window.value}


UNLIMITED: Final = Limits()


@attrs.frozen
class KeyRecord:
    name: str
    secret_hash: str
    limits: Limits = UNLIMITED
    models: frozenset[str] | None = None  # allowed models; None: any
    state: KeyState = KeyState.ACTIVE
    created: float = 0.0  # wall-clock seconds, for people to read

    def as_json(self) -> dict[str, Any]:
        """What the admin API shows of a key: never its secret, nor its hash."""
        return {"name": self.name, "state": self.state.value, "created": self.created,
                "models": sorted(self.models) if self.models is not None else None,
                "limits": self.limits.as_json()}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret(name: str) -> tuple[str, str]:
    """A fresh secret for key ``name`` and its hash: (secret, hash)."""
    token = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    secret = f"sk-{name[:16]}-{token}"
    return secret, hash_secret(secret)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise KeySpecError(f"a key's name is 1-64 characters of [A-Za-z0-9._-], starting with a "
                        f"letter or digit; not {printable(name, 80)!r}", "name")
    return name


def limits_from(body: Mapping[str, Any], base: Limits = UNLIMITED) -> Limits:
    """``base`` with the limits ``body`` sets (an admin's JSON); KeySpecError naming the field.

    A limit set to ``null`` is removed; one absent stays as it was.
    """
    values: dict[str, Any] = {}
    for field, top in (("requests_per_minute", MAX_RATE), ("tokens_per_minute", MAX_RATE),
                       ("concurrent_requests", MAX_CONCURRENT), ("token_budget", MAX_BUDGET)):
        if field in body:
            values[field] = _count(body[field], field, top)
    if "budget_window" in body:
        try:
            values["budget_window"] = BudgetWindow(body["budget_window"])
        except (ValueError, TypeError):
            raise KeySpecError("budget_window is one of none, daily, monthly",
                            "budget_window") from None
    return attrs.evolve(base, **values)


def models_from(value: Any) -> frozenset[str] | None:
    """An admin's ``models`` (a list of model ids, or null for any); KeySpecError if not."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_MODELS or not all(
            isinstance(m, str) and 0 < len(m) <= MAX_MODEL_ID and m.isprintable()
            for m in value):
        raise KeySpecError(f"models is null or a list of at most {MAX_MODELS} model ids",
                        "models")
    return frozenset(value)


def _count(value: Any, field: str, top: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise KeySpecError(f"{field} is null or a whole number from 1 to {top}", field)
    return value

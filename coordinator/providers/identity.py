"""Provider identity: every provider id is bound to the Ed25519 key that proves it.

* Without an explicit ``provider_id`` a provider's id is derived from its
  signing key (``p-`` + 16 hex digits of its SHA-256), so it cannot be
  claimed by anyone else; ids of that form are reserved for derivation.
* An explicit ``provider_id`` is bound to a key by the operator
  (``provider_bindings``) or pinned to the first key that proves it, and then
  refused for every other key until an operator removes the pin.
* While a session is live its id, its signing key and its X25519 encryption
  key are taken: a second session is admitted (and supersedes the first) only
  if it proves the same signing key, and nobody may register an encryption
  key another live provider uses.

All checks are synchronous, so a check and the reservation it makes cannot be
interleaved with another admission.

With several instances the pins live in Redis (:class:`SharedPins`): the edge
claims an explicit id there first, and the answer — the key the id is bound
to across the fleet — replaces what this instance remembered
(:meth:`IdentityBook.adopt_pin`) before the synchronous checks run. While
that store is unreachable every explicit id waits for it.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
from collections.abc import Mapping
from typing import Final, Protocol

import attrs

from coordinator.protocol.crypto import load_verify_key
from coordinator.providers.admission import AdmissionError

_DERIVED: Final = re.compile(r"p-[0-9a-f]{16}")


def key_id(signing_key: str) -> str:
    """The id a provider gets from its signing key (base64, as registered)."""
    raw = bytes(load_verify_key(signing_key))
    return "p-" + hashlib.sha256(raw).hexdigest()[:16]


class Unpin(enum.Enum):
    REMOVED = "removed"
    NOT_PINNED = "not_pinned"
    CONFIGURED = "configured"  # bound in configuration; change the configuration instead


class PinStoreUnavailable(Exception):
    """The shared pin store did not answer; an explicit id cannot be checked now."""


@attrs.frozen
class PinClaim:
    """What a pin store answered to a claim."""

    key: str  # the key the id is bound to now
    created: bool  # this claim made the pin (undone if the provider is then refused)


class SharedPins(Protocol):
    async def claim_pin(self, provider_id: str, signing_key: str,
                        max_pins: int) -> PinClaim | None:
        """Bind ``provider_id`` to ``signing_key`` unless bound already; the bound key,
        or None when there is no room for another pin."""
        ...

    async def release_pin(self, provider_id: str, signing_key: str) -> None:
        """Undo a pin this instance's claim created, for a provider it then refused:
        removed only while it is still bound to ``signing_key``."""
        ...

    async def remove_pin(self, provider_id: str) -> bool: ...


@attrs.frozen
class Session:
    provider_id: str
    session: int
    signing_key: str
    public_key: str


@attrs.define(eq=False)
class IdentityBook:
    configured: Mapping[str, str] = attrs.field(factory=dict)
    max_pins: int = 100_000
    _pins: dict[str, str] = attrs.field(factory=dict)
    _live: dict[str, Session] = attrs.field(factory=dict)
    _encryption_keys: dict[str, str] = attrs.field(factory=dict)  # X25519 key -> provider id

    def __attrs_post_init__(self) -> None:
        for provider_id, key in self.configured.items():
            try:
                load_verify_key(key)
            except ValueError as exc:
                raise ValueError(f"provider binding for {provider_id!r}: {exc}") from None
        self.configured = {pid: _canonical(key) for pid, key in self.configured.items()}

    def admit(self, requested: str | None, session: int, signing_key: str,
              public_key: str) -> Session:
        """Bind and reserve an id for a provider that has proven ``signing_key``.

        Raises :class:`AdmissionError` with the reason to close with.
        """
        # Keys are compared as bytes: base64 has more than one spelling of a key.
        signing_key, public_key = _canonical(signing_key), _canonical(public_key)
        provider_id = requested or key_id(signing_key)
        self._check_binding(provider_id, signing_key)
        live = self._check_live(provider_id, signing_key, public_key)
        if _DERIVED.fullmatch(provider_id) is None and provider_id not in self.configured:
            self._pins.setdefault(provider_id, signing_key)
        if live is not None:
            self._encryption_keys.pop(live.public_key, None)
        admitted = Session(provider_id, session, signing_key, public_key)
        self._live[provider_id] = admitted
        self._encryption_keys[public_key] = provider_id
        return admitted

    def check_live(self, provider_id: str, signing_key: str, public_key: str) -> None:
        """Raise :class:`AdmissionError` if a live session stands in the way of this key.

        Asked before a shared pin store is: a key refused here must never become
        the pin (the rightful provider would be locked out on its next restart).
        """
        self._check_live(provider_id, _canonical(signing_key), _canonical(public_key))

    def _check_live(self, provider_id: str, signing_key: str, public_key: str) -> Session | None:
        live = self._live.get(provider_id)
        if live is not None and live.signing_key != signing_key:
            raise AdmissionError(f"provider id {provider_id} is in use by another key")
        holder = self._encryption_keys.get(public_key)
        if holder is not None and holder != provider_id:
            raise AdmissionError("public_key is registered by another provider")
        return live

    def live_pins(self) -> list[tuple[str, str]]:
        """(id, signing key) of every live session whose id is bound by pinning."""
        return [(pid, s.signing_key) for pid, s in self._live.items() if self.pinnable(pid)]

    def pinnable(self, provider_id: str | None) -> bool:
        """Whether ``provider_id`` is bound by pinning (explicit, neither derived nor configured)."""
        return bool(provider_id) and _DERIVED.fullmatch(provider_id or "") is None \
            and provider_id not in self.configured

    def adopt_pin(self, provider_id: str, signing_key: str) -> None:
        """The fleet-wide pin of ``provider_id`` (from :class:`SharedPins`) replaces this one's."""
        self._pins[provider_id] = _canonical(signing_key)

    def _check_binding(self, provider_id: str, signing_key: str) -> None:
        if _DERIVED.fullmatch(provider_id):
            if provider_id != key_id(signing_key):
                raise AdmissionError(f"provider id {provider_id} is derived from another key")
            return
        bound = self.configured.get(provider_id) or self._pins.get(provider_id)
        if bound is None:
            if len(self._pins) >= self.max_pins:
                raise AdmissionError("no room for another provider identity")
        elif bound != signing_key:
            raise AdmissionError(f"provider id {provider_id} is bound to another key")

    def leave(self, admitted: Session) -> None:
        """A session ended; its reservation goes unless a newer session holds it."""
        if self._live.get(admitted.provider_id) == admitted:
            del self._live[admitted.provider_id]
            self._encryption_keys.pop(admitted.public_key, None)

    def unpin_if(self, provider_id: str, signing_key: str) -> None:
        """Forget the pin of ``provider_id`` if it is ``signing_key``'s (a refused claim)."""
        if self._pins.get(provider_id) == _canonical(signing_key):
            del self._pins[provider_id]

    def unpin(self, provider_id: str) -> Unpin:
        if provider_id in self.configured:
            return Unpin.CONFIGURED
        if self._pins.pop(provider_id, None) is None:
            return Unpin.NOT_PINNED
        return Unpin.REMOVED

    def bound_key(self, provider_id: str) -> str | None:
        return self.configured.get(provider_id) or self._pins.get(provider_id)

    @property
    def pin_count(self) -> int:
        return len(self._pins)


def _canonical(key: str) -> str:
    return base64.b64encode(base64.b64decode(key)).decode("ascii")

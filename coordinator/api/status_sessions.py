"""Browser sessions on the status page, so the admin key never travels in a URL. Pure.

A browser signs in once with the admin key (a POST form, ``/status/login``) and gets a
cookie holding a random token, never the key nor anything derived from it: the token
is good for the status page only (the cookie's ``Path`` is ``/status``, and nothing else
accepts it), expires after ``ttl`` seconds, and signing out revokes it on the server.
The server keeps only each token's SHA-256, so its memory holds nothing a browser could
present. Sessions live in this process: a restart, or another instance, asks again.
"""

from __future__ import annotations

import hashlib
import secrets

import attrs

COOKIE = "coordinator_status"
COOKIE_PATH = "/status"
SESSION_SECONDS = 12 * 3600.0
MAX_SESSIONS = 64


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@attrs.define
class StatusSessions:
    ttl: float = SESSION_SECONDS
    capacity: int = MAX_SESSIONS  # past it, the oldest session ends: memory stays bounded
    # token digest -> when it expires; the oldest session first.
    _expires: dict[bytes, float] = attrs.field(factory=dict)

    def open(self, now: float) -> str:
        """A new session's token (for the cookie)."""
        token = secrets.token_urlsafe(32)
        self._expires[_digest(token)] = now + self.ttl
        while len(self._expires) > self.capacity:
            del self._expires[next(iter(self._expires))]
        return token

    def valid(self, token: str, now: float) -> bool:
        if not token:
            return False
        digest = _digest(token)
        expires = self._expires.get(digest)
        if expires is None:
            return False
        if now >= expires:
            del self._expires[digest]
            return False
        return True

    def close(self, token: str) -> None:
        self._expires.pop(_digest(token), None)

    def __len__(self) -> int:
        return len(self._expires)

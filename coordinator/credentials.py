"""Constant-time secret checks that accept any text a client can send. Pure.

``secrets.compare_digest`` raises ``TypeError`` for a non-ASCII ``str``, and
both API keys (HTTP headers, decoded as Latin-1) and provider tokens (JSON,
possibly with lone surrogates) can be any text. Comparing UTF-8 bytes, with
surrogates passed through, is total.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def matches_any(offered: str, accepted: Iterable[str]) -> bool:
    """True when ``offered`` is non-empty and equals one of ``accepted``.

    Every candidate is compared, so the time taken does not say which one
    matched; an empty list accepts nobody.
    """
    if not offered:
        return False
    given = _bytes(offered)
    found = False
    for candidate in accepted:
        found |= secrets.compare_digest(given, _bytes(candidate))
    return found


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None without one.

    An Authorization header of another scheme counts as a token of "" (present,
    matching nothing). Header bytes are read as Latin-1, as HTTP headers are.
    """
    for name, value in headers:
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip().decode("latin-1") if scheme.lower() == b"bearer" else ""
    return None

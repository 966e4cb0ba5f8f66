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

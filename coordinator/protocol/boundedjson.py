"""JSON parsing with limits, for text that comes from outside the process. Pure.

``json.loads`` alone is unsafe on hostile input: ``"[" * 1000`` raises
``RecursionError`` (not a ``ValueError``), ``NaN``/``Infinity`` are accepted
although they are not JSON, and a document that parses may still be too deep
for the recursive code that later walks or re-encodes it. Every parse of
consumer bodies, provider frames and decrypted provider chunks goes through
:func:`loads`, which turns all of that into one :class:`JsonLimitError`.
"""

from __future__ import annotations

import json
from typing import Any, Final, NoReturn

# Integers with more digits than this are refused, or (``clamp_ints``) become
# HUGE_INT: big enough to fail every range check, and never the 4,300-digit
# ValueError that would hide which request a provider frame belongs to.
MAX_INT_DIGITS: Final = 40
HUGE_INT: Final = 10**MAX_INT_DIGITS


class JsonLimitError(ValueError):
    """Text that is not JSON, or is JSON beyond a configured limit."""


def _reject_constant(name: str) -> NoReturn:
    raise JsonLimitError(f"{name} is not a JSON number")


def _clamped_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        return -HUGE_INT if text.startswith("-") else HUGE_INT
    return int(text)


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise JsonLimitError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def loads(text: str | bytes, *, max_depth: int | None = None, clamp_ints: bool = False) -> Any:
    """Parse ``text``; raise :class:`JsonLimitError` for anything off or nested past ``max_depth``."""
    try:
        value = json.loads(text, parse_constant=_reject_constant,
                           parse_int=_clamped_int if clamp_ints else _bounded_int)
    except RecursionError:
        raise JsonLimitError("JSON nested too deeply") from None
    except JsonLimitError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonLimitError(str(exc)) from None
    if max_depth is not None and depth_exceeds(value, max_depth):
        raise JsonLimitError(f"JSON nested deeper than {max_depth} levels")
    return value


def depth_exceeds(value: Any, limit: int) -> bool:
    """True when ``value`` has containers nested more than ``limit`` deep. Iterative."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False

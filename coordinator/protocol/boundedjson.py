"""JSON parsing with limits, for text that comes from outside the process. Pure.

``json.loads`` alone is unsafe on hostile input: ``"[" * 1000`` raises
``RecursionError`` (not a ``ValueError``), ``NaN``/``Infinity`` are accepted
although they are not JSON, and a document that parses may still be too deep
for the recursive code that later walks or re-encodes it. Every parse of
outside text goes through this module, which turns all of that into one
:class:`JsonLimitError`:

* :func:`loads` (the standard library, exact) for consumer bodies, which are
  forwarded and must keep every number as written;
* :func:`loads_fast` (orjson, three times faster) for provider frames and
  chunks, parsed once per streamed event. orjson refuses ``NaN``, lone
  surrogates and nesting past 1,024 levels itself, and reads integers past 64
  bits as floats — which every integer field's type check then refuses.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final, NoReturn

import orjson

# Integers with more digits than this are refused (and never reach int()'s
# 4,300-digit limit, a ValueError of its own).
MAX_INT_DIGITS: Final = 40


class JsonLimitError(ValueError):
    """Text that is not JSON, or is JSON beyond a configured limit."""


def _reject_constant(name: str) -> NoReturn:
    raise JsonLimitError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise JsonLimitError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    # 1e400 parses to infinity, which no JSON can carry on: it would reach the provider
    # as the bare word Infinity, and a strict parser there fails the request.
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError(f"the number {text[:40]} is out of range")
    return value


def loads(text: str | bytes, *, max_depth: int | None = None) -> Any:
    """Parse ``text``; raise :class:`JsonLimitError` for anything off or nested past ``max_depth``."""
    try:
        value = json.loads(text, parse_constant=_reject_constant,
                           parse_int=_bounded_int, parse_float=_finite_float)
    except RecursionError:
        raise JsonLimitError("JSON nested too deeply") from None
    except JsonLimitError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonLimitError(str(exc)) from None
    if max_depth is not None and depth_exceeds(value, max_depth):
        raise JsonLimitError(f"JSON nested deeper than {max_depth} levels")
    return value


def loads_fast(text: str | bytes, *, max_depth: int | None = None) -> Any:
    """Like :func:`loads`, with orjson: for the provider's side of the hot path."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise JsonLimitError(str(exc)) from None
    if max_depth is not None and _may_exceed(text, max_depth) and depth_exceeds(value, max_depth):
        raise JsonLimitError(f"JSON nested deeper than {max_depth} levels")
    return value


def _may_exceed(text: str | bytes, limit: int) -> bool:
    """False when ``text`` has too few brackets to nest past ``limit`` (a C-speed count)."""
    if isinstance(text, str):
        return text.count("{") + text.count("[") > limit
    return text.count(b"{") + text.count(b"[") > limit


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

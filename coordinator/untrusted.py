"""Text from outside, made safe to print: escaped and bounded.

Anything a consumer, provider, peer instance or engine sends may hold a
newline (which would forge a whole log line), terminal escapes, a prompt, or
megabytes. Whatever of it reaches a log or an error message goes through
:func:`printable` first.
"""

from __future__ import annotations

LIMIT = 200


def printable(value: object, limit: int = LIMIT) -> str:
    """``value`` as one line of ASCII, at most ``limit`` characters (and "...").

    Control characters, backslashes and non-ASCII are escaped (``\\n``, ``\\x1b``,
    ``\\u00e9``), so a newline cannot start a forged log line. Containers are never
    rendered: a hostile one may be nested past the recursion limit.
    """
    if isinstance(value, str):
        text = value[: limit * 2]  # escaping only lengthens; no need to escape megabytes
    elif isinstance(value, bytes | bytearray):
        text = bytes(value[: limit * 2]).decode("utf-8", "replace")
    elif value is None or isinstance(value, bool | int | float):
        text = repr(value)
    else:
        text = f"<{type(value).__name__}>"
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."

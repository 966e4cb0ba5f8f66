"""Text from outside, made safe to print: escaped and bounded.

Anything a consumer, provider, peer instance or engine sends may hold a
newline (which would forge a whole log line), terminal escapes, a prompt, or
megabytes. Whatever of it reaches a log or an error message goes through
:func:`printable` first. The log policy is in docs/operations.md (logs).

:class:`LineSafeFormatter` is the second line of defence, for what no call
site controls: a traceback whose exception quotes outside input, a library's
own log records.
"""

from __future__ import annotations

import logging
import re
from typing import TextIO

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


# Every control character but the newline (which is indented, below) and the tab, and the
# line breaks str.splitlines and some log viewers honour besides.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def line_safe_handler(stream: TextIO, fmt: str) -> logging.Handler:
    """A handler writing to ``stream`` through a :class:`LineSafeFormatter` (the CLIs')."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineSafeFormatter(fmt))
    return handler


class LineSafeFormatter(logging.Formatter):
    """A record starts at the margin; every further line of it (a traceback) is indented.

    So a newline in an exception's message — one quoting outside input on a path
    nobody foresaw — cannot start a line that reads as a record of its own; carriage
    returns and terminal escapes are escaped.
    """

    def format(self, record: logging.LogRecord) -> str:
        text = _CONTROLS.sub(_escape, super().format(record))
        return text.replace("\n", "\n    ")

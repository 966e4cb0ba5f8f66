"""The load run's progress bar, and log records that do not cut through it.

The bar is one terminal line redrawn in place (``\\r``). A log record written
while it is drawn would land after the bar's text on the same line; the
handler here wipes the bar, writes the record on a line of its own, and draws
the bar again below it. Without a terminal there is no bar, and records are
plain lines.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import TextIO

import attrs

from coordinator.untrusted import LineSafeFormatter

WIPE = "\r\x1b[K"  # back to the line's start, erase to its end


@attrs.define(eq=False)
class ProgressBar:
    stream: TextIO
    _line: str = ""  # what is drawn now; "" when nothing is
    # Records may come from other threads (the pin file's writer, say).
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def draw(self, text: str) -> None:
        with self._lock:
            self._line = text
            self.stream.write(WIPE + text)
            self.stream.flush()

    def finish(self) -> None:
        """End the bar's line (it stays on screen); later writes start below it."""
        with self._lock:
            if self._line:
                self.stream.write("\n")
                self.stream.flush()
            self._line = ""

    @contextlib.contextmanager
    def lifted(self) -> Iterator[None]:
        """Write on a clean line inside this block; the bar comes back after it."""
        with self._lock:
            if self._line:
                self.stream.write(WIPE)
            yield
            if self._line:
                self.stream.write(self._line)
            self.stream.flush()


def bar_for(stream: TextIO) -> ProgressBar | None:
    """A bar on ``stream`` if it is a terminal (``\\r`` redraws are noise in a file)."""
    isatty = getattr(stream, "isatty", None)
    return ProgressBar(stream) if isatty is not None and isatty() else None


class BarAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes each record above the progress bar, if one is drawn."""

    def __init__(self, stream: TextIO, bar: ProgressBar | None) -> None:
        super().__init__(stream)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is None:
            super().emit(record)
            return
        with self.bar.lifted():
            super().emit(record)


@contextlib.contextmanager
def logging_above(bar: ProgressBar | None, stream: TextIO,
                  level: int = logging.WARNING) -> Iterator[None]:
    """Log records at ``level`` and above to ``stream`` for the block, above the bar."""
    root = logging.getLogger()
    level_before = root.level
    handler = BarAwareHandler(stream, bar)
    handler.setFormatter(LineSafeFormatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level_before)

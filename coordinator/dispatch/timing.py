"""Where a request's time went, for the ``X-Timing`` header and the metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio


@attrs.define(eq=False)
class Timing:
    """Seconds spent in each stage of one request, from its start."""

    started: float
    parse: float = 0.0
    route: float = 0.0  # waiting for the registry's answers (queue included)
    queue: float = 0.0
    encrypt: float = 0.0
    dispatch: float = 0.0  # from sending the winner's request to its first content
    first_content: float = 0.0  # from the request's start to the commit

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Add the time the block takes to ``stage``."""
        started = trio.current_time()
        try:
            yield
        finally:
            setattr(self, stage, getattr(self, stage) + trio.current_time() - started)

    def committed(self, now: float, sent_at: float) -> None:
        self.dispatch = now - sent_at
        self.first_content = now - self.started

    def header(self) -> str:
        """``X-Timing``: each stage in whole microseconds."""
        fields = ("parse", "route", "queue", "encrypt", "dispatch", "first_content")
        return ",".join(f"{f}={round(getattr(self, f) * 1e6)}" for f in fields)

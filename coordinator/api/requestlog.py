"""The request log: one JSON line per request, on the ``coordinator.requests`` logger at INFO.

Never any prompt or output content: ids, the route, the model name (validated and bounded
before it is recorded), which providers were tried, how it ended, the status and the
latency. A stream's outcome, and whether a whole answer succeeded (its end left), are
known only when the response is over, so the request's exchange writes their line then
(exchange.py); other requests', their handler.
"""

from __future__ import annotations

import enum
import json
import logging
from typing import Any

import attrs
import trio

from coordinator.dispatch.timing import Timing

log = logging.getLogger("coordinator.requests")


class Result(enum.Enum):
    SUCCESS = "success"
    ERROR = "error"  # answered with an error status
    INBAND_ERROR = "inband_error"  # a stream that had begun ended with an error event
    CLIENT_GONE = "client_gone"  # the consumer left before the answer was whole
    CONSUMER_STALLED = "consumer_stalled"  # an HTTP/2 consumer gave no window: cut
    CANCELLED = "cancelled"  # the request was cancelled before it had an answer


@attrs.define
class RequestRecord:
    request_id: str
    route: str
    timing: Timing
    key: str | None = None  # the key's name, never its secret
    model: str | None = None
    attempts: int | None = None
    providers_tried: list[str] | None = None
    provider: str | None = None
    instance: str | None = None
    result: Result = Result.CANCELLED
    status: int | None = None
    error: str | None = None
    streaming: bool = False  # its line waits for the response to be over

    def failed(self, status: int, error: str) -> None:
        self.result, self.status, self.error = Result.ERROR, status, error

    def write(self) -> None:
        """The log line (nothing is encoded when INFO is off)."""
        if not log.isEnabledFor(logging.INFO):
            return
        line: dict[str, Any] = {"request_id": self.request_id, "route": self.route}
        for name in ("key", "model", "attempts", "providers_tried", "provider", "instance"):
            if (value := getattr(self, name)) is not None:
                line[name] = value
        line["result"] = self.result.value
        for name in ("status", "error"):
            if (value := getattr(self, name)) is not None:
                line[name] = value
        line["latency_ms"] = round((trio.current_time() - self.timing.started) * 1000, 3)
        log.info(json.dumps(line))

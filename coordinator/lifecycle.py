"""Graceful shutdown: stop taking work, let streams finish, then end the rest.

On SIGTERM or SIGINT the coordinator *drains*:

1. new consumer requests get 503 with ``Retry-After`` (and ``Connection:
   close``); new providers are refused; idle keep-alive connections close;
2. requests in flight carry on — dispatches still waiting for a provider and
   committed streams alike — for up to ``drain_timeout`` seconds;
3. at that deadline, whatever is still running ends: a stream with one in-band
   error and its family's terminator, a request not yet committed with 503;
4. provider sessions are closed with 1001 (going away) and the process exits 0.

The deadline is a moving deadline, as everywhere else: every wait that must
end when the drain does runs in a cancel scope registered here, whose
deadline moves from infinity to the drain deadline when the drain begins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio


@attrs.define(eq=False)
class Drain:
    timeout: float = 30.0
    deadline: float = math.inf
    began: trio.Event = attrs.field(factory=trio.Event)
    in_flight: int = 0
    _idle: trio.Event = attrs.field(factory=trio.Event)
    _scopes: set[trio.CancelScope] = attrs.field(factory=set)

    @property
    def draining(self) -> bool:
        return self.began.is_set()

    def begin(self, now: float) -> None:
        """Start draining (idempotent): every registered wait now ends by the deadline."""
        if self.draining:
            return
        self.deadline = now + self.timeout
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, self.deadline)
        self.began.set()
        self._check_idle()

    def cut_off(self, now: float) -> bool:
        """True once the drain deadline has passed: whatever still runs must end."""
        return now >= self.deadline

    @contextmanager
    def bounded(self, deadline: float = math.inf) -> Iterator[trio.CancelScope]:
        """A cancel scope ending at ``deadline`` or at the drain deadline, whichever is first."""
        scope = trio.CancelScope(deadline=min(deadline, self.deadline))
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count one request in flight for as long as the block runs."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._check_idle()

    async def wait_done(self) -> None:
        """Return when every request has ended, or a moment after the drain deadline."""
        with trio.move_on_at(self.deadline + 1.0):
            await self._idle.wait()

    def _check_idle(self) -> None:
        if self.draining and self.in_flight == 0:
            self._idle.set()

"""The seam between one instance's registry and whatever it shares with others.

:class:`Solo` is the embedded default and shares nothing; ``RedisShared``
(:mod:`.shared`) carries the same events through Redis. Kept apart from
:mod:`.shared` so a single instance never imports coredis (about a third of
the coordinator's import time).
"""

from __future__ import annotations

from typing import Protocol

import attrs

from coordinator.registry.mirror import SharedEvent


class Shared(Protocol):
    def offer(self, event: SharedEvent) -> None: ...

    @property
    def status(self) -> str: ...


@attrs.define
class Solo:
    """The embedded default: one instance, nothing shared."""

    status: str = "solo"

    def offer(self, event: SharedEvent) -> None:
        pass

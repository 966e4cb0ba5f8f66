"""Where keys and the ledger are kept: the seam between the accounts service and a database.

Two stores answer it: SQLite, one instance's file (:mod:`.sqlite`, the embedded
default), and Redis, shared by every instance (:mod:`.redis`). The service keeps the
keys in memory and asks the store for a :meth:`Store.version` every half second:
a key added, changed or revoked anywhere (another instance, ``coordinator keys`` in
another process) is seen within that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs

from .keys import KeyRecord
from .ledger import Entry


class StoreError(Exception):
    """A store that cannot be opened (at start-up: one line and exit 2)."""


class StoreUnavailable(Exception):
    """The store failed while serving; the message says why (a 503 for new requests)."""


class KeyExists(Exception):
    """A key of that name exists already."""


@attrs.frozen
class UsageRow:
    name: str  # a key's name ("(unnamed)" for COORDINATOR_API_KEYS) or a provider id
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens}


@attrs.frozen
class UsageReport:
    since: float
    until: float
    by_key: tuple[UsageRow, ...]
    by_provider: tuple[UsageRow, ...]

    def as_json(self) -> dict[str, object]:
        return {"since": self.since, "until": self.until,
                "by_key": [row.as_json() for row in self.by_key],
                "by_provider": [row.as_json() for row in self.by_provider]}


UNNAMED = "(unnamed)"


class Store(Protocol):
    async def version(self) -> int:
        """A number that changes whenever a key does (cheap: asked every half second)."""
        ...

    async def keys(self) -> list[KeyRecord]: ...

    async def add(self, record: KeyRecord) -> None:
        """Keep a new key; :class:`KeyExists` if the name is taken."""
        ...

    async def update(self, record: KeyRecord) -> None:
        """Replace the key of ``record``'s name (limits, models, state)."""
        ...

    async def record(self, entries: Sequence[Entry]) -> None:
        """Keep closed reservations (a request id is kept once, whatever the retries)."""
        ...

    async def charged_since(self, key: str, since: float) -> int:
        """Tokens charged to ``key`` from ``since`` (wall-clock seconds) on: a budget's use."""
        ...

    async def usage(self, since: float, until: float) -> UsageReport: ...

    async def aclose(self) -> None: ...

"""Which store a configuration names: Redis with ``redis_url``, else the SQLite file."""

from __future__ import annotations

from coordinator.config import Config

from .sqlite import SqliteStore
from .store import Store


async def open_store(config: Config) -> Store:
    """The configured store, opened; :class:`~.store.StoreError` when it cannot be."""
    return await SqliteStore.open(config.keys_db or ":memory:",
                                  retention=config.ledger_retention)

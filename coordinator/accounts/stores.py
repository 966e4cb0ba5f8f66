"""Which store a configuration names: Redis with ``redis_url``, else the SQLite file."""

from __future__ import annotations

import trio

from coordinator.config import Config

from .service import Limiter
from .sqlite import SqliteStore
from .store import Store


async def open_store(nursery: trio.Nursery, config: Config) -> tuple[Store, Limiter | None]:
    """The configured store, opened, and the limiter shared with other instances (None:
    limits are kept in this process); :class:`~.store.StoreError` when it cannot be.
    Tasks of ``nursery`` hold a Redis client until it is cancelled."""
    if not config.redis_url:
        store = await SqliteStore.open(config.keys_db or ":memory:",
                                       retention=config.ledger_retention)
        return store, None
    from .redis import RedisStore  # coredis only when configured
    from .redislimits import RedisLimits

    redis_store = await RedisStore.open(nursery, config)
    limiter = RedisLimits(redis_store.link)
    await nursery.start(limiter.run)
    return redis_store, limiter

"""Scale-out: several coordinator instances acting as one, on Redis (docs/scale-out.md).

* :mod:`.entries` — what an instance publishes about its providers. Pure.
* :mod:`.peer` — links between instances: a request for a provider connected
  elsewhere travels there sealed, and its encrypted chunks come back.
* :mod:`.shared` — the shared state on Redis: the directory of providers,
  the shared breaker, capacity wake-ups; and what happens when Redis is away.

Without ``redis_url`` none of this runs: the embedded default is one process.
"""

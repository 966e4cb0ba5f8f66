"""The agent's life: find the engine, join the coordinator, leave while the engine is down.

    engine up? ──no──▶ wait (backoff) ─┐
        │yes                           │
        ▼                              │
    read the catalog (catalog.py)      │
        ▼                              │
    serve through the coordinator  ────┘ when the engine goes down: leave the coordinator
    (provider_link.connect: backoff,     (its socket closes, so it routes nothing here),
     jitter, next URL when one is gone)  in-flight requests already failed over (503)

While serving, the engine is asked how it is every ``health_interval`` seconds, and at
once when a request finds it unreachable; two failed probes in a row and the agent
leaves. It comes back by itself: when the engine answers again, the catalog is read
afresh (its capacity or template may have changed) and the agent registers again,
proving the same keys.
"""

from __future__ import annotations

import logging
import random

import attrs
import trio

from coordinator.untrusted import printable
from provider_link.connect import keep_connected
from provider_link.keys import ProviderKeys

from .catalog import Catalog, Wanted, discover
from .engine import Engine, EngineDown, EngineRefused
from .provider import EngineProvider

log = logging.getLogger(__name__)

MAX_ENGINE_BACKOFF = 10.0


@attrs.frozen
class AgentConfig:
    engine_url: str
    coordinators: tuple[str, ...]
    token: str
    keys: ProviderKeys
    provider_id: str | None = None
    wanted: Wanted = attrs.field(factory=Wanted)
    events_per_frame: int = 16
    health_interval: float = 2.0


async def run_agent(config: AgentConfig, *,
                    task_status: trio.TaskStatus[EngineProvider] = trio.TASK_STATUS_IGNORED
                    ) -> None:
    """Serve until cancelled; ``task_status`` gets the first provider once the engine is read."""
    # httpx says every request it makes at INFO: one line per consumer request is noise.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    engine = Engine(config.engine_url)
    started = False
    try:
        while True:
            catalog = await _wait_for_engine(engine, config.wanted)
            provider = EngineProvider(engine=engine, identity=config.keys,
                                      auth_token=config.token, catalog=catalog,
                                      provider_id=config.provider_id,
                                      events_per_frame=config.events_per_frame)
            log.info("engine %s: serving %s (%d at a time, %s), as %s", config.engine_url,
                     ", ".join(m.id for m in catalog.models), catalog.max_concurrency,
                     catalog.backend, provider.name)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_connected, provider, config.coordinators)
                if not started:
                    started = True
                    task_status.started(provider)
                await _until_engine_down(engine, provider, config.health_interval)
                nursery.cancel_scope.cancel(reason="the engine is down")
            log.warning("engine %s is down: left the coordinator until it is back",
                        config.engine_url)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await engine.aclose()


async def _wait_for_engine(engine: Engine, wanted: Wanted) -> Catalog:
    """The engine's catalog, once it answers (it may be loading, or not started yet)."""
    failures = 0
    said = ""
    jitter = random.Random()
    while True:
        try:
            return await discover(engine, wanted)
        except (EngineDown, EngineRefused) as exc:
            failures += 1
            why = printable(str(exc), 200)
            if why != said:  # once per reason, not once per try
                log.warning("engine %s not ready: %s; retrying", engine.base_url, why)
                said = why
        await trio.sleep(min(MAX_ENGINE_BACKOFF, 0.5 * 2 ** failures) * jitter.uniform(0.5, 1))


async def _until_engine_down(engine: Engine, provider: EngineProvider, interval: float) -> None:
    """Return once the engine has failed two probes in a row."""
    failed = 0
    while failed < 2:
        with trio.move_on_after(interval):
            await provider.engine_down.wait()  # a request found it unreachable: ask now
        provider.engine_down = trio.Event()
        failed = failed + 1 if not await _answers(engine) else 0


async def _answers(engine: Engine) -> bool:
    try:
        with trio.fail_after(5.0):
            await engine.get("/v1/models")
    except (EngineDown, EngineRefused, trio.TooSlowError):
        return False
    return True

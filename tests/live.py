"""A coordinator and simulated fleet on real loopback sockets, for external clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from coordinator.app import Running, serve
from provider_sim.fleet import demo_fleet, run_fleet
from provider_sim.provider import SimProvider

from .harness import TOKEN, make_config


@asynccontextmanager
async def live_coordinator(
    providers: int = 2, **config: Any
) -> AsyncIterator[tuple[Running, list[SimProvider]]]:
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            serve, make_config(http_port=0, provider_port=0, **config))
        fleet = demo_fleet(providers, token=TOKEN)
        nursery.start_soon(run_fleet, fleet, running.provider_url)
        await running.registry.wait_for(lambda state: len(state.providers) >= providers)
        try:
            yield running, fleet
        finally:
            nursery.cancel_scope.cancel()

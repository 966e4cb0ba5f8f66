"""Wiring: the registry actor, the provider edge and the HTTP API.

``start_coordinator`` assembles the parts without binding any socket (the
deterministic test harness drives them over in-memory streams); ``serve``
adds the two listeners.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio
import trio_websocket

from coordinator.api.routes import Api, RequestCleanup, create_app
from coordinator.config import Config
from coordinator.dispatch.attempt import Dispatcher
from coordinator.metrics import Metrics
from coordinator.providers.edge import ProviderEdge
from coordinator.registry.actor import RegistryClient, serve_registry

log = logging.getLogger(__name__)


@attrs.frozen
class Coordinator:
    """The live parts of one coordinator."""

    config: Config
    registry: RegistryClient
    metrics: Metrics
    dispatcher: Dispatcher
    edge: ProviderEdge
    asgi: Any  # the ASGI application, cleanup wrapper included


@attrs.frozen
class Running:
    """A serving coordinator: its parts and where it listens."""

    coordinator: Coordinator
    http_url: str
    provider_url: str

    @property
    def registry(self) -> RegistryClient:
        return self.coordinator.registry


async def start_coordinator(nursery: trio.Nursery, config: Config) -> Coordinator:
    """Start the registry actor in ``nursery`` and build the edge and the API around it."""
    metrics = Metrics()
    registry: RegistryClient = await nursery.start(serve_registry, config, metrics)
    dispatcher = Dispatcher(config, registry, metrics)
    app = create_app(Api(config, registry, dispatcher, metrics))
    return Coordinator(config, registry, metrics, dispatcher,
                       ProviderEdge(config, registry, metrics), RequestCleanup(app))


async def serve(
    config: Config, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the coordinator until cancelled. Port 0 binds a free port; see ``Running``."""
    async with trio.open_nursery() as nursery:
        coordinator = await start_coordinator(nursery, config)
        ws_server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                coordinator.edge.handle,
                config.provider_host,
                config.provider_port,
                ssl_context=None,
                # Frames a bit over our own limit are rejected one by one in
                # the edge; only absurd ones end the connection here.
                max_message_size=config.max_frame_bytes * 2,
            )
        )
        hconfig = hypercorn.config.Config()
        hconfig.bind = [f"{config.http_host}:{config.http_port}"]
        hconfig.accesslog = None
        hconfig.graceful_timeout = 5
        binds = await nursery.start(
            partial(hypercorn.trio.serve, coordinator.asgi, hconfig, mode="asgi")
        )
        http_url = binds[0].replace("0.0.0.0", "127.0.0.1")
        provider_url = f"ws://{config.provider_host}:{ws_server.port}/"
        log.info("coordinator listening: http %s, providers %s", http_url, provider_url)
        task_status.started(Running(coordinator, http_url, provider_url))

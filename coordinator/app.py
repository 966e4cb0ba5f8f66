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
import trio
import trio_websocket

from coordinator.api.routes import Api, EdgeGuard, create_app
from coordinator.api.server import ConnectionTable, serve_http
from coordinator.config import Config
from coordinator.dispatch.attempt import Dispatcher
from coordinator.metrics import Metrics
from coordinator.providers.edge import ProviderEdge
from coordinator.providers.identity import IdentityBook
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
    asgi: Any  # the ASGI application, edge guard included
    connections: ConnectionTable


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
    identities = IdentityBook(config.provider_bindings, config.max_identity_pins)
    app = create_app(Api(config, registry, dispatcher, metrics, identities))
    connections = ConnectionTable(config.keep_alive_timeout, config.request_head_timeout)
    return Coordinator(config, registry, metrics, dispatcher,
                       ProviderEdge(config, registry, metrics, identities),
                       EdgeGuard(app, connections), connections)


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
                # Until a provider is admitted only a small frame is accepted;
                # the edge raises the limit after admission.
                max_message_size=config.register_frame_bytes,
                connect_timeout=config.register_timeout,
            )
        )
        http_url = await nursery.start(
            serve_http, coordinator.asgi, config, coordinator.connections)
        provider_url = f"ws://{config.provider_host}:{ws_server.port}/"
        log.info("coordinator listening: http %s, providers %s", http_url, provider_url)
        task_status.started(Running(coordinator, http_url, provider_url))

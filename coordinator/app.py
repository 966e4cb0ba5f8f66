"""Wiring: the registry actor, the provider edge and the HTTP API in one nursery."""

from __future__ import annotations

import logging
from functools import partial

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
class Running:
    """What a started coordinator reports: where it listens and its live parts."""

    http_url: str
    provider_url: str
    registry: RegistryClient
    metrics: Metrics
    dispatcher: Dispatcher


async def serve(
    config: Config, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the coordinator until cancelled. Port 0 binds a free port; see ``Running``."""
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        registry: RegistryClient = await nursery.start(serve_registry, config, metrics)
        edge = ProviderEdge(config, registry, metrics)
        ws_server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                edge.handle,
                config.provider_host,
                config.provider_port,
                ssl_context=None,
                # Frames a bit over our own limit are rejected one by one in
                # the edge; only absurd ones end the connection here.
                max_message_size=config.max_frame_bytes * 2,
            )
        )
        dispatcher = Dispatcher(config, registry, metrics)
        app = create_app(Api(config, registry, dispatcher, metrics))
        hconfig = hypercorn.config.Config()
        hconfig.bind = [f"{config.http_host}:{config.http_port}"]
        hconfig.accesslog = None
        hconfig.graceful_timeout = 5
        binds = await nursery.start(partial(hypercorn.trio.serve, RequestCleanup(app), hconfig, mode="asgi"))
        http_url = binds[0].replace("0.0.0.0", "127.0.0.1")
        provider_url = f"ws://{config.provider_host}:{ws_server.port}/"
        log.info("coordinator listening: http %s, providers %s", http_url, provider_url)
        task_status.started(Running(http_url, provider_url, registry, metrics, dispatcher))

"""Wiring: the registry actor, the provider edge and the HTTP API.

``start_coordinator`` assembles the parts without binding any socket (the
deterministic test harness drives them over in-memory streams); ``serve``
adds the two listeners.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import attrs
import trio
import trio_websocket

from coordinator.accounts.keys import hash_secret
from coordinator.accounts.service import Accounts
from coordinator.accounts.stores import open_store
from coordinator.api.exchange import Edge
from coordinator.api.routes import Api, create_app
from coordinator.api.transport import Connections, ListenError, bind_http, serve_http
from coordinator.cluster.peer import PeerServer
from coordinator.cluster.seam import Shared, Solo
from coordinator.config import Config
from coordinator.descriptors import check_limit
from coordinator.dispatch.attempt import Dispatcher
from coordinator.lifecycle import Drain
from coordinator.metrics import Metrics
from coordinator.providers.connection import Directory
from coordinator.providers.edge import ProviderEdge
from coordinator.providers.handshakes import capped
from coordinator.providers.identity import IdentityBook, SharedPins
from coordinator.providers.pinfile import PinFile
from coordinator.registry.actor import RegistryClient, serve_registry
from coordinator.wsio import whole_writes

log = logging.getLogger(__name__)

GOING_AWAY = 1001
# A provider streaming for many requests at once sends many small frames; one
# read of up to this much takes them all in one wake-up (trio-websocket reads
# 4 KiB at a time by default). Only what arrived is held: nothing is reserved.
PROVIDER_READ_BYTES = 64 * 1024


@attrs.frozen
class Coordinator:
    """The live parts of one coordinator."""

    config: Config
    registry: RegistryClient
    metrics: Metrics
    dispatcher: Dispatcher
    edge: ProviderEdge
    http_edge: Edge  # what hypercorn runs: the API behind the HTTP edge's rules
    connections: Connections
    drain: Drain
    shared: Shared  # Solo, or the Redis seam (cluster/shared.py)
    accounts: Accounts | None  # named keys, their limits, the usage ledger (None: off)

    @property
    def asgi(self) -> Any:
        """The API as a plain ASGI application (in-process clients: tests, the load run)."""
        return self.http_edge.asgi

    async def shutdown(self) -> None:
        """Drain (docs/operations.md, shutdown): returns once every request has ended.

        In order: no new connections (the kernel refuses them: never accepted,
        never lost); requests in flight run on for up to ``drain_timeout`` while
        requests arriving on open connections get 503 and ``Connection: close``;
        then connections close once idle for ``close_timeout`` (a client reusing
        one at once still gets its 503), each within ``request_head_timeout``;
        then providers go.
        """
        log.info("draining: no new work; in-flight requests have %gs", self.drain.timeout)
        self.drain.begin(trio.current_time())
        self.connections.stop_accepting()
        await self.drain.wait_done()
        self.connections.close_idle(after=self.config.close_timeout)
        with trio.move_on_after(self.config.request_head_timeout):
            await self.connections.wait_all_closed()
        await self.edge.close_all(GOING_AWAY, "coordinator shutting down")


@attrs.frozen
class Running:
    """A serving coordinator: its parts, where it listens, and how to stop it."""

    coordinator: Coordinator
    http_url: str
    provider_url: str
    _scope: trio.CancelScope

    @property
    def registry(self) -> RegistryClient:
        return self.coordinator.registry

    async def shutdown(self) -> None:
        """Drain, close provider sessions with 1001, then stop serving."""
        await self.coordinator.shutdown()
        self._scope.cancel(reason="shut down")

    def stop(self) -> None:
        """Stop at once, without draining."""
        self._scope.cancel(reason="stopped at once")


async def start_coordinator(nursery: trio.Nursery, config: Config, peer_url: str = "",
                            *, pins: SharedPins | None = None) -> Coordinator:
    """Start the registry actor in ``nursery`` and build the edge and the API around it.

    With ``redis_url`` it also starts the shared state (docs/scale-out.md),
    advertising ``peer_url`` for other instances' links; otherwise, with
    ``identity_pins_file``, identity pins are read from and kept in that file.
    ``pins`` is a pin store given instead (the tests' outage and race scripts).
    """
    metrics = Metrics()
    drain = Drain(config.drain_timeout)
    registry: RegistryClient = await nursery.start(serve_registry, config, metrics)
    directory = Directory()
    identities = IdentityBook(config.provider_bindings, config.max_identity_pins)
    shared: Shared = Solo()
    if pins is None and config.redis_url:
        from coordinator.cluster.shared import RedisShared  # coredis only when configured

        shared = pins = RedisShared(config, registry, directory, metrics, peer_url,
                                    identities.live_pins)
        await registry.connect_outbox(shared.offer)
        await nursery.start(shared.run)
    elif pins is None and config.identity_pins_file:
        pins = await PinFile.open(config.identity_pins_file)
    dispatcher = Dispatcher(config=config, registry=registry, metrics=metrics,
                            directory=directory, drain=drain)
    accounts = await _open_accounts(nursery, config, metrics) if config.accounts else None
    app = create_app(Api(config=config, registry=registry, dispatcher=dispatcher,
                         metrics=metrics, identities=identities, drain=drain, shared=shared,
                         pins=pins, accounts=accounts))
    connections = Connections(config.keep_alive_timeout, config.request_head_timeout,
                              config.max_body_bytes)
    return Coordinator(config, registry, metrics, dispatcher,
                       ProviderEdge(config=config, registry=registry, metrics=metrics,
                                    identities=identities, drain=drain, directory=directory,
                                    pins=pins),
                       Edge(app, drain), connections, drain, shared, accounts)


async def _open_accounts(nursery: trio.Nursery, config: Config, metrics: Metrics) -> Accounts:
    """Named keys, limits and the ledger (docs/accounts.md), their store opened and read;
    :class:`~coordinator.accounts.store.StoreError` when it cannot be."""
    store, limiter = await open_store(nursery, config)
    accounts = Accounts(store, frozenset(hash_secret(k) for k in config.api_keys),
                        limiter=limiter, metrics=metrics, metrics_per_key=config.metrics_per_key)
    await accounts.load()
    await nursery.start(accounts.run)
    return accounts


async def serve(
    config: Config, *, task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the coordinator until cancelled. Port 0 binds a free port; see ``Running``.

    Both listeners are opened first: one that cannot be raises :class:`ListenError`.
    """
    if config.redis_url and not config.instance_id:
        config = attrs.evolve(config, instance_id=f"{socket.gethostname()}-{os.getpid()}")
    check_limit(config)  # descriptors for max_connections and the rest, or a warning
    http_socket = bind_http(config)
    try:
        provider_listeners = await _listen(config.provider_host, config.provider_port,
                                           "providers")
        peer_listeners = await _listen(config.cluster_host, config.cluster_port,
                                       "cluster peers") if config.redis_url else []
    except ListenError:
        http_socket.close()
        raise
    peer_url = ""
    if peer_listeners:
        host = config.advertise_host or config.cluster_host
        port = config.advertise_port or peer_listeners[0].socket.getsockname()[1]
        peer_url = f"ws://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/"
    async with trio.open_nursery() as nursery:
        coordinator = await start_coordinator(nursery, config, peer_url)
        if peer_listeners:
            peers = PeerServer(config, coordinator.registry, coordinator.dispatcher.directory)
            await nursery.start(trio_websocket.WebSocketServer(
                peers.handle,
                whole_writes(capped(peer_listeners, config.max_pending_providers,
                                    what="cluster peers"), config.write_timeout),
                max_message_size=config.register_frame_bytes,
                connect_timeout=config.register_timeout).run)
            log.info("instance %s: cluster peers on %s", config.instance_id, peer_url)
        ws_server = trio_websocket.WebSocketServer(
            coordinator.edge.handle,
            # Every frame written whole, or the socket closed (coordinator/wsio.py).
            whole_writes(capped(provider_listeners, config.max_pending_providers,
                                config.provider_tokens), config.write_timeout),
            # Until a provider is admitted only a small frame is accepted;
            # the edge raises the limit after admission.
            max_message_size=config.register_frame_bytes,
            receive_buffer_size=PROVIDER_READ_BYTES,
            connect_timeout=config.register_timeout,
        )
        await nursery.start(ws_server.run)
        http_url = await nursery.start(
            serve_http, coordinator.http_edge, config, coordinator.connections, http_socket)
        provider_port = provider_listeners[0].socket.getsockname()[1]
        provider_url = f"ws://{config.provider_host}:{provider_port}/"
        log.info("coordinator listening: http %s, providers %s", http_url, provider_url)
        task_status.started(Running(coordinator, http_url, provider_url, nursery.cancel_scope))


async def _listen(host: str, port: int, what: str) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(f"cannot listen for {what} on {host}:{port}: "
                          f"{exc.strerror or exc}") from None

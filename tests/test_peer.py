"""Two instances in one process, linked over memory streams, in virtual time.

A provider connected to another instance is one more ``ProviderConnection``
whose transport is the link to that instance (``cluster/peer.py``'s ``PeerRoute``)
instead of a socket here. tests/test_cluster.py runs the same path between
processes through Redis; these check the seam itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trio_websocket

from coordinator.cluster.entries import entry_of, record_of
from coordinator.cluster.peer import PeerLink, PeerServer, remote_connection
from coordinator.providers.connection import ProviderConnection
from coordinator.registry.table import Lease
from coordinator.wsio import WholeWriteStream
from provider_sim.provider import SimProvider

from .harness import Harness, open_harness

TOKEN = "cluster-secret"


@attrs.define
class Pair:
    here: Harness  # instance "a": routes to "far" over the link
    there: Harness  # instance "b": "far" is connected to it
    far: SimProvider
    remote: ProviderConnection  # "far" in a's directory
    peers: PeerServer  # b's end of the link


@asynccontextmanager
async def linked_instances() -> AsyncIterator[Pair]:
    """Instance a with a link to instance b, and b's provider "far" mirrored in a's table
    as ``RedisShared`` mirrors it (cluster/shared.py)."""
    async with open_harness(cluster_token=TOKEN) as there, \
            open_harness(cluster_token=TOKEN) as here:
        far = await there.add_provider("far")
        peers = PeerServer(there.coordinator.config, there.registry,
                           there.coordinator.dispatcher.directory)

        async def serve(stream: trio.abc.Stream) -> None:
            async with trio.open_nursery() as nursery:
                request = await trio_websocket.wrap_server_stream(
                    nursery, WholeWriteStream(stream),  # type: ignore[arg-type]
                    max_message_size=there.coordinator.config.register_frame_bytes)
                await peers.handle(request)
                nursery.cancel_scope.cancel()

        async def dial(nursery: trio.Nursery, url: str, *, max_message_size: int,
                       write_timeout: float) -> trio_websocket.WebSocketConnection:
            client, server = trio.testing.memory_stream_pair()
            there.nursery.start_soon(serve, server)
            return await trio_websocket.wrap_client_stream(
                nursery, WholeWriteStream(client, write_timeout),  # type: ignore[arg-type]
                "b", "/", max_message_size=max_message_size)

        link = PeerLink("b", "ws://b.invalid/", "a", TOKEN, here.coordinator.config, dial=dial)
        await here.nursery.start(link.run)
        record = record_of(entry_of(there.state.providers["far"]), "b")

        async def lease_of(request_id: str) -> Lease | None:
            return await here.registry.lease_of("far", request_id)

        remote = remote_connection(record, link, here.coordinator.config, lease_of)
        here.coordinator.dispatcher.directory.add(remote)
        await here.registry.mirror("b", [record])
        await here.wait_registered("far")
        yield Pair(here, there, far, remote, peers)


def _errors(caplog: pytest.LogCaptureFixture) -> list[Any]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_provider_on_another_instance_is_a_connection_whose_transport_is_the_link(
        autojump_clock, caplog):
    async with linked_instances() as pair:
        near = await pair.here.add_provider("near")
        assert pair.remote.instance == "b"
        [local] = [c for c in pair.here.coordinator.dispatcher.directory.live()
                   if c.provider_id == "near"]
        assert local.instance == ""
        for stream in (True, False):
            reply = await pair.here.chat(stream=stream, provider_ids=["far"])
            assert reply.status == 200 and reply.headers["x-provider-id"] == "far"
            assert reply.headers["x-provider-instance"] == "b"  # routes asks the connection
        assert len(pair.far.received) == 2 and pair.peers.relayed > 0
        reply = await pair.here.chat(provider_ids=["near"])
        assert reply.status == 200 and reply.headers["x-provider-id"] == "near"
        assert "x-provider-instance" not in reply.headers
        assert len(near.received) == 1
        await pair.here.assert_quiescent()
        await pair.there.assert_quiescent()
    assert not _errors(caplog)


async def test_a_shutdown_closes_only_the_sockets_of_providers_connected_here(
        autojump_clock, caplog):
    """The directory holds the providers of other instances too: a shutdown closes the
    sockets this instance admitted and sends nothing to a provider it reaches by a link."""
    async with linked_instances() as pair:
        near = await pair.here.add_provider("near")
        await pair.here.coordinator.shutdown()
        assert near.closed_with == 1001
        assert pair.far.closed_with is None
        assert (await pair.there.chat()).status == 200  # far still serves its own instance
    assert not _errors(caplog)

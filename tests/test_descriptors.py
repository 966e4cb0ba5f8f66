"""File descriptors (coordinator/descriptors.py): the start-up limit and accept failures.

With the descriptor limit below what the configuration can hold open, trio's accept
loop logged ``accept returned EMFILE`` with a traceback every 0.1 s (2,222 lines in
25 s), and nothing said at start-up that the limit was short.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import trio

from coordinator.api.transport import ConnectionListener, Connections
from coordinator.descriptors import LOG_INTERVAL, RESERVE, UNLIMITED_TARGET, Plan, needed, plan
from coordinator.providers.handshakes import capped

from .harness import make_config

resource = pytest.importorskip("resource")

INFINITY = -1


@pytest.mark.parametrize(("soft", "hard", "need", "expected"), [
    (1024, 1_048_576, 1256, Plan(1_048_576, False)),  # raised, all the way: providers come on top
    (4096, 1_048_576, 1256, Plan(None, False)),  # enough: the operator's choice stands
    (1024, 1200, 1256, Plan(1200, True)),  # raised, still short: say so
    (1024, 1024, 1256, Plan(None, True)),  # cannot be raised: say so
    (1024, INFINITY, 1256, Plan(UNLIMITED_TARGET, False)),
    (INFINITY, INFINITY, 1256, Plan(None, False)),
])
def test_a_short_soft_limit_is_raised_as_far_as_the_hard_one(soft, hard, need, expected):
    assert plan(soft, hard, need, INFINITY) == expected


def test_what_a_configuration_needs_counts_every_socket_it_allows():
    assert needed(make_config(max_connections=1000, max_pending_providers=64)) == \
        1000 + 3 * 64 + RESERVE
    clustered = make_config(max_connections=10, max_pending_providers=5,
                            redis_url="redis://x", cluster_token="c")
    assert needed(clustered) == 10 + 5 * 5 + RESERVE


class _Exhausted(trio.abc.Listener[Any]):
    """Out of descriptors until ``until``; then one connection, then nothing more."""

    def __init__(self, until: float) -> None:
        self.until = until
        self.accepted = 0
        self.peers: list[trio.socket.SocketType] = []

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if trio.current_time() < self.until:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        if self.accepted:
            await trio.sleep_forever()
        self.accepted += 1
        ours, theirs = trio.socket.socketpair()
        self.peers.append(theirs)
        return trio.SocketStream(ours)

    async def aclose(self) -> None:
        for peer in self.peers:
            peer.close()


def _http(inner: Any) -> Any:
    return ConnectionListener(inner, Connections(5.0), 10, 5.0)


def _providers(inner: Any) -> Any:
    return capped([inner], 4)[0]


@pytest.mark.parametrize("wrap", [_http, _providers])
async def test_running_out_of_descriptors_is_waited_out_and_logged_rarely(
        autojump_clock, caplog, wrap):
    caplog.set_level(logging.INFO)
    inner = _Exhausted(until=25.0)
    handled = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        handled.set()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [wrap(inner)])
        await handled.wait()  # once descriptors are back, the waiting connection is served
        assert 25.0 <= trio.current_time() < 26.0
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.name == "trio.serve_listeners"]
    said = [r for r in caplog.records if r.name == "coordinator.descriptors"]
    assert [r.levelname for r in said] == ["ERROR", "ERROR", "ERROR", "WARNING"], \
        [r.getMessage() for r in said]
    first, *still, back = (r.getMessage() for r in said)
    assert "accept failed with EMFILE" in first and "descriptor limit" in first
    assert all("accept still failing (EMFILE)" in line for line in still)
    assert "accepting again after" in back
    assert not any(r.exc_info for r in said)  # no tracebacks
    assert len(still) == int(25.0 // LOG_INTERVAL)


def _coordinator(soft: int, hard: int) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    environ = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    environ.update({"COORDINATOR_API_KEYS": "k", "COORDINATOR_PROVIDER_TOKENS": "t"})
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "serve", "--port", "0", "--provider-port", "0"],
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=limit)
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("coordinator: HTTP on"):
            host, port = line.split()[3].rstrip(",").split("//")[1].rsplit(":", 1)
            return process, (host, int(port))
    raise AssertionError(process.communicate(timeout=30))


@pytest.mark.slow  # a coordinator process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_short_descriptor_limit_is_raised_or_named_once():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip("the hard descriptor limit here is below 4096")
    process, _ = _coordinator(64, 4096)
    try:
        with open(f"/proc/{process.pid}/limits") as limits:
            assert [line.split()[3] for line in limits if line.startswith("Max open files")] \
                == ["4096"]
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert "file descriptors: limit raised from 64 to 4096" in err, err

    process, address = _coordinator(64, 64)  # it cannot be raised: connections wait
    crowd = []
    try:
        for _ in range(80):
            crowd.append(socket.create_connection(address))
        time.sleep(1.0)  # a scripted second out of descriptors: trio logged ten times
    finally:
        for sock in crowd:
            sock.close()
        time.sleep(0.5)  # the listener gets its descriptors back
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert err.count("file descriptors: the limit is 64, below the 1256") == 1, err
    assert err.count("accept failed with EMFILE") == 1, err
    assert "accept still failing" not in err and "trio.serve_listeners" not in err
    assert "Traceback" not in err

"""An in-process coordinator and fleet: no sockets, so virtual time works.

Providers talk to the coordinator's real edge over trio-websocket wrapped
around in-memory stream pairs; consumers call the real ASGI application
(cleanup wrapper included) through a minimal ASGI client. Everything runs in
one Trio run, so ``autojump_clock`` turns a 600 s budget into milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing
import trio_websocket

from coordinator.app import Coordinator, start_coordinator
from coordinator.config import Config
from coordinator.protocol import ModelInfo
from coordinator.providers.identity import SharedPins
from coordinator.wsio import WholeWriteStream
from provider_sim.behaviours import HEALTHY, Behaviour
from provider_sim.provider import SimProvider

API_KEY = "test-key"
ADMIN_KEY = "admin-key"
TOKEN = "provider-token"
MODEL = "m1"
VISION_MODEL = "v1"


def make_config(**overrides: Any) -> Config:
    base: dict[str, Any] = dict(
        api_keys=(API_KEY,), admin_keys=(ADMIN_KEY,), provider_tokens=(TOKEN,), seed=1,
        challenge_interval=10_000.0, heartbeat_timeout=10_000.0,
    )
    base.update(overrides)
    return Config(**base)


def model(model_id: str = MODEL, **kw: Any) -> ModelInfo:
    return ModelInfo(model_id, **{"size_bytes": 1024, **kw})


@attrs.define
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes
    started_at: float | None  # virtual time the response head was sent

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def sse(self) -> list[tuple[str | None, str]]:
        """(event name, data) per server-sent event."""
        events = []
        for block in self.body.decode().split("\n\n"):
            if not block.strip():
                continue
            name, data = None, []
            for line in block.split("\n"):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
            events.append((name, "\n".join(data)))
        return events

    @property
    def sse_json(self) -> list[Any]:
        return [json.loads(d) for _, d in self.sse if d != "[DONE]"]

    @property
    def text(self) -> str:
        """The streamed chat text (content deltas concatenated)."""
        out = []
        for event in self.sse_json:
            for choice in event.get("choices") or ():
                out.append((choice.get("delta") or {}).get("content") or "")
        return "".join(out)


@attrs.define(eq=False)
class Harness:
    coordinator: Coordinator
    nursery: trio.Nursery
    providers: dict[str, SimProvider] = attrs.field(factory=dict)
    _connections: dict[str, trio.CancelScope] = attrs.field(factory=dict)
    _scopes: dict[int, trio.CancelScope] = attrs.field(factory=dict)  # id(provider) -> scope
    _everyone: list[SimProvider] = attrs.field(factory=list)  # incl. replaced sessions
    _ends: list[trio.abc.AsyncResource] = attrs.field(factory=list)  # providers' stream ends

    @property
    def registry(self) -> Any:
        return self.coordinator.registry

    @property
    def state(self) -> Any:
        return self.coordinator.registry._state_for_tests

    async def add_provider(
        self,
        provider_id: str,
        *models: ModelInfo,
        version: str = "0.7.0",
        behaviour: Behaviour = HEALTHY,
        script: list[Behaviour] | None = None,
        wait: bool = True,
        stream_pair: Any = trio.testing.memory_stream_pair,
        **kw: Any,
    ) -> SimProvider:
        provider = SimProvider(provider_id, models or (model(),), token=kw.pop("token", TOKEN),
                               version=version, behaviour=behaviour, script=script or [], **kw)
        await self.connect(provider, wait=wait, stream_pair=stream_pair)
        return provider

    async def connect(self, provider: Any, *, wait: bool = True,
                      stream_pair: Any = trio.testing.memory_stream_pair) -> None:
        """Connect ``provider`` (a SimProvider, or any ``provider_link`` client with a
        ``provider_id``) over ``stream_pair()`` (client end, coordinator end)."""
        self.providers[provider.provider_id] = provider
        if isinstance(provider, SimProvider):
            self._everyone.append(provider)
        scope = trio.CancelScope()
        self._connections[provider.provider_id] = self._scopes[id(provider)] = scope
        await self.nursery.start(self._run_provider, provider, scope, stream_pair)
        if wait:
            await self.wait_registered(provider.provider_id)

    async def _run_provider(
        self, provider: SimProvider, scope: trio.CancelScope, stream_pair: Any, *,
        task_status: Any
    ) -> None:
        client_stream, server_stream = stream_pair()
        self._ends.append(client_stream)
        with scope:
            async with trio.open_nursery() as nursery:
                # The server side reads the client's handshake, so it runs alongside.
                nursery.start_soon(self._serve_edge, nursery, server_stream)
                ws = await trio_websocket.wrap_client_stream(
                    nursery, WholeWriteStream(client_stream), "coordinator", "/",  # type: ignore[arg-type]
                    max_message_size=provider.receive_limit())
                task_status.started()
                await provider.serve(ws)
                nursery.cancel_scope.cancel()

    async def _serve_edge(self, nursery: trio.Nursery, stream: Any) -> None:
        # As serve() does: small frames only until the edge admits the provider.
        request = await trio_websocket.wrap_server_stream(
            nursery, WholeWriteStream(stream, self.coordinator.config.write_timeout),  # type: ignore[arg-type]
            max_message_size=self.coordinator.config.register_frame_bytes)
        await self.coordinator.edge.handle(request)

    async def wait_registered(self, provider_id: str) -> None:
        await self.registry.wait_for(lambda state: provider_id in state.providers)

    async def wait_gone(self, provider_id: str) -> None:
        await self.registry.wait_for(lambda state: provider_id not in state.providers)

    async def until(self, predicate: Any) -> None:
        """Wait until ``predicate()`` holds, re-checking whenever the registry or a provider changes."""
        while not predicate():
            events = [self.registry.changed, *(p.activity for p in self._everyone)]
            async with trio.open_nursery() as nursery:
                for event in events:
                    nursery.start_soon(_cancel_when, event, nursery.cancel_scope)

    async def until_cluster(self, predicate: Any) -> None:
        """Wait until ``predicate(status)`` holds for the shared state ("ok", "degraded").

        It follows another process (Redis), which no event here signals: polled, so only
        for real-time tests of the Redis seam.
        """
        await poll(lambda: predicate(self.coordinator.shared.status))

    async def until_cluster_ok(self) -> None:
        await self.until_cluster(lambda status: status == "ok")

    def kill(self, provider: str | SimProvider) -> None:
        """Drop a provider's connection abruptly (by id: the latest connected under it)."""
        if isinstance(provider, SimProvider):
            self._scopes[id(provider)].cancel()
        else:
            self._connections[provider].cancel()

    async def request(self, path: str, body: Any = None, *, raw: bytes | None = None,
                      headers: dict[str, str] | None = None, method: str = "POST",
                      disconnect: trio.Event | None = None) -> HttpResult:
        hdrs = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
        hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
        payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        return await asgi_call(self.coordinator.asgi, method, path, hdrs, payload,
                               disconnect=disconnect)

    async def chat(self, stream: bool = True, model_id: str = MODEL, **extra: Any) -> HttpResult:
        body = {"model": model_id, "stream": stream,
                "messages": [{"role": "user", "content": "hello"}], **extra}
        return await self.request("/v1/chat/completions", body)

    async def hang_up(self) -> None:
        """Close every provider's end of its stream, as a process exiting closes its sockets.

        Then the edge's goodbye to each provider (a Close that waits up to
        ``close_timeout`` for the answer) ends at once: a test in real time would
        otherwise wait that long for a provider already cancelled.
        """
        for end in self._ends:
            await trio.aclose_forcefully(end)

    async def assert_quiescent(self) -> None:
        """No lease, queued request or pending provider stream is left behind."""
        snapshot = await self.registry.snapshot()
        assert snapshot.leases == 0, snapshot
        assert snapshot.queue_depth == 0, snapshot
        for connection in self.coordinator.edge.directory.live():
            assert connection.pending == 0, connection.provider_id


async def poll(predicate: Any, interval: float = 0.05) -> None:
    """Return once ``predicate()`` holds, checking every ``interval`` seconds.

    Only for conditions another process decides (Redis, a subprocess), which no event
    here can signal; everything in process is awaited on its own event.
    """
    while True:
        if predicate():
            return
        await trio.sleep(interval)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def asgi_call(app: Any, method: str, path: str, headers: dict[str, str], body: bytes,
                    *, disconnect: trio.Event | None = None) -> HttpResult:
    """Drive one HTTP request through an ASGI app; ``disconnect`` hangs up mid-way."""
    path, _, query = path.partition("?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "", "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000), "extensions": {},
        "headers": [(k.encode(), v.encode()) for k, v in
                    {**headers, "content-length": str(len(body))}.items()],
    }
    result = HttpResult(0, {}, b"", None)
    hangup = disconnect if disconnect is not None else trio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await hangup.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        # A send is whole or not at all: one cancelled (the consumer gone) delivered nothing.
        await trio.lowlevel.checkpoint()
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
            result.started_at = trio.current_time()
        elif message["type"] == "http.response.body":
            result.body += message.get("body", b"")

    async with trio.open_nursery() as nursery:
        async def run() -> None:
            await app(scope, receive, send)
            nursery.cancel_scope.cancel()

        nursery.start_soon(run)
    return result


@asynccontextmanager
async def open_harness(pins: SharedPins | None = None, **config: Any) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        coordinator = await start_coordinator(nursery, make_config(**config), pins=pins)
        harness = Harness(coordinator, nursery)
        try:
            yield harness
        finally:
            await harness.hang_up()
            nursery.cancel_scope.cancel()

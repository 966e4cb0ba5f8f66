"""The stack-fair floor: a minimal relay in the coordinator's own stack, and its upstream.

The bare floor (``floor_app.py``) has no upstream; the coordinator relays every chunk
from a provider's WebSocket. This is what that relaying costs at the least in the same
stack — quart-trio + hypercorn towards the consumer, trio-websocket towards the
upstream — with no logic: no auth, no parsing, no encryption, no routing choice, no
failover. The coordinator's cost beyond it is its own.

- ``upstream``: a trio-websocket server standing in for a provider. Each request it
  reads (``"<id>\\n<body>"``) is answered with the floor's 16 SSE chunks, as text
  frames ``"<id> <last>\\n<chunks>"``, ``--events-per-frame`` chunks to a frame (1: one
  event per frame, as a provider forwarding each event as it comes; 16: all at once, as
  a provider batching what it has, docs/protocol.md).
- ``relay``: a quart-trio SSE endpoint that sends each request's raw body up one
  WebSocket, tagged with a request id, and writes each frame's chunks to its consumer
  as they come.

One WebSocket, multiplexed by request id, carries every request, as the coordinator's
provider sockets do: a connection per request would add a TCP connect and an HTTP
upgrade to every request — a cost the coordinator does not pay, so the floor would be
flattering. A reader task hands each frame to its request's bounded channel, the least
a multiplexed link needs.

``python -m benchmarks.relay_app upstream --port 9200 --events-per-frame 1``
``python -m benchmarks.relay_app relay --port 9100 --upstream ws://127.0.0.1:9200/``
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator

import hypercorn.config
import hypercorn.trio
import trio
import trio_websocket
from quart import Response, request
from quart_trio import QuartTrio

from benchmarks.floor_app import CHUNKS

app = QuartTrio(__name__)
app.config.update(RESPONSE_TIMEOUT=None)


class Upstream:
    """The relay's one link to the upstream and the requests waiting on it."""

    def __init__(self) -> None:
        self.ws: trio_websocket.WebSocketConnection | None = None
        self.waiting: dict[str, trio.MemorySendChannel[str]] = {}
        self.ids = itertools.count()

    async def read(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            message = await ws.get_message()
            assert isinstance(message, str)
            head, _, chunks = message.partition("\n")
            request_id, _, last = head.partition(" ")
            send = self.waiting.get(request_id)
            if send is None:  # its consumer left
                continue
            send.send_nowait(chunks)  # at most len(CHUNKS) frames: never full
            if last == "1":
                del self.waiting[request_id]
                send.close()


upstream = Upstream()


@app.post("/v1/chat/completions")
async def chat() -> Response:
    body = await request.get_data(as_text=True)
    assert upstream.ws is not None
    request_id = str(next(upstream.ids))
    send, receive = trio.open_memory_channel[str](len(CHUNKS))
    upstream.waiting[request_id] = send
    await upstream.ws.send_message(f"{request_id}\n{body}")

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for chunks in receive:
                yield chunks.encode()
        finally:
            upstream.waiting.pop(request_id, None)

    return Response(stream(), 200, content_type="text/event-stream")


async def relay(port: int, url: str) -> None:
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        upstream.ws = await trio_websocket.connect_websocket_url(nursery, url)
        nursery.start_soon(upstream.read, upstream.ws)
        await hypercorn.trio.serve(app, config)


async def serve_upstream(port: int, per_frame: int) -> None:
    frames = [(chunks, last) for chunks, last in (
        ("".join(CHUNKS[i:i + per_frame]), "1" if i + per_frame >= len(CHUNKS) else "0")
        for i in range(0, len(CHUNKS), per_frame))]

    async def answer(ws: trio_websocket.WebSocketConnection, request_id: str) -> None:
        for chunks, last in frames:
            await ws.send_message(f"{request_id} {last}\n{chunks}")

    async def handle(ws_request: trio_websocket.WebSocketRequest) -> None:
        ws = await ws_request.accept()
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    message = await ws.get_message()
                except trio_websocket.ConnectionClosed:
                    break
                assert isinstance(message, str)
                nursery.start_soon(answer, ws, message.partition("\n")[0])
            nursery.cancel_scope.cancel()

    await trio_websocket.serve_websocket(handle, "127.0.0.1", port, ssl_context=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("upstream")
    up.add_argument("--port", type=int, default=9200)
    up.add_argument("--events-per-frame", type=int, default=1)
    down = commands.add_parser("relay")
    down.add_argument("--port", type=int, default=9100)
    down.add_argument("--upstream", default="ws://127.0.0.1:9200/")
    args = parser.parse_args()
    if args.command == "upstream":
        trio.run(serve_upstream, args.port, max(1, args.events_per_frame))
    else:
        trio.run(relay, args.port, args.upstream)


if __name__ == "__main__":
    main()

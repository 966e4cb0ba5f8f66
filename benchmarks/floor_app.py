"""The stack floor: a bare quart-trio + hypercorn endpoint streaming 16 SSE chunks.

No upstream, no auth, no parsing beyond reading the body: what the web stack
alone costs. ``python -m benchmarks.floor_app --port 9100``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator

import hypercorn.config
import hypercorn.trio
import trio
from quart import Response, request
from quart_trio import QuartTrio

app = QuartTrio(__name__)
app.config.update(RESPONSE_TIMEOUT=None)
CHUNKS = [
    "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}]}) + "\n\n"
    for i in range(15)
] + ["data: [DONE]\n\n"]


@app.post("/v1/chat/completions")
async def chat() -> Response:
    await request.get_data()

    async def body() -> AsyncIterator[bytes]:
        for chunk in CHUNKS:
            yield chunk.encode()

    return Response(body(), 200, content_type="text/event-stream")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    trio.run(hypercorn.trio.serve, app, config)


if __name__ == "__main__":
    main()

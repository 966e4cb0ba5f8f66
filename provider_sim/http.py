"""A simulated provider served directly as an OpenAI-compatible HTTP API.

Same fault scripts, same event formats, same web stack (quart-trio on
hypercorn) as the coordinator, so a benchmark of "client -> this" against
"client -> coordinator -> WebSocket provider" isolates what the coordinator
adds. No encryption and no routing: it is one provider.
"""

from __future__ import annotations

import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio
from quart import Response, request
from quart_trio import QuartTrio

from coordinator.api.assemble import assemble
from coordinator.api.sse import SseWriter
from coordinator.dispatch.items import End, InBandError
from coordinator.protocol import Usage
from coordinator.protocol.endpoints import Endpoint

from .behaviours import HEALTHY, Behaviour
from .script import Action, Chunk, Complete, Crash, Error, play


def create_http_app(behaviour: Behaviour = HEALTHY, tokens: int = 16,
                    provider_id: str = "sim-http", seed: int = 0) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config.update(RESPONSE_TIMEOUT=None)
    rng = random.Random(seed)
    scripted = attrs.evolve(behaviour, tokens=tokens)

    def route(endpoint: Endpoint) -> Any:
        async def handler() -> Response:
            try:
                body = json.loads(await request.get_data(as_text=False))
                assert isinstance(body, dict)
            except (ValueError, AssertionError):
                return _error(400, "request body must be a JSON object")
            body["endpoint"] = endpoint.value
            rid = uuid.uuid4().hex[:16]
            actions = play(body, scripted, provider_id=provider_id, request_id=rid, rng=rng)
            first = await anext(actions, None)
            if isinstance(first, Error):
                await actions.aclose()
                return _error(first.status, first.message)
            if body.get("stream"):
                response = Response(_stream(endpoint, first, actions), 200,
                                    content_type="text/event-stream")
                response.timeout = None
                return response
            chunks, usage = await _collect(first, actions)
            if usage is None:
                return _error(502, "provider failed mid-answer")
            return Response(json.dumps(assemble(endpoint, chunks, usage, rid)), 200,
                            content_type="application/json")

        handler.__name__ = f"sim_{endpoint.name.lower()}"
        return handler

    for endpoint in Endpoint:
        app.add_url_rule(endpoint.value, view_func=route(endpoint), methods=["POST"])
    return app


def _error(status: int, message: str) -> Response:
    body = {"error": {"message": message, "type": "provider_error", "code": None}}
    return Response(json.dumps(body), status, content_type="application/json")


async def _collect(first: Action | None,
                   actions: AsyncIterator[Action]) -> tuple[list[dict[str, Any]], Usage | None]:
    chunks: list[dict[str, Any]] = []
    async with contextlib.aclosing(actions):  # type: ignore[type-var]
        action = first
        while action is not None:
            match action:
                case Chunk(text):
                    chunks.append(json.loads(text))
                case Complete(p, c):
                    return chunks, Usage(p, c)
                case Error() | Crash():
                    return chunks, None
            action = await anext(actions, None)
    return chunks, None


async def _stream(endpoint: Endpoint, first: Action | None,
                  actions: AsyncIterator[Action]) -> AsyncIterator[bytes]:
    writer = SseWriter(endpoint)
    async with contextlib.aclosing(actions):  # type: ignore[type-var]
        action = first
        while action is not None:
            match action:
                case Chunk(text):
                    yield writer.frame(json.loads(text))
                case Complete(p, c):
                    yield writer.frame(End(Usage(p, c)))
                    return
                case Error(status, message):
                    yield writer.frame(InBandError("provider_error", message, status))
                    return
                case Crash():
                    return
            action = await anext(actions, None)


async def serve_http(host: str, port: int, behaviour: Behaviour = HEALTHY, tokens: int = 16, *,
                     task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; reports the bound URL."""
    config = hypercorn.config.Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    app = create_http_app(behaviour, tokens)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config, mode="asgi"))
        task_status.started(binds[0])

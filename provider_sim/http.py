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

from coordinator.protocol.endpoints import Endpoint

from .behaviours import HEALTHY, Behaviour
from .formats import final_body
from .script import Action, Chunk, Complete, Crash, Error, play

# Families that name each SSE event after its "type" (and end with their own last event).
_TYPED_EVENTS = (Endpoint.RESPONSES, Endpoint.MESSAGES)


def create_http_app(behaviour: Behaviour = HEALTHY, tokens: int = 16,
                    provider_id: str = "sim-http", seed: int = 0,
                    models: tuple[str, ...] = ("sim-chat-small",)) -> QuartTrio:
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
            completed = await _complete(first, actions)
            if completed is None:
                return _error(502, "provider failed mid-answer")
            return Response(json.dumps(final_body(endpoint, body, completed, rid)), 200,
                            content_type="application/json")

        handler.__name__ = f"sim_{endpoint.name.lower()}"
        return handler

    for endpoint in Endpoint:
        app.add_url_rule(endpoint.value, view_func=route(endpoint), methods=["POST"])

    async def list_models() -> Response:
        data = [{"id": m, "object": "model", "owned_by": "provider-sim"} for m in models]
        return Response(json.dumps({"object": "list", "data": data}), 200,
                        content_type="application/json")

    app.add_url_rule("/v1/models", view_func=list_models, methods=["GET"])
    return app


def _error(status: int, message: str) -> Response:
    body = {"error": {"message": message, "type": "provider_error", "code": None}}
    return Response(json.dumps(body), status, content_type="application/json")


async def _complete(first: Action | None, actions: AsyncIterator[Action]) -> Complete | None:
    """Play the script to its end: its completion, or None when it fails."""
    async with contextlib.aclosing(actions):  # type: ignore[type-var]
        action = first
        while action is not None:
            match action:
                case Complete():
                    return action
                case Error() | Crash():
                    return None
            action = await anext(actions, None)
    return None


def _event(endpoint: Endpoint, payload: str) -> bytes:
    if endpoint not in _TYPED_EVENTS:
        return f"data: {payload}\n\n".encode()
    name = json.loads(payload).get("type", "message")
    return f"event: {name}\ndata: {payload}\n\n".encode()


def _stream_error(endpoint: Endpoint, message: str) -> bytes:
    if endpoint in _TYPED_EVENTS:
        return _event(endpoint, json.dumps({"type": "error", "error": {
            "type": "api_error", "message": message}}))
    return _event(endpoint, json.dumps({"error": {"message": message,
                                                  "type": "provider_error"}}))


async def _stream(endpoint: Endpoint, first: Action | None,
                  actions: AsyncIterator[Action]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(actions):  # type: ignore[type-var]
        action = first
        while action is not None:
            match action:
                case Chunk(text):
                    yield _event(endpoint, text)
                case Complete():
                    if endpoint not in _TYPED_EVENTS:
                        yield b"data: [DONE]\n\n"
                    return
                case Error(_, message):
                    yield _stream_error(endpoint, message)
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

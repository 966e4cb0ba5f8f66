"""The local inference engine, over its OpenAI-compatible HTTP API (httpx, on Trio).

Every engine the agent fronts — llama.cpp's ``llama-server``, vLLM, SGLang, Ollama,
``mlx_lm.server`` — serves ``/v1/models`` and streamed ``/v1/chat/completions``; some
serve more (:func:`probe_endpoints`). What an engine answers is bounded before it is
used: JSON documents by :data:`MAX_DOCUMENT`, error bodies by :data:`MAX_ERROR`,
streamed events by the splitter's limit (:mod:`.sse`).

Failures become two exceptions: :class:`EngineDown` (nothing answers: refused,
reset, timed out) and :class:`EngineRefused` (the engine answered with an error
status, which :func:`status_for` maps to what the coordinator should make of it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import orjson

from coordinator.protocol.endpoints import Endpoint
from coordinator.untrusted import printable

MAX_DOCUMENT = 8 * 1024 * 1024
MAX_ERROR = 64 * 1024
CONNECT_TIMEOUT = 5.0
QUERY_TIMEOUT = 10.0
# An engine's 4xx that say the request itself is wrong: the coordinator answers the
# consumer with them and tries nobody else (docs/protocol.md, inference_error statuses).
_DETERMINISTIC = frozenset({400, 404, 413, 422})


class EngineDown(Exception):
    """The engine did not answer: refused, reset or timed out."""


class EngineRefused(Exception):
    """The engine answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def status_for(engine_status: int) -> int:
    """The ``inference_error`` status for an engine's error status.

    A 4xx about the request stays (deterministic: no failover); the engine's own
    capacity (429, 503) stays capacity; anything else is the engine's sickness (502):
    another provider is tried and this one earns a strike.
    """
    if engine_status in _DETERMINISTIC or engine_status in (429, 503):
        return engine_status
    return 502


def _message_of(body: bytes, status: int) -> str:
    """The human part of an engine's error body (OpenAI, llama.cpp, vLLM, Ollama shapes)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return printable(text or f"engine status {status}", 1000)
    error = data.get("error", data) if isinstance(data, dict) else data
    message = error.get("message") if isinstance(error, dict) else error
    return printable(message if isinstance(message, str) else f"engine status {status}", 1000)


@attrs.define(eq=False)
class Engine:
    """One engine, at ``base_url`` (``http://127.0.0.1:8080``)."""

    base_url: str
    # Another transport than TCP (tests: an engine app in process).
    transport: httpx.AsyncBaseTransport | None = None
    _client: httpx.AsyncClient = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._client = httpx.AsyncClient(
            transport=self.transport,
            base_url=self.base_url.rstrip("/"),
            # Streams have no read timeout: the coordinator's budgets end a silent one
            # (its cancel closes the stream, and the engine stops generating).
            timeout=httpx.Timeout(QUERY_TIMEOUT, connect=CONNECT_TIMEOUT, read=None),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=64),
            trust_env=False)  # a loopback engine: no proxies from the environment

    async def aclose(self) -> None:
        await self._client.aclose()

    async def get(self, path: str) -> Any:
        """A JSON document, or None when the engine does not serve ``path`` (404)."""
        try:
            async with self._client.stream("GET", path, timeout=QUERY_TIMEOUT) as response:
                body = await _read_bounded(response, MAX_DOCUMENT)
        except httpx.TransportError as exc:
            raise EngineDown(printable(str(exc) or type(exc).__name__)) from None
        if response.status_code in (404, 405):
            return None
        if response.status_code != 200:
            raise EngineRefused(response.status_code, _message_of(body, response.status_code))
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise EngineRefused(502, f"{path} did not answer JSON") from None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """Status and (bounded) body of a POST that is not streamed."""
        try:
            async with self._client.stream("POST", path, content=orjson.dumps(body),
                                           headers={"content-type": "application/json"},
                                           timeout=QUERY_TIMEOUT) as response:
                return response.status_code, await _read_bounded(response, MAX_ERROR)
        except httpx.TransportError as exc:
            raise EngineDown(printable(str(exc) or type(exc).__name__)) from None

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[bytes]]:
        """POST ``body`` and yield its response's bytes as they come.

        Raises :class:`EngineRefused` for an error status (before any byte is yielded)
        and :class:`EngineDown` when the engine cannot be reached or drops the stream.
        Leaving the block closes the stream: the engine sees its client go and stops.
        """
        try:
            async with self._client.stream("POST", path, content=orjson.dumps(body),
                                           headers={"content-type": "application/json",
                                                    "accept": "text/event-stream"}) as response:
                if response.status_code != 200:
                    error = await _read_bounded(response, MAX_ERROR)
                    raise EngineRefused(response.status_code,
                                        _message_of(error, response.status_code))
                yield _raw(response)
        except httpx.TransportError as exc:
            raise EngineDown(printable(str(exc) or type(exc).__name__)) from None


async def _raw(response: httpx.Response) -> AsyncIterator[bytes]:
    async for data in response.aiter_raw():
        yield data


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for data in response.aiter_raw():
        body += data
        if len(body) > limit:
            raise EngineRefused(502, f"the engine's answer exceeds {limit} bytes")
    return bytes(body)


async def probe_endpoints(engine: Engine) -> tuple[str, ...]:
    """The inference endpoints the engine serves: each is asked with an empty body, and
    one the engine has no route for answers 404 or 405 (anything else: it is there)."""
    served = []
    for endpoint in Endpoint:
        status, _ = await engine.post(endpoint.value, {})
        if status not in (404, 405):
            served.append(endpoint.value)
    return tuple(served)

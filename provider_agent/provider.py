"""The agent's provider: the shared provider client in front of an inference engine.

For each request the coordinator sends, :class:`EngineProvider` decrypts the body
(``provider_link.client``), normalizes its tool schemas (what the coordinator sends is
normalized already; a provider never relies on it), asks the engine for a stream at
the same endpoint, and relays the engine's events as they come — every event already
received when a read returns goes in one frame, up to ``events_per_frame``. It asks
for the token usage (``stream_options.include_usage``) and reports it in
``inference_complete``; a consumer who did not ask for the usage chunk does not get it.

What the engine says becomes what the coordinator needs (docs/provider-agent.md):
an error status before the stream maps through ``engine.status_for``; an engine that
cannot be reached is 503 (fail over, no strike) and tells the agent the engine is
down; a stream the engine breaks or ends early is 502. A ``cancel`` cancels the
request's task, which closes the engine's stream: the engine stops generating.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import trio

from coordinator.protocol import Register
from coordinator.protocol.endpoints import Endpoint
from coordinator.toolschema import normalize_tool_schemas
from coordinator.untrusted import printable
from provider_link.actions import Action, Chunk, Complete, Error
from provider_link.client import ProviderClient
from provider_link.keys import ProviderKeys

from .catalog import Catalog, hardware
from .engine import Engine, EngineDown, EngineRefused, status_for
from .sse import EventSplitter, EventTooLarge, event_data
from .usage import UsageCount

log = logging.getLogger(__name__)

# The provider protocol's capability level this agent implements (docs/protocol.md):
# it normalizes tool schemas itself (>= 0.6.3) and self-checks chat templates.
VERSION = "0.8.0"
MAX_EVENT_BYTES = 4 * 1024 * 1024
MAX_REQUEST_BYTES = 16 * 1024 * 1024
_USAGE_STREAMS = (Endpoint.CHAT.value, Endpoint.COMPLETIONS.value)
# The event that ends a Responses or Anthropic stream: after it, the answer is whole.
_LAST_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete",
                          "message_stop"})


@attrs.define(eq=False)
class EngineProvider(ProviderClient):
    engine: Engine
    identity: ProviderKeys
    auth_token: str
    catalog: Catalog
    provider_id: str | None = None
    events_per_frame: int = 16
    # Set when a request finds the engine unreachable: the agent then leaves the
    # coordinator until the engine is back (agent.py).
    engine_down: trio.Event = attrs.field(factory=trio.Event)

    @property
    def name(self) -> str:
        return self.provider_id or "provider-agent"

    @property
    def keys(self) -> ProviderKeys:
        return self.identity

    @property
    def token(self) -> str:
        return self.auth_token

    def receive_limit(self) -> int:
        return MAX_REQUEST_BYTES

    def register_message(self) -> Register:
        return Register(
            hardware=hardware(), models=self.catalog.models, backend=self.catalog.backend,
            version=VERSION, public_key=self.identity.public_key, auth_token=self.auth_token,
            encrypted_response_chunks=True, decode_tps=self.catalog.decode_tps,
            prefill_tps=self.catalog.prefill_tps, provider_id=self.provider_id,
            signing_public_key=self.identity.signing_public_key,
            max_concurrency=self.catalog.max_concurrency, max_request_bytes=MAX_REQUEST_BYTES)

    async def answer(self, request_id: str, body: dict[str, Any],
                     send: Callable[[Action], Awaitable[None]]) -> None:
        self.note("received", request_id)
        endpoint = body.pop("endpoint", Endpoint.CHAT.value)
        served = {m.id: m for m in self.catalog.models}.get(body.get("model"))  # type: ignore[arg-type]
        if served is None or (served.endpoints is not None and endpoint not in served.endpoints):
            await send(Error(404, f"model {printable(body.get('model'), 256)} is not served "
                                  f"on {printable(endpoint, 64)} here"))
            return
        try:
            await self._relay(endpoint, _engine_body(endpoint, body), send)
        except EngineRefused as exc:
            await send(Error(status_for(exc.status), exc.message))
        except EngineDown as exc:
            log.warning("%s: the engine is unreachable (%s)", self.name, exc)
            self.engine_down.set()
            await send(Error(503, "the provider's engine is unreachable"))
        except EventTooLarge as exc:
            await send(Error(502, str(exc)))

    async def _relay(self, endpoint: str, request: _EngineRequest,
                     send: Callable[[Action], Awaitable[None]]) -> None:
        splitter = EventSplitter(MAX_EVENT_BYTES)
        usage = UsageCount()
        ended = False
        async with self.engine.stream(endpoint, request.body) as stream:
            async for data in stream:
                frame: list[bytes] = []
                for event in splitter.feed(data):
                    parsed = event_data(event)
                    if parsed == "[DONE]":
                        ended = True
                        continue
                    if isinstance(parsed, dict):
                        failure = _engine_error(parsed)
                        if failure is not None:
                            await send(failure)
                            return
                        usage.see(parsed)
                        ended = ended or parsed.get("type") in _LAST_EVENTS
                        if request.hide_usage and _usage_only(parsed):
                            continue
                    frame.append(event)
                    if len(frame) >= self.events_per_frame:
                        await send(Chunk(b"".join(frame).decode("utf-8", "replace")))
                        frame = []
                if frame:
                    await send(Chunk(b"".join(frame).decode("utf-8", "replace")))
        if not ended:
            await send(Error(502, "the engine's stream ended before its answer did"))
            return
        await send(Complete(usage.prompt_tokens, usage.completion_tokens))


@attrs.frozen
class _EngineRequest:
    body: dict[str, Any]
    hide_usage: bool  # the consumer did not ask for the usage chunk; the agent did


def _engine_body(endpoint: str, body: dict[str, Any]) -> _EngineRequest:
    """What the engine gets: tool schemas normalized, always streamed, usage asked for."""
    body = orjson.loads(normalize_tool_schemas(orjson.dumps(body)))
    body["stream"] = True
    hide_usage = False
    if endpoint in _USAGE_STREAMS:
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        hide_usage = not options.get("include_usage")
        body["stream_options"] = {**options, "include_usage": True}
    return _EngineRequest(body, hide_usage)


def _usage_only(event: dict[str, Any]) -> bool:
    return isinstance(event.get("usage"), dict) and not event.get("choices")


def _engine_error(event: dict[str, Any]) -> Error | None:
    """An error the engine reports inside its stream (llama.cpp, vLLM: ``{"error": …}``;
    Anthropic-style: ``{"type": "error", …}``)."""
    error = event.get("error")
    if event.get("type") not in (None, "error") or not error:
        return None
    if "choices" in event:
        return None
    message = error.get("message") if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    status = status_for(code) if isinstance(code, int) and 400 <= code <= 599 else 502
    return Error(status, printable(message if isinstance(message, str) else "engine error", 1000))

"""What a simulated provider does with one request, as a stream of actions.

Transport-neutral: the WebSocket provider turns actions (``provider_link.actions``)
into protocol frames, the HTTP mode turns them into SSE. Waits are ``trio.sleep``, so a whole fleet
runs under a virtual clock in tests.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncGenerator
from typing import Any

import attrs
import trio

from coordinator.toolschema import normalize_tool_schemas
from provider_link.actions import Accepted, Action, Chunk, Complete, Crash, Error
from provider_link.template_check import render

from .behaviours import Behaviour, Fault
from .formats import transcript, words_for

# Provider binaries from this version normalize chat-shape tool schemas themselves.
PROVIDER_NORMALIZES_FROM = (0, 6, 3)


@attrs.frozen
class Pace:
    """Rates that turn into delays when a behaviour does not set its own."""

    decode_tps: float = 0.0
    prefill_tps: float = 0.0


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.lstrip("v").split("-")[0].split(".")[:3]:
        if not piece.isdigit():
            return ()
        parts.append(int(piece))
    return tuple(parts)


def template_failure(body: dict[str, Any], template: str | None, version: str) -> str | None:
    """The error an old provider's chat-template render would hit, or None.

    Binaries before 0.6.3 render the consumer's raw tool schemas; newer ones
    normalize the chat shape first (only that shape, like the real providers).
    """
    if template is None or not body.get("tools") or "messages" not in body:
        return None
    if _version_tuple(version) >= PROVIDER_NORMALIZES_FROM:
        body = json.loads(normalize_tool_schemas(json.dumps(body).encode()))
    try:
        render(template, {"messages": body["messages"], "tools": body["tools"],
                          "add_generation_prompt": True}, {})
    except Exception as exc:  # the runtime turns any render failure into a 500
        return str(exc)
    return None


async def play(
    body: dict[str, Any],
    behaviour: Behaviour,
    *,
    provider_id: str,
    request_id: str,
    rng: random.Random,
    pace: Pace = Pace(),
    template: str | None = None,
    version: str = "0.7.0",
) -> AsyncGenerator[Action, None]:
    """Yield what the provider sends for ``body``, waiting as the behaviour says."""
    b = behaviour
    fault = b.fault
    if b.failure_probability and rng.random() < b.failure_probability:
        fault = Fault.ROLE_THEN_ERROR
    endpoint = str(body.get("endpoint", "/v1/chat/completions"))
    model = str(body.get("model", ""))
    limit = body.get("max_tokens") or body.get("max_output_tokens") or b.tokens
    count = min(b.tokens, int(limit)) if isinstance(limit, int) else b.tokens
    words = words_for(model, provider_id, count) if b.text is None else [
        w if i == 0 else " " + w for i, w in enumerate(b.text.split(" "))]
    script = transcript(endpoint, body, words, request_id)
    token_interval = b.token_interval or (1.0 / pace.decode_tps if pace.decode_tps else 0.0)
    prefill = b.first_token_delay
    if not prefill and pace.prefill_tps:
        prefill = len(str(body)) / 4 / pace.prefill_tps

    corrupt = {Fault.PLAINTEXT_CHUNKS: "plaintext", Fault.GARBAGE_CHUNK: "garbage"}.get(fault)

    def chunk(text: str) -> Chunk:
        return Chunk(text, corrupt)

    if b.accepted_delay is not None:
        yield Accepted()
        await trio.sleep(b.accepted_delay)
    if fault is Fault.ERROR:
        yield Error(b.status, b.error_message)
        return
    if fault is Fault.STALL:
        await trio.sleep_forever()
    await trio.sleep(prefill)
    for text in script.preamble:
        yield chunk(text)
    crashed = template_failure(body, template, version)
    if crashed is not None:
        yield Error(500, crashed)  # the incident: a role delta, then the template crash
        return
    match fault:
        case Fault.ROLE_THEN_ERROR:
            yield Error(b.status, b.error_message)
            return
        case Fault.ROLE_THEN_DISCONNECT:
            yield Crash()
            return
        case Fault.ROLE_THEN_CLOSE:
            yield Complete(10, 0)
            return
        case Fault.STALL_AFTER_ROLE:
            await trio.sleep_forever()
    for i, text in enumerate(script.content):
        if i and token_interval:
            await trio.sleep(token_interval)
        if i == b.after_chunks and fault is Fault.RAW_CHUNK:
            yield Chunk(b.raw)
        if i == b.after_chunks and fault is Fault.ERROR_AFTER_CONTENT:
            yield Error(b.status, b.error_message)
            return
        if i == b.after_chunks and fault is Fault.DISCONNECT_AFTER_CONTENT:
            yield Crash()
            return
        yield chunk(text)
    for text in script.closing:
        yield chunk(text)
    yield Complete(10, len(script.content), "".join(words))


__all__ = ["Accepted", "Action", "Chunk", "Complete", "Crash", "Error", "Pace", "play",
           "template_failure"]

"""The official OpenAI and Anthropic SDKs against a live coordinator on loopback.

The SDKs are synchronous here and run in worker threads, while the coordinator
and its fleet run in the test's Trio loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anthropic
import openai
import pytest
import trio

from .harness import API_KEY
from .live import live_coordinator

T = TypeVar("T")
MODEL = "sim-chat-small"
USER = [{"role": "user", "content": "hello"}]


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


def anthropic_client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0, timeout=30)


async def test_openai_chat_completions():
    async with live_coordinator() as (running, _):
        client = openai_client(running.http_url)
        plain = await in_thread(lambda: client.chat.completions.create(
            model=MODEL, messages=USER))  # type: ignore[arg-type]
        assert plain.choices[0].message.content.startswith("Hello from sim-chat-small")
        assert plain.usage is not None and plain.usage.completion_tokens > 0

        def stream() -> tuple[str, list[Any]]:
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=USER, stream=True))  # type: ignore[arg-type]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks

        text, chunks = await in_thread(stream)
        assert text.startswith("Hello from sim-chat-small")
        assert chunks[-1].choices[0].finish_reason == "stop"

        tools: Any = [{"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"q": {"type": ["string", "null"]}}}}}]
        called = await in_thread(lambda: client.chat.completions.create(
            model=MODEL, messages=USER, tools=tools, tool_choice="required"))  # type: ignore[arg-type]
        call = called.choices[0].message.tool_calls[0]
        assert call.function.name == "lookup" and call.function.arguments == '{"x": 1}'
        assert called.choices[0].finish_reason == "tool_calls"

        with pytest.raises(openai.NotFoundError) as missing:
            await in_thread(lambda: client.chat.completions.create(
                model="no-such-model", messages=USER))  # type: ignore[arg-type]
        assert missing.value.status_code == 404


async def test_openai_responses_and_completions():
    async with live_coordinator() as (running, _):
        client = openai_client(running.http_url)
        response = await in_thread(lambda: client.responses.create(model=MODEL, input="hi"))
        assert response.output_text.startswith("Hello from sim-chat-small")

        def stream() -> list[str]:
            return [event.type for event in client.responses.create(
                model=MODEL, input="hi", stream=True)]

        types = await in_thread(stream)
        assert types[0] == "response.created" and types[-1] == "response.completed"
        assert "response.output_text.delta" in types

        completion = await in_thread(lambda: client.completions.create(model=MODEL, prompt="hi"))
        assert completion.choices[0].text.startswith("Hello")

        with pytest.raises(openai.AuthenticationError):
            await in_thread(lambda: openai.OpenAI(
                base_url=running.http_url + "/v1", api_key="wrong", max_retries=0,
            ).responses.create(model=MODEL, input="hi"))


async def test_anthropic_messages():
    async with live_coordinator() as (running, _):
        client = anthropic_client(running.http_url)
        message = await in_thread(lambda: client.messages.create(
            model=MODEL, max_tokens=32, messages=USER))  # type: ignore[arg-type]
        assert message.content[0].text.startswith("Hello from sim-chat-small")  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn"

        def stream() -> tuple[str, Any]:
            with client.messages.stream(model=MODEL, max_tokens=32,
                                        messages=USER) as s:  # type: ignore[arg-type]
                text = "".join(s.text_stream)
                return text, s.get_final_message()

        text, final = await in_thread(stream)
        assert text.startswith("Hello from sim-chat-small") and final.stop_reason == "end_turn"

        tools: Any = [{"name": "lookup", "description": "look up",
                       "input_schema": {"type": "object", "properties": {
                           "q": {"type": ["string", "null"]}}}}]
        used = await in_thread(lambda: client.messages.create(
            model=MODEL, max_tokens=32, messages=USER, tools=tools,  # type: ignore[arg-type]
            tool_choice={"type": "any"}))
        assert used.stop_reason == "tool_use"
        block = next(b for b in used.content if b.type == "tool_use")
        assert block.name == "lookup" and block.input == {"x": 1}  # type: ignore[union-attr]

        with pytest.raises(anthropic.NotFoundError) as missing:
            await in_thread(lambda: client.messages.create(
                model="no-such-model", max_tokens=8, messages=USER))  # type: ignore[arg-type]
        assert missing.value.status_code == 404
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]

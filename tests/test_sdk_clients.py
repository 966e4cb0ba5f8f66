"""The official OpenAI and Anthropic SDKs against the coordinator.

Against a live coordinator on loopback the SDKs are synchronous and run in worker
threads, while the coordinator and its fleet run in the test's Trio loop. In
process (:func:`inprocess_clients`) the async SDKs call the harness's ASGI
application directly, in virtual time, with their default retries: what a
consumer's SDK does with an answer shows in how often it asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anthropic
import httpx2
import openai
import pytest
import trio

from provider_sim.behaviours import Behaviour, Fault

from .harness import API_KEY, Harness, model, open_harness
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


def inprocess_clients(h: Harness) -> tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic,
                                          list[str]]:
    """Async OpenAI and Anthropic clients on the harness's application (default retries),
    and the list of every HTTP request they send."""
    sent: list[str] = []

    async def count(request: httpx2.Request) -> None:
        sent.append(f"{request.method} {request.url.path}")

    def http() -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=h.coordinator.asgi),
                                  event_hooks={"request": [count]})

    return (openai.AsyncOpenAI(base_url="http://coordinator/v1", api_key=API_KEY,
                               http_client=http()),
            anthropic.AsyncAnthropic(base_url="http://coordinator", api_key=API_KEY,
                                     http_client=http()),
            sent)


IMAGE: Any = [{"role": "user", "content": [
    {"type": "text", "text": "what is this"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]
CLAUDE_IMAGE: Any = [{"role": "user", "content": [
    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
    {"type": "text", "text": "what is this"}]}]
TOOLS: Any = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


async def test_sdks_do_not_retry_a_capability_no_provider_of_the_model_has(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("old-and-blind", version="0.6.0")
        oa, claude, sent = inprocess_clients(h)
        with pytest.raises(openai.BadRequestError) as images:
            await oa.chat.completions.create(model="m1", messages=IMAGE)
        assert "image or video input" in images.value.message
        with pytest.raises(openai.BadRequestError) as tools:
            await oa.chat.completions.create(model="m1", messages=USER, tools=TOOLS)  # type: ignore[arg-type]
        assert "tool calls" in tools.value.message
        with pytest.raises(anthropic.BadRequestError) as claude_images:
            await claude.messages.create(model="m1", max_tokens=8, messages=CLAUDE_IMAGE)
        assert claude_images.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert sent == ["POST /v1/chat/completions"] * 2 + ["POST /v1/messages"]  # no retry


async def test_sdks_retry_while_the_capable_provider_is_cooling(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("blind")
        await h.add_provider("eyes", model(is_vision=True),
                             behaviour=Behaviour(Fault.ERROR, status=500))
        oa, _, sent = inprocess_clients(h)
        with pytest.raises(openai.InternalServerError) as cooling:
            await oa.chat.completions.create(model="m1", messages=IMAGE)
        assert cooling.value.status_code == 503 and "cooling down" in cooling.value.message
        assert len(sent) == 3  # the first try and the SDK's two retries: it may succeed later


@pytest.mark.slow  # synchronous SDKs against a coordinator on loopback, in real time
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


@pytest.mark.slow  # synchronous SDKs against a coordinator on loopback, in real time
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


@pytest.mark.slow  # synchronous SDKs against a coordinator on loopback, in real time
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


async def test_openai_sdk_retrieves_a_model_and_is_refused_several_choices(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("a", model("org/model-7b"))
        oa, _, sent = inprocess_clients(h)
        found = await oa.models.retrieve("org/model-7b")
        assert found.id == "org/model-7b" and found.object == "model"
        with pytest.raises(openai.NotFoundError) as missing:
            await oa.models.retrieve("nope")
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as several:
            await oa.chat.completions.create(model="org/model-7b", messages=USER, n=2)  # type: ignore[arg-type]
        assert several.value.param == "n"
        with pytest.raises(openai.NotFoundError) as unknown:
            await oa.get("/no/such/path", cast_to=object)
        assert unknown.value.code == "unknown_url"
        assert len(sent) == 4  # nothing retried

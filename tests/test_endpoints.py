"""Every inference route shares one path: normalization, failover, fail-fast, formats."""

from __future__ import annotations

import pytest

from provider_sim.behaviours import Behaviour, Fault

from .harness import MODEL, model, open_harness

OPTIONAL = {"type": ["string", "null"]}
ROUTES = {
    "chat": ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": OPTIONAL}}}}]}),
    "responses": ("/v1/responses", {
        "input": "hi",
        "tools": [{"type": "function", "name": "f", "parameters": {
            "type": "object", "properties": {"a": OPTIONAL}}}]}),
    "messages": ("/v1/messages", {
        "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": OPTIONAL}}}]}),
    "completions": ("/v1/completions", {
        "prompt": "hi",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": OPTIONAL}}}}]}),
}


def schema_of(received: dict) -> dict:
    tool = received["tools"][0]
    if "input_schema" in tool:
        return tool["input_schema"]
    if isinstance(tool.get("function"), dict):
        return tool["function"]["parameters"]
    return tool["parameters"]


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_normalized_schemas_reach_the_provider(autojump_clock, route):
    path, body = ROUTES[route]
    async with open_harness() as h:
        p = await h.add_provider("p")
        result = await h.request(path, {"model": MODEL, "stream": True, **body})
        assert result.status == 200, result.body
        [received] = p.received
        assert received["endpoint"] == path
        assert schema_of(received)["properties"]["a"] == {"type": "string", "nullable": True}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("stream", [True, False])
async def test_precontent_failover_on_every_route(autojump_clock, route, stream):
    path, body = ROUTES[route]
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("bad", behaviour=Behaviour(Fault.ROLE_THEN_ERROR), decode_tps=1000)
        await h.add_provider("good", decode_tps=10)
        result = await h.request(path, {"model": MODEL, "stream": stream, **body})
        assert result.status == 200, result.body
        assert result.headers["x-provider-id"] == "good"
        text = result.body.decode()
        assert "good" in text  # the winner's words name it
        assert "on bad" not in text and "error" not in text
        await h.assert_quiescent()


def assert_refused_for_good(route: str, result, capability: str) -> None:
    """400 ``invalid_request_error`` in the route's family, naming the capability, no
    ``Retry-After``: the official SDKs do not retry it."""
    assert result.status == 400, result.body
    assert "retry-after" not in result.headers
    error = result.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert capability in error["message"]
    if route == "messages":
        assert result.json()["type"] == "error"
    else:
        assert error["code"] == "unsupported_capability"


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_tools_no_provider_can_ever_serve_are_a_400_on_every_route(autojump_clock, route):
    path, body = ROUTES[route]
    async with open_harness() as h:
        old = await h.add_provider("old", version="0.6.0")
        result = await h.request(path, {"model": MODEL, **body})
        assert_refused_for_good(route, result, "tool calls")
        assert "0.6.3" in result.json()["error"]["message"]  # the floor it needs
        assert old.received == []


async def test_anthropic_stream_events_and_terminator(autojump_clock):
    path, body = ROUTES["messages"]
    async with open_harness() as h:
        await h.add_provider("p")
        result = await h.request(path, {"model": MODEL, "stream": True, **body})
        names = [name for name, _ in result.sse]
        assert names[0] == "message_start" and names[-1] == "message_stop"
        assert "content_block_delta" in names and "[DONE]" not in result.body.decode()


async def test_responses_stream_holds_lifecycle_events_until_content(autojump_clock):
    path, body = ROUTES["responses"]
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("bad", behaviour=Behaviour(Fault.ROLE_THEN_ERROR), decode_tps=1000)
        await h.add_provider("good", decode_tps=10)
        result = await h.request(path, {"model": MODEL, "stream": True, **body})
        names = [name for name, _ in result.sse]
        assert names.count("response.created") == 1  # only the winner's
        assert names[-1] == "response.completed"


VISION_BODIES = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what"}, {"type": "image_url", "image_url": {"url": "data:x"}}]}]}),
    "responses": ("/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what"}, {"type": "input_image", "image_url": "data:x"}]}]}),
    "messages": ("/v1/messages", {"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}},
        {"type": "text", "text": "what"}]}]}),
    "completions": ("/v1/completions", {"prompt": ["a"], "messages": [
        {"content": [{"type": "video_url", "video_url": {"url": "x"}}]}]}),
}


@pytest.mark.parametrize("route", sorted(VISION_BODIES))
async def test_images_no_provider_can_ever_serve_are_a_400_on_every_route(autojump_clock, route):
    path, body = VISION_BODIES[route]
    async with open_harness() as h:
        blind = await h.add_provider("blind")
        result = await h.request(path, {"model": MODEL, **body})
        assert_refused_for_good(route, result, "image or video")
        assert blind.received == []


@pytest.mark.parametrize("route", sorted(VISION_BODIES))
async def test_images_while_the_vision_provider_cools_are_a_503_on_every_route(
        autojump_clock, route):
    path, body = VISION_BODIES[route]
    async with open_harness() as h:
        await h.add_provider("blind")
        await h.add_provider("eyes", model(is_vision=True),
                             behaviour=Behaviour(Fault.ERROR, status=500))
        for _ in range(2):  # two strikes: eyes cools down for images
            assert (await h.request(path, {"model": MODEL, **body})).status == 503
        result = await h.request(path, {"model": MODEL, **body})
        assert result.status == 503, result.body
        assert result.headers["retry-after"] == "5"
        assert "cooling down" in result.body.decode()
        assert result.json()["error"]["type"] == ("api_error" if route == "messages"
                                                  else "provider_error")


@pytest.mark.parametrize(("route", "final"), [("responses", "response.completed"),
                                              ("messages", "message_stop")])
async def test_empty_completion_gets_its_family_terminator(autojump_clock, route, final):
    path, body = ROUTES[route]
    async with open_harness() as h:
        await h.add_provider("quiet", behaviour=Behaviour(Fault.ROLE_THEN_CLOSE))
        result = await h.request(path, {"model": MODEL, "stream": True, **body})
        assert result.status == 200
        names = [name for name, _ in result.sse]
        assert names.count(final) == 1 and names[-1] == final
        await h.assert_quiescent()

"""The HTTP surface: bad input gets a clear, correctly shaped error and loses nothing."""

from __future__ import annotations

import pytest

from .harness import ADMIN_KEY, MODEL, model, open_harness

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("raw", "status", "code", "fragment"),
    [
        (b"{bad json", 400, "invalid_json", "not valid JSON"),
        (b"", 400, None, "empty"),
        (b"[1, 2]", 400, "invalid_json", "JSON object"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "missing_required_parameter",
         "'model'"),
        (b'{"model": "m1"}', 400, "missing_required_parameter", "'messages'"),
        (b'{"model": 5, "messages": []}', 400, "invalid_type", "'model' must be a string"),
        (b'{"model": "m1", "messages": "hi"}', 400, "invalid_type", "'messages'"),
        (b'{"model": "m1", "messages": []}', 400, None, "non-empty"),
        (b'{"model": "m1", "messages": [1]}', 400, None, "message objects"),
        (b'{"model": "m1", "messages": [{}], "stream": "yes"}', 400, "invalid_type", "'stream'"),
        (b'{"model": "m1", "messages": [{}], "max_tokens": true}', 400, "invalid_type",
         "'max_tokens'"),
        (b'{"model": "m1", "messages": [{}], "max_tokens": 0}', 400, "invalid_value",
         "at least 1"),
        (b'{"model": "m1", "messages": [{}], "tools": {}}', 400, "invalid_type", "'tools'"),
        (b'{"model": "nope", "messages": [{}]}', 404, "model_not_found", "does not exist"),
    ],
)
async def test_bad_input_table(autojump_clock, raw, status, code, fragment):
    async with open_harness() as h:
        provider = await h.add_provider("a")
        result = await h.request(CHAT, raw=raw)
        assert result.status == status
        error = result.json()["error"]
        assert fragment in error["message"]
        assert error["type"] and "message" in error
        if code:
            assert error["code"] == code
        assert provider.received == []


async def test_missing_and_wrong_api_key(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("a")
        body = {"model": MODEL, "messages": MESSAGES}
        missing = await h.request(CHAT, body, headers={"authorization": ""})
        assert missing.status == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = await h.request(CHAT, body, headers={"authorization": "Bearer nope"})
        assert wrong.status == 401
        via_x_api_key = await h.request(CHAT, body, headers={"authorization": "",
                                                             "x-api-key": "test-key"})
        assert via_x_api_key.status == 200


async def test_body_over_limit_is_413(autojump_clock):
    async with open_harness(max_body_bytes=1000) as h:
        await h.add_provider("a")
        result = await h.request(CHAT, {"model": MODEL, "messages": MESSAGES, "pad": "x" * 2000})
        assert result.status == 413
        assert result.json()["error"]["code"] == "request_too_large"


async def test_no_provider_online_for_unknown_model_is_404_and_lists_nothing(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("secret-provider-id")
        result = await h.request(CHAT, {"model": "other", "messages": MESSAGES})
        assert result.status == 404
        assert "secret-provider-id" not in result.body.decode()


async def test_anthropic_route_errors_are_anthropic_shaped(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("a")
        result = await h.request("/v1/messages", {"model": MODEL, "messages": MESSAGES},
                                 headers={"authorization": "", "x-api-key": "test-key"})
        assert result.status == 400
        body = result.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in body["error"]["message"]


async def test_unknown_route_and_method_are_json(autojump_clock):
    async with open_harness() as h:
        unknown = await h.request("/v1/nope", {})
        assert unknown.status == 404 and unknown.headers["content-type"] == "application/json"
        assert unknown.json()["error"] == {
            "message": "Invalid URL (POST /v1/nope): no such endpoint",
            "type": "invalid_request_error", "code": "unknown_url", "param": None}
        # Under /v1/messages the Anthropic SDK reads the answer: its shape.
        claude = await h.request("/v1/messages/count_tokens", {})
        assert claude.status == 404 and claude.json()["type"] == "error"
        assert claude.json()["error"]["type"] == "not_found_error"
        wrong = await h.request(CHAT, method="GET")
        assert wrong.status == 405 and wrong.headers["allow"] == "OPTIONS, POST"
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        assert wrong.json()["error"]["message"].endswith("use POST")
        wrong_claude = await h.request("/v1/messages", method="PUT")
        assert wrong_claude.status == 405
        assert wrong_claude.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "extra", "param"), [
    (CHAT, {"n": 2}, "n"),
    (CHAT, {"n": 0}, "n"),
    (CHAT, {"n": "2"}, "n"),
    ("/v1/completions", {"n": 3}, "n"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": ["one", "two"]}, "prompt"),
])
async def test_asking_for_several_choices_is_refused_not_answered_with_one(
        autojump_clock, path, extra, param):
    async with open_harness() as h:
        provider = await h.add_provider("a")
        body = ({"model": MODEL, "messages": MESSAGES} if path == CHAT
                else {"model": MODEL, "prompt": "hi"})
        result = await h.request(path, {**body, **extra})
        assert result.status == 400, result.body
        error = result.json()["error"]
        assert error["param"] == param and f"'{param}'" in error["message"]
        assert provider.received == []
        for one in ({"n": 1}, {"n": None}, {"best_of": 1} if path != CHAT else {},
                    {"prompt": ["one"]} if path != CHAT else {}):
            assert (await h.request(path, {**body, **one})).status == 200, one


async def test_a_model_is_retrieved_as_listed_and_an_unknown_one_is_an_openai_404(
        autojump_clock):
    async with open_harness() as h:
        await h.add_provider("a", model("org/model-7b"))
        found = await h.request("/v1/models/org/model-7b", method="GET")
        assert found.status == 200
        assert found.json() == {"id": "org/model-7b", "object": "model", "created": 0,
                                "owned_by": "coordinator"}
        listed = (await h.request("/v1/models", method="GET")).json()["data"]
        assert listed == [found.json()]
        missing = await h.request("/v1/models/nope", method="GET")
        assert missing.status == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        assert missing.json()["error"]["param"] == "model"
        denied = await h.request("/v1/models/org/model-7b", method="GET",
                                 headers={"authorization": "Bearer wrong"})
        assert denied.status == 401 and "org/model-7b" not in denied.body.decode()


async def test_models_healthz_metrics_admin(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("a")
        models = await h.request("/v1/models", method="GET")
        assert [m["id"] for m in models.json()["data"]] == [MODEL]
        health = await h.request("/healthz", method="GET")
        assert health.json()["providers"] == 1
        await h.chat()
        metrics = (await h.request("/metrics", method="GET")).body.decode()
        assert 'coordinator_dispatch_total{result="success"} 1.0' in metrics
        assert "coordinator_providers_online" in metrics
        denied = await h.request("/v1/admin/providers", method="GET")
        assert denied.status == 401
        admin = await h.request("/v1/admin/providers", method="GET",
                                headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert admin.json()["providers"][0]["id"] == "a"

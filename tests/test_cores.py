"""Pure cores: versions, traits, gates, scheduler, chunk classification."""

from __future__ import annotations

import random

import pytest

from coordinator.capabilities import meets_floor, parse_version
from coordinator.dispatch.chunks import ChunkError, ChunkKind, parse_chunk
from coordinator.protocol import ModelInfo
from coordinator.protocol.endpoints import Endpoint
from coordinator.registry import scheduler
from coordinator.registry.breaker import Breaker
from coordinator.registry.gates import (
    Gate,
    capabilities,
    endpoint_need,
    fail_fast_message,
    gate,
    incapable_message,
)
from coordinator.registry.table import Job, Lease, ProviderRecord
from coordinator.registry.traits import Traits, traits_of


@pytest.mark.parametrize(
    ("a", "b"),
    [("0.10.0", "0.9.9"), ("1.0.0", "0.99.99"), ("0.6.3", "0.6.3-rc1"), ("0.6.10", "0.6.9"),
     ("v0.7", "0.6.99")],
)
def test_versions_compare_semantically(a, b):
    assert parse_version(a) > parse_version(b)


@pytest.mark.parametrize("text", [None, "", "latest", "0.x.1", "1.2.3.4.5", "-1"])
def test_unparsable_version_is_below_every_floor(text):
    assert not meets_floor(parse_version(text), parse_version("0.0.1"))


def test_no_floor_admits_everyone():
    assert meets_floor(None, None)


def test_traits_and_shapes():
    assert traits_of({"messages": []}).shape == "base"
    assert traits_of({"tools": [{"type": "function"}]}).shape == "tools"
    assert traits_of({"tools": []}).shape == "base"
    image = {"type": "image_url", "image_url": {"url": "data:"}}
    assert traits_of({"messages": [{"role": "user", "content": [image]}]}).shape == "vision"
    both = {"tools": [{}], "messages": [{"content": [image]}]}
    assert traits_of(both).shape == "tools+vision"


@pytest.mark.parametrize(
    "body",
    [
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"messages": [{"role": "user", "content": [
            {"type": "tool_result", "content": [{"type": "image", "source": {}}]}]}]},
        {"messages": [{"content": [{"type": "video_url", "video_url": {}}]}]},
    ],
)
def test_media_detected_on_every_endpoint_shape(body):
    assert traits_of(body).requires_vision


def test_media_words_in_text_or_tools_are_not_media():
    body = {"messages": [{"content": "type image_url"}],
            "tools": [{"input_schema": {"type": "image"}}]}
    assert not traits_of(body).requires_vision


def record(pid: str = "p", version: str = "0.7.0", **model_kw: object) -> ProviderRecord:
    return ProviderRecord(pid, 1, version, parse_version(version),
                          {"m": ModelInfo("m", size_bytes=1, **model_kw)},  # type: ignore[arg-type]
                          memory_gb=64, decode_tps=100, prefill_tps=1000)


FLOORS = {"tools": parse_version("0.6.3")}
TOOLS = Job("r", "m", Traits(has_tools=True))
VISION = Job("r", "m", Traits(requires_vision=True))
BASE = Job("r", "m")


def check(rec: ProviderRecord, job: Job, **kw: object) -> Gate | None:
    return gate(rec, job, floors=FLOORS, breaker=kw.pop("breaker", Breaker(2, 60.0, 300.0)), now=0.0, **kw)  # type: ignore[arg-type]


def test_gate_table():
    assert check(record(), BASE) is None
    assert check(record(version="0.6.2"), TOOLS) is Gate.FLOOR
    assert check(record(version="0.6.2"), BASE) is None
    assert check(record(version="garbage"), TOOLS) is Gate.FLOOR
    assert check(record(template_render_ok=False), BASE) is Gate.TEMPLATE
    assert check(record(template_render_ok=None), TOOLS) is None
    assert check(record(), VISION) is Gate.VISION
    assert check(record(is_vision=True), VISION) is None
    assert check(record(), BASE, exclude={"p"}) is Gate.EXCLUDED
    assert check(record(), Job("r", "m", allowlist=frozenset({"q"}))) is Gate.NOT_ALLOWED
    assert check(record(), Job("r", "other")) is Gate.NO_MODEL
    big = record()
    big.models["m"] = ModelInfo("m", size_bytes=200 * 1024**3)
    assert check(big, BASE) is Gate.TOO_LARGE


def test_gate_honours_breaker_per_shape():
    breaker = Breaker(2, 60.0, 300.0)
    breaker.record_failure(("p", "m", "tools"), 500, 0.0)
    breaker.record_failure(("p", "m", "tools"), 500, 1.0)
    assert check(record(), TOOLS, breaker=breaker) is Gate.COOLING
    assert check(record(), BASE, breaker=breaker) is None


def test_capabilities_are_what_the_gate_lets_through():
    """A provider has a capability exactly when the gate's vision and floor checks pass,
    for every version and vision flag, under floors for tools, vision, both or none."""
    floors_cases = [{}, FLOORS, {"vision": parse_version("0.6.3")},
                    {"tools": parse_version("0.6.3"), "vision": parse_version("0.7.0")}]
    for floors in floors_cases:
        for version in ("0.6.2", "0.6.3", "0.7.0", "garbage"):
            for is_vision in (None, False, True):
                rec = record(version=version, is_vision=is_vision)
                caps = capabilities(rec, rec.models["m"], floors)
                for job in (TOOLS, VISION, Job("r", "m", Traits(True, True))):
                    passes = gate(rec, job, floors=floors, breaker=Breaker(2, 60.0, 300.0), now=0.0) is None
                    assert passes == (set(job.traits.names) <= caps), (floors, version, job)


def test_incapable_messages_name_what_no_provider_has():
    chat = endpoint_need("/v1/chat/completions")
    tools_only, vision_only = frozenset({"tools", chat}), frozenset({"vision", chat})
    text = incapable_message(TOOLS, [frozenset({chat})], FLOORS)
    assert text.startswith("model m does not support tool calls") and "0.6.3" in text
    text = incapable_message(VISION, [tools_only], FLOORS)
    assert text == ("model m does not support image or video input: none of its providers "
                    "serves it as a vision model")
    both = Job("r", "m", Traits(True, True))
    text = incapable_message(both, [tools_only, vision_only], FLOORS)
    assert "tool calls together with image or video input" in text
    text = incapable_message(both, [frozenset({chat})], FLOORS)
    assert "tool calls" in text and "; nor image or video input" in text
    responses = Job("r", "m", endpoint="/v1/responses")
    assert incapable_message(responses, [tools_only], FLOORS) == (
        "model m is not served on /v1/responses by any of its providers")


def test_fail_fast_messages_are_specific():
    assert "tool calls" in fail_fast_message(TOOLS, {Gate.FLOOR})
    assert "image or video" in fail_fast_message(VISION, {Gate.VISION})
    assert "too large" in fail_fast_message(BASE, {Gate.TOO_LARGE})
    assert "allowlist" in fail_fast_message(BASE, {Gate.NOT_ALLOWED})


def test_scheduler_prefers_least_loaded_and_faster():
    a, b = record("a"), record("b")
    b.decode_tps = 1000  # much faster decode
    assert scheduler.pick([a, b], BASE, random.Random(0)) is b
    b.leases["x"] = Lease("x", "b", 1, "m", "base", "0.7.0", cost=100.0)
    assert scheduler.pick([a, b], BASE, random.Random(0)) is a


def test_scheduler_skips_full_providers():
    a = record("a")
    a.max_slots = 1
    a.leases["x"] = Lease("x", "a", 1, "m", "base", "0.7.0", cost=0.0)
    assert scheduler.pick([a], BASE, random.Random(0)) is None


def test_scheduler_spreads_near_ties():
    providers = [record(f"p{i}") for i in range(4)]
    rng = random.Random(7)
    picks = {scheduler.pick(providers, BASE, rng).provider_id for _ in range(200)}  # type: ignore[union-attr]
    assert picks == {"p0", "p1", "p2", "p3"}


def test_scheduler_prefers_a_different_version_but_never_fails_closed():
    old, new = record("old", "0.6.4"), record("new", "0.7.0")
    old.decode_tps = 10_000
    assert scheduler.pick([old, new], BASE, random.Random(0), avoid_version="0.6.4") is new
    assert scheduler.pick([old], BASE, random.Random(0), avoid_version="0.6.4") is old


CHAT_ROLE = '{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'


@pytest.mark.parametrize(
    ("endpoint", "payload", "kind"),
    [
        (Endpoint.CHAT, CHAT_ROLE, ChunkKind.BOILERPLATE),
        (Endpoint.CHAT, '{"choices":[{"delta":{"role":"assistant"}}]}', ChunkKind.BOILERPLATE),
        (Endpoint.CHAT, '{"choices":[],"usage":{"prompt_tokens":1}}', ChunkKind.BOILERPLATE),
        (Endpoint.CHAT, '{"choices":[{"delta":{"content":"hi"}}]}', ChunkKind.CONTENT),
        (Endpoint.CHAT, '{"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}', ChunkKind.CONTENT),
        (Endpoint.CHAT, '{"choices":[{"delta":{},"finish_reason":"stop"}]}', ChunkKind.CONTENT),
        (Endpoint.CHAT, '{"choices":[{"delta":{"content":"response.created"}}]}',
         ChunkKind.CONTENT),
        (Endpoint.CHAT, "[DONE]", ChunkKind.TERMINAL),
        (Endpoint.COMPLETIONS, '{"choices":[{"text":""}]}', ChunkKind.BOILERPLATE),
        (Endpoint.COMPLETIONS, '{"choices":[{"text":"x"}]}', ChunkKind.CONTENT),
        (Endpoint.RESPONSES, '{"type":"response.created","response":{}}', ChunkKind.BOILERPLATE),
        (Endpoint.RESPONSES, '{"type":"response.in_progress"}', ChunkKind.BOILERPLATE),
        (Endpoint.RESPONSES, '{"type":"response.output_text.delta","delta":"response.created"}',
         ChunkKind.CONTENT),
        (Endpoint.RESPONSES, '{"type":"response.output_item.added","item":{"type":"message",'
         '"content":[]}}', ChunkKind.BOILERPLATE),
        (Endpoint.RESPONSES, '{"type":"response.output_item.added","item":{"type":'
         '"function_call","name":"f"}}', ChunkKind.CONTENT),
        (Endpoint.RESPONSES, '{"type":"response.content_part.added","part":{"type":"output_text",'
         '"text":""}}', ChunkKind.BOILERPLATE),
        (Endpoint.MESSAGES, '{"type":"message_start","message":{}}', ChunkKind.BOILERPLATE),
        (Endpoint.MESSAGES, '{"type":"ping"}', ChunkKind.BOILERPLATE),
        (Endpoint.MESSAGES, '{"type":"content_block_start","content_block":{"type":"text",'
         '"text":""}}', ChunkKind.BOILERPLATE),
        (Endpoint.MESSAGES, '{"type":"content_block_start","content_block":{"type":"tool_use",'
         '"name":"f"}}', ChunkKind.CONTENT),
        (Endpoint.MESSAGES, '{"type":"content_block_delta","delta":{"text":"ping"}}',
         ChunkKind.CONTENT),
    ],
)
def test_chunk_classification(endpoint, payload, kind):
    assert parse_chunk(endpoint, payload).kind is kind


@pytest.mark.parametrize("payload", ["not json", "[1, 2]", '"text"', "[" * 1000,
                                     '{"a":' * 100 + "1" + "}" * 100, '{"n": NaN}'])
def test_a_payload_that_is_not_an_event_is_a_provider_error(payload):
    with pytest.raises(ChunkError):
        parse_chunk(Endpoint.CHAT, payload)

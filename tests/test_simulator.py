"""The provider simulator: fault scripts, old-binary realism, template check, HTTP mode, load."""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
from pathlib import Path

import httpx
import pytest
import trio

from coordinator.loadgen.load import PATHS, Mix, run_load, summary
from provider_link.template_check import check_snapshot, collect_templates
from provider_sim.behaviours import Behaviour, Fault, parse_behaviour
from provider_sim.fleet import load_fleet
from provider_sim.http import serve_http
from provider_sim.script import Accepted, Chunk, Error, Pace, play

from .harness import MODEL, open_harness
from .live import live_coordinator

SNAPSHOTS = Path(__file__).resolve().parent.parent / "provider_sim" / "snapshots"
CHAT = {"model": "m", "endpoint": "/v1/chat/completions", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]}
RAW_TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
    "type": "object", "properties": {"a": {"type": ["string", "null"]}}}}}]


async def actions(behaviour: Behaviour, body: dict | None = None, **kw) -> list[tuple[float, object]]:
    out = []
    async for action in play(body or CHAT, behaviour, provider_id="p", request_id="r",
                             rng=random.Random(0), **kw):
        out.append((trio.current_time(), action))
    return out


def kinds(script: list[tuple[float, object]]) -> list[str]:
    return [type(a).__name__ for _, a in script]


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (Behaviour(), ["Chunk"] * 6 + ["Complete"]),
        (Behaviour(Fault.ROLE_THEN_ERROR, status=502), ["Chunk", "Error"]),
        (Behaviour(Fault.ROLE_THEN_DISCONNECT), ["Chunk", "Crash"]),
        (Behaviour(Fault.ROLE_THEN_CLOSE), ["Chunk", "Complete"]),
        (Behaviour(Fault.ERROR, status=503), ["Error"]),
        (Behaviour(Fault.ERROR_AFTER_CONTENT, after_chunks=2), ["Chunk"] * 3 + ["Error"]),
        (Behaviour(Fault.DISCONNECT_AFTER_CONTENT, after_chunks=1), ["Chunk"] * 2 + ["Crash"]),
    ],
)
async def test_each_fault_does_what_it_says(autojump_clock, behaviour, expected):
    script = await actions(behaviour)
    assert kinds(script) == expected
    errors = [a for _, a in script if isinstance(a, Error)]
    if errors:
        assert errors[0].status == behaviour.status


async def test_stalls_never_finish(autojump_clock):
    for behaviour in (Behaviour(Fault.STALL), Behaviour(Fault.STALL_AFTER_ROLE)):
        with trio.move_on_after(10_000):
            script = await actions(behaviour)
            raise AssertionError(f"{behaviour.fault} finished: {script}")
        assert trio.current_time() >= 10_000


async def test_timing_first_token_accepted_and_decode_rate(autojump_clock):
    start = trio.current_time()
    script = await actions(Behaviour(first_token_delay=3.0, token_interval=0.5))
    assert script[0][0] - start == 3.0  # the role chunk after prefill
    content_times = [t for t, a in script if isinstance(a, Chunk)][1:5]
    assert [round(b - a, 6) for a, b in itertools.pairwise(content_times)] == [0.5] * 3

    start = trio.current_time()
    script = await actions(Behaviour(accepted_delay=120.0))
    assert isinstance(script[0][1], Accepted) and script[0][0] == start
    assert script[1][0] - start == 120.0

    start = trio.current_time()
    paced = await actions(Behaviour(), pace=Pace(decode_tps=10.0, prefill_tps=100.0))
    chunk_times = [t for t, a in paced if isinstance(a, Chunk)]
    assert chunk_times[0] > start and round(chunk_times[3] - chunk_times[2], 6) == 0.1


async def test_failure_probability_is_seeded(autojump_clock):
    async def outcomes(seed: int) -> list[str]:
        rng = random.Random(seed)
        out = []
        for _ in range(20):
            got = [a async for a in play(CHAT, Behaviour(failure_probability=0.3),
                                         provider_id="p", request_id="r", rng=rng)]
            out.append(type(got[-1]).__name__)
        return out

    first, again = await outcomes(5), await outcomes(5)
    assert first == again and "Error" in first and "Complete" in first


async def test_old_binary_crashes_on_raw_tool_schemas_like_the_incident(autojump_clock):
    template = collect_templates(SNAPSHOTS / "gemma-upper")["chat_template.jinja"]
    body = {**CHAT, "tools": RAW_TOOLS}
    old = await actions(Behaviour(), body, template=template, version="0.6.2")
    assert kinds(old) == ["Chunk", "Error"]  # a role delta, then the crash
    error = old[-1][1]
    assert isinstance(error, Error) and error.status == 500
    assert error.message == "upper filter requires string"
    fixed = await actions(Behaviour(), body, template=template, version="0.6.3")
    assert kinds(fixed)[-1] == "Complete"
    no_tools = await actions(Behaviour(), CHAT, template=template, version="0.6.2")
    assert kinds(no_tools)[-1] == "Complete"


async def test_coordinator_normalization_protects_old_binaries(autojump_clock):
    template = collect_templates(SNAPSHOTS / "gemma-upper")["chat_template.jinja"]
    # With the floor lowered, tool requests reach a 0.6.2 provider - and succeed,
    # because the coordinator normalized the schema before encrypting it.
    async with open_harness(capability_floors={}) as h:
        old = await h.add_provider("old", version="0.6.2")
        old.templates[MODEL] = template
        result = await h.chat(tools=RAW_TOOLS)
        assert result.status == 200 and result.headers["x-provider-id"] == "old"
        assert old.received[0]["tools"][0]["function"]["parameters"]["properties"]["a"] == {
            "type": "string", "nullable": True}


def test_template_check_verdicts_for_shipped_snapshots(tmp_path):
    assert check_snapshot(SNAPSHOTS / "gemma-upper") is True
    assert check_snapshot(SNAPSHOTS / "chatml") is True
    assert check_snapshot(SNAPSHOTS / "vision-chatml") is True
    assert check_snapshot(SNAPSHOTS / "broken") is False  # one of its template list fails
    assert check_snapshot(tmp_path) is None  # no template at all
    assert check_snapshot(tmp_path / "missing") is None
    broken = collect_templates(SNAPSHOTS / "broken")
    assert set(broken) == {"tokenizer_config.json:default", "tokenizer_config.json:tool_use"}


def test_template_check_renders_media_only_for_vision_models(tmp_path):
    text_only = tmp_path / "text-only"
    shutil.copytree(SNAPSHOTS / "chatml", text_only)
    # A template that cannot render media parts passes for a text model ...
    no_media = ("{% for m in messages %}{{ m['content'] + '' }}{% endfor %}"
                "{% if tools %}{{ tools | length }}{% endif %}")
    (text_only / "tokenizer_config.json").write_text(json.dumps({"chat_template": no_media}))
    assert check_snapshot(text_only) is True
    # ... and fails once the snapshot declares a vision tower.
    (text_only / "config.json").write_text(json.dumps({"vision_config": {}}))
    assert check_snapshot(text_only) is False


def test_template_check_never_raises(tmp_path):
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff\xfe{% if")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    assert check_snapshot(tmp_path) is False


def test_behaviour_specs_and_fleet_files(tmp_path):
    assert parse_behaviour("role_then_error:status=502,after_chunks=1") == Behaviour(
        Fault.ROLE_THEN_ERROR, status=502, after_chunks=1)
    assert parse_behaviour("healthy:token_interval=0.5,ignore_cancel=true") == Behaviour(
        token_interval=0.5, ignore_cancel=True)
    with pytest.raises(ValueError):
        parse_behaviour("healthy:nope=1")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f"""
seed = 3
token = "t"
[[provider]]
id = "old"
count = 2
version = "0.6.2"
script = ["role_then_error:status=500"]
churn = {{ every = 60.0, down_for = 5.0 }}
[provider.fault_mix]
"stall" = 0.25
[[provider.model]]
id = "gemma"
snapshot = "{SNAPSHOTS / 'gemma-upper'}"
behaviour = "stall_after_role"
[[provider.model]]
id = "broken"
snapshot = "{SNAPSHOTS / 'broken'}"
""")
    members, settings = load_fleet(fleet)
    assert settings["seed"] == 3
    assert [m.provider.provider_id for m in members] == ["old-0", "old-1"]
    first = members[0].provider
    assert first.version == "0.6.2" and first.token == "t"
    assert {m.id: m.template_render_ok for m in first.models} == {"gemma": True, "broken": False}
    assert first.model_behaviours["gemma"].fault is Fault.STALL_AFTER_ROLE
    assert "gemma" in first.templates
    assert next(iter(first.script)).fault is Fault.ROLE_THEN_ERROR
    assert first.fault_mix == ((0.25, Behaviour(Fault.STALL)),)
    assert members[0].churn is not None and members[0].churn.every == 60.0


async def test_http_mode_serves_the_same_behaviours():
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_http, "127.0.0.1", 0, Behaviour(), 5)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            plain = await client.post("/v1/chat/completions", json=body)
            assert plain.status_code == 200
            assert plain.json()["choices"][0]["message"]["content"].startswith("Hello from m")
            stream = await client.post("/v1/chat/completions", json={**body, "stream": True})
            assert stream.text.rstrip().endswith("data: [DONE]")
            messages = await client.post("/v1/messages", json={**body, "max_tokens": 5,
                                                               "stream": True})
            assert "event: message_stop" in messages.text
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_http, "127.0.0.1", 0,
                                  Behaviour(Fault.ERROR, status=503), 5)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            failed = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
            assert failed.status_code == 503
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("text", "says"), [
    ('[[provider]]\nid = "x"\nbehavior = "stall"\n', "unknown key(s) 'behavior'"),
    ('[[provider]]\nid = "x"\n[[provider.model]]\nid = "m"\nvison = true\n', "'vison'"),
    ('tokn = "t"\n', "'tokn'"),
    ('token =\n', "not TOML"),
    ('[[provider]]\nbehaviour = "bogus"\n', "unknown behaviour 'bogus'"),
    ('[[provider]]\nbehaviour = "healthy:tokens=abc"\n', "tokens='abc'"),
])
def test_a_fleet_file_that_is_wrong_says_where(tmp_path, text, says):
    # A misspelled key was ignored in silence, and the rest were tracebacks.
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(says)):
        load_fleet(path)


@pytest.mark.slow  # a load run over real sockets in real time
async def test_load_generator_smoke_against_the_demo_fleet():
    async with live_coordinator(providers=2) as (running, _):
        report = await run_load(running.http_url, key="test-key", model="sim-chat-small",
                                concurrency=4, duration=2.0, requests=40,
                                mix=Mix(stream=0.5, tools=0.5, images=0.0), show_progress=False)
        # Every endpoint gets bodies of its own shape, and its streams' own ending.
        others = {path: await run_load(running.http_url, key="test-key",
                                       model="sim-vision-large", concurrency=2, duration=2.0,
                                       requests=12, mix=Mix(stream=0.5, tools=0.5, images=0.5),
                                       path=path, show_progress=False)
                  for path in PATHS}
    assert report["requests"] == 40 and report["ok"] == 40
    assert report["success_rate"] == 1.0 and not report["errors"]
    assert report["first_byte_ms"]["p50"] > 0
    assert report["coordinator"]['coordinator_dispatch_total{result="success"}'] == 40
    assert "40 requests" in summary(report)
    for path, other in others.items():
        assert other["ok"] == 12 and not other["errors"], (path, other["errors"])


async def test_load_generator_without_a_key_sends_no_authorization():
    # An empty key made an illegal "Bearer " header: the run died on its first request.
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_http, "127.0.0.1", 0, Behaviour(), 5)
        report = await run_load(url, key="", model="m", concurrency=2, duration=2.0,
                                requests=6, mix=Mix(stream=0.5, tools=0.0),
                                show_progress=False)
        nursery.cancel_scope.cancel()
    assert report["ok"] == 6 and not report["errors"]


async def test_load_generator_refuses_non_loopback():
    with pytest.raises(SystemExit, match="loopback only"):
        await run_load("http://192.0.2.1:80", key="", model="m", concurrency=1, duration=1,
                       requests=1, mix=Mix(), show_progress=False)

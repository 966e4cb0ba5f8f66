"""provider-agent without a real engine: its pure parts, its key file, its command line, and
the agent in front of an OpenAI-compatible engine app in process (the simulator's HTTP
mode, through httpx's ASGI transport), under the coordinator's real edge in virtual time.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from quart import Response
from quart_trio import QuartTrio

from coordinator.protocol.endpoints import Endpoint
from provider_agent.catalog import Catalog, Wanted, discover
from provider_agent.engine import Engine, status_for
from provider_agent.provider import EngineProvider
from provider_agent.sse import EventSplitter, EventTooLarge, event_data
from provider_agent.usage import UsageCount
from provider_link.keys import KeyFileError, ProviderKeys, create_keys, load_keys
from provider_sim.behaviours import Behaviour, Fault
from provider_sim.http import create_http_app

from .harness import MODEL, Harness, open_harness

# ---- pure parts ------------------------------------------------------------------------

EVENTS = [b'data: {"a":1}\n\n', b'event: message_start\ndata: {"type":"message_start"}\n\n',
          b"data: [DONE]\n\n", b'data: {"b":"x\\ny"}\n\n']


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
@settings(max_examples=200)
def test_events_come_out_whole_however_the_bytes_are_cut(cuts):
    stream = b"".join(EVENTS)
    splitter, out, start = EventSplitter(1024), [], 0
    for cut in cuts:
        out += splitter.feed(stream[start:start + cut])
        start += cut
    out += splitter.feed(stream[start:])
    assert out == EVENTS and splitter.pending == b""


def test_an_event_that_never_ends_is_bounded():
    splitter = EventSplitter(100)
    with pytest.raises(EventTooLarge):
        for _ in range(10):
            splitter.feed(b"data: " + b"x" * 20)


def test_event_data_reads_json_done_and_nothing():
    assert event_data(EVENTS[0]) == {"a": 1}
    assert event_data(EVENTS[1]) == {"type": "message_start"}
    assert event_data(EVENTS[2]) == "[DONE]"
    assert event_data(b": a comment\n\n") is None
    assert event_data(b"data: {not json\n\n") is None


@pytest.mark.parametrize("events, expected", [
    ([{"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}], (5, 7)),
    ([{"type": "response.completed", "response": {"usage": {"input_tokens": 3,
                                                            "output_tokens": 4}}}], (3, 4)),
    ([{"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}},
      {"type": "message_delta", "usage": {"output_tokens": 12}}], (9, 12)),
    ([{"usage": {"prompt_tokens": -1, "completion_tokens": 10**12}}], (0, 0)),
    ([{"usage": {"prompt_tokens": True, "completion_tokens": "7"}}], (0, 0)),
])
def test_usage_is_read_in_every_format_and_only_plausible_counts(events, expected):
    usage = UsageCount()
    for event in events:
        usage.see(event)
    assert (usage.prompt_tokens, usage.completion_tokens) == expected


@pytest.mark.parametrize("engine, status", [
    (400, 400), (404, 404), (413, 413), (422, 422), (429, 429), (503, 503),
    (401, 502), (405, 502), (500, 502), (502, 502), (504, 502)])
def test_engine_statuses_become_what_the_coordinator_should_do(engine, status):
    assert status_for(engine) == status


# ---- the key file ----------------------------------------------------------------------


def test_a_key_file_is_made_once_private_and_read_back(tmp_path: Path):
    path = tmp_path / "deep" / "agent.json"
    made = create_keys(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_keys(path)
    assert again.signing_public_key == made.signing_public_key
    assert again.public_key == made.public_key
    with pytest.raises(KeyFileError, match="exists already"):
        create_keys(path)  # never a second identity over the first


@pytest.mark.parametrize("content, mode, says", [
    (None, 0o600, "no key file at"),
    (b"{}", 0o600, "not a provider key file"),
    (ProviderKeys.generate().dump(), 0o644, "open to other users"),
])
def test_a_key_file_that_cannot_be_used_says_why(tmp_path: Path, content, mode, says):
    path = tmp_path / "agent.json"
    if content is not None:
        path.write_bytes(content)
        path.chmod(mode)
    with pytest.raises(KeyFileError, match=says):
        load_keys(path)


# ---- the command line ------------------------------------------------------------------


def _agent(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "XDG_CONFIG_HOME": str(home)}
    environ.pop("PROVIDER_AGENT_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "provider_agent", *args], env=environ,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # a provider-agent process
@pytest.mark.parametrize("args, says", [
    (["--engine", "http://127.0.0.1:9", "--coordinator", "ws://127.0.0.1:9/", "--token", "t"],
     "no key file at"),
    (["--engine", "127.0.0.1:8080", "--coordinator", "ws://127.0.0.1:9/", "--token", "t"],
     "is not a http:// or https:// URL"),
    (["--engine", "http://127.0.0.1:9", "--coordinator", "http://127.0.0.1:9/", "--token",
      "t"], "is not a ws:// or wss:// URL"),
    (["--engine", "http://127.0.0.1:9", "--coordinator", "ws://127.0.0.1:9/"],
     "no provider token"),
    (["--engine", "http://127.0.0.1:9", "--coordinator", "ws://127.0.0.1:9/", "--token", "t",
      "--max-concurrency", "0"], "must be at least 1"),
])
def test_an_agent_that_cannot_start_says_why_in_one_line(tmp_path, args, says):
    done = _agent(*args, home=tmp_path)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.slow  # a provider-agent process
def test_init_makes_the_key_file_once(tmp_path):
    first = _agent("init", home=tmp_path)
    assert first.returncode == 0 and "keys written to" in first.stdout
    path = tmp_path / "trio-inference-coordinator" / "provider-agent.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = _agent("init", home=tmp_path)
    assert again.returncode == 2 and "exists already" in again.stderr


# ---- the agent in front of an engine app, in process -----------------------------------


def _engine(app: Any) -> Engine:
    return Engine("http://engine", transport=httpx.ASGITransport(app=app))


async def _agent_in(h: Harness, app: Any, provider_id: str = "agent",
                    **catalog: Any) -> EngineProvider:
    engine = _engine(app)
    found = await discover(engine, Wanted(calibrate=False))
    provider = EngineProvider(engine=engine, identity=ProviderKeys.generate(),
                              auth_token="provider-token", provider_id=provider_id,
                              catalog=Catalog(**{"models": found.models, "max_concurrency": 4,
                                                 **catalog}))
    await h.connect(provider)
    return provider


async def test_the_agent_relays_an_engine_s_answers_in_every_format(autojump_clock):
    async with open_harness() as h:
        await _agent_in(h, create_http_app(models=(MODEL,)))
        chat = await h.chat()
        assert chat.status == 200 and chat.headers["x-provider-id"] == "agent"
        assert chat.text.startswith("Hello from m1 on sim-http")
        assert chat.sse[-1] == (None, "[DONE]")
        whole = await h.chat(stream=False)
        assert whole.json()["choices"][0]["message"]["content"] == chat.text
        for path, body in [("/v1/completions", {"prompt": "hi"}),
                           ("/v1/responses", {"input": "hi"}),
                           ("/v1/messages", {"max_tokens": 16,
                                             "messages": [{"role": "user", "content": "hi"}]})]:
            for stream in (True, False):
                reply = await h.request(path, {"model": MODEL, "stream": stream, **body})
                assert reply.status == 200, (path, stream, reply.body)
                assert b"Hello" in reply.body and b"sim-http" in reply.body
        await h.assert_quiescent()


async def test_an_engine_s_4xx_reaches_the_consumer_and_its_5xx_fails_over(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        refuses = QuartTrio("refuses")
        status = [400]

        @refuses.route("/v1/models")
        async def models() -> Response:
            return Response(json.dumps({"data": [{"id": MODEL}]}), 200)

        @refuses.route("/v1/chat/completions", methods=["POST"])
        async def chat() -> Response:
            return Response(json.dumps({"error": {"message": "the prompt is too long for "
                                                  "the context", "code": status[0]}}), status[0])

        await _agent_in(h, refuses, "refuses", decode_tps=1000.0)
        too_long = await h.chat()
        assert too_long.status == 400 and "too long for the context" in too_long.body.decode()
        backup = await h.add_provider("backup", decode_tps=1.0)
        status[0] = 500
        served = await h.chat()
        assert served.status == 200 and served.headers["x-provider-id"] == "backup"
        assert served.headers["x-attempts"] == "2" and len(backup.received) == 1
        await h.assert_quiescent()


async def test_an_unreachable_engine_fails_over_and_the_agent_hears_of_it(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        app = create_http_app(models=(MODEL,))
        provider = await _agent_in(h, app, "agent", decode_tps=1000.0)
        backup = await h.add_provider("backup", decode_tps=1.0)

        def refuse(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        provider.engine = Engine("http://engine", transport=httpx.MockTransport(refuse))
        served = await h.chat()
        assert served.status == 200 and served.headers["x-provider-id"] == "backup"
        assert provider.engine_down.is_set()
        assert len(backup.received) == 1
        await h.assert_quiescent()


async def test_a_stream_the_engine_breaks_before_content_is_an_invisible_failover(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        crashes = create_http_app(Behaviour(Fault.ROLE_THEN_DISCONNECT), models=(MODEL,))
        await _agent_in(h, crashes, "agent", decode_tps=1000.0)
        await h.add_provider("backup", decode_tps=1.0)
        served = await h.chat()
        assert served.status == 200 and served.headers["x-provider-id"] == "backup"
        await h.assert_quiescent()


async def test_the_agent_advertises_only_the_endpoints_its_engine_serves(autojump_clock):
    only_chat = QuartTrio("only-chat")

    @only_chat.route("/v1/models")
    async def models() -> Response:
        return Response(json.dumps({"data": [{"id": MODEL}]}), 200)

    @only_chat.route("/v1/chat/completions", methods=["POST"])
    async def chat() -> Response:
        return Response(json.dumps({"error": {"message": "messages is required"}}), 400)

    found = await discover(_engine(only_chat), Wanted(calibrate=False))
    assert [m.endpoints for m in found.models] == [(Endpoint.CHAT.value,)]

"""Real-world defects at the edges, each reproduced black-box first (issue: real-world defects)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from quart import request as quart_request
from quart_trio import QuartTrio

from coordinator.api.exchange import _CONSUMER_GONE, Edge
from coordinator.api.transport import Connections
from coordinator.app import Running, serve
from coordinator.lifecycle import Drain
from provider_sim.behaviours import Behaviour
from provider_sim.fleet import demo_fleet, run_fleet

from .harness import API_KEY, MODEL, TOKEN, make_config, open_harness
from .memory_http import open_connection
from .simulation import _terminators, _text


async def _serve_fleet(nursery: trio.Nursery, providers: int = 1, **config: object) -> Running:
    running: Running = await nursery.start(
        serve, make_config(http_port=0, provider_port=0, **config))
    nursery.start_soon(run_fleet, demo_fleet(providers, token=TOKEN), running.provider_url)
    await running.registry.wait_for(lambda state: len(state.providers) >= providers)
    return running


def _address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].rstrip("/").rsplit(":", 1)
    return host, int(port)


def _request(body: bytes, key: str | None = API_KEY, length: int | None = None) -> bytes:
    auth = b"" if key is None else b"Authorization: Bearer " + key.encode() + b"\r\n"
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
            + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body) if length is None else length).encode() + b"\r\n\r\n" + body)


class _Reader:
    """Reads whole HTTP/1.1 responses (Content-Length framed) off a raw stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def response(self) -> tuple[int, dict[bytes, bytes], bytes] | None:
        """The next response, or None when the server closed the connection first."""
        while b"\r\n\r\n" not in self.buffer:
            data = await self._receive()
            if not data:
                return None
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(b":") for line in lines[1:])}
        length = int(headers.get(b"content-length", b"0"))
        while len(self.buffer) < length:
            data = await self._receive()
            if not data:
                return None
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        self.buffer += data
        return data


_GOOD = json.dumps({"model": "sim-chat-small",
                    "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.mark.parametrize(("first", "status"), [
    (_request(_GOOD, key=None), 401),
    (_request(_GOOD, key="wrong"), 401),
    (_request(b'{"model":"x","pad":"' + b"x" * 300_000 + b'"}'), 413),
    (_request(b'{"model":"sim-chat-small","messages":[{"content":"x"}],"pad":"'
              + b"x" * 100_000 + b'"}', key="wrong"), 401),
])
async def test_a_connection_never_hangs_after_an_early_error(autojump_clock, first, status):
    """Each early answer either keeps the connection usable or closes it at once."""
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, max_body_bytes=200_000)
        for _ in range(5):
            stream = await trio.open_tcp_stream(*_address(running.http_url))
            reader = _Reader(stream)
            # (The server may answer and close while the body is still going out.)
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(first)
            answer = await reader.response()
            assert answer is not None and answer[0] == status
            started = trio.current_time()
            try:
                await stream.send_all(_request(_GOOD))
            except trio.BrokenResourceError:
                follow_up = None
            else:
                follow_up = await reader.response()
            if follow_up is None:
                # Closed rather than answered: announced, and at once (no idle timeout).
                assert answer[1].get(b"connection") == b"close"
                assert trio.current_time() - started < 1.0
            else:
                assert follow_up[0] == 200
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_requests_without_a_body_keep_the_connection_alive(autojump_clock):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery)
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        reader = _Reader(stream)
        for path in (b"/healthz", b"/metrics", b"/v1/models", b"/healthz"):
            await stream.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n"
                                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n")
            answer = await reader.response()
            assert answer is not None and answer[0] == 200
            assert b"connection" not in answer[1]
        await stream.send_all(_request(_GOOD))
        answer = await reader.response()
        assert answer is not None and answer[0] == 200
        nursery.cancel_scope.cancel()


# ---- sizes: one contract ---------------------------------------------------------


def _chat_of(size: int) -> dict:
    """A chat body whose encoded length is exactly ``size`` bytes."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": ""}]}
    pad = size - len(json.dumps(body).encode())
    body["messages"][0]["content"] = "x" * pad
    assert len(json.dumps(body).encode()) == size
    return body


async def test_request_frames_go_only_to_providers_that_accept_them(autojump_clock):
    from coordinator import sizes
    from coordinator.api.requests import parse_body
    from coordinator.protocol.endpoints import Endpoint
    from coordinator.protocol.endpoints import inner_request as plaintext_body

    limit = 64 * 1024

    def frame_of(body: dict) -> int:
        raw = json.dumps(body).encode()
        return sizes.request_frame_bound(len(plaintext_body(parse_body(raw), Endpoint.CHAT)))

    low, high = 1000, limit  # the largest body whose frame fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if frame_of(_chat_of(middle)) <= limit else (low, middle - 1)
    fits, too_big = _chat_of(low), _chat_of(low + 3)
    assert frame_of(fits) <= limit < frame_of(too_big)
    async with open_harness() as h:
        small = await h.add_provider("small", max_request_bytes=limit)
        ok = await h.request("/v1/chat/completions", fits)
        assert ok.status == 200 and ok.headers["x-provider-id"] == "small"
        refused = await h.request("/v1/chat/completions", too_big)
        assert refused.status == 413 and "accept at most 65536 bytes" in refused.body.decode()
        assert small.closed_with is None and len(small.received) == 1
        await h.add_provider("large", max_request_bytes=4 * limit)
        routed = await h.request("/v1/chat/completions", too_big)
        assert routed.status == 200 and routed.headers["x-provider-id"] == "large"
        await h.assert_quiescent()


async def test_the_body_limit_is_exact(autojump_clock):
    async with open_harness(max_body_bytes=50_000) as h:
        await h.add_provider("p")
        assert (await h.request("/v1/chat/completions", _chat_of(50_000))).status == 200
        assert (await h.request("/v1/chat/completions", _chat_of(50_001))).status == 413


async def test_a_provider_frame_over_the_limit_fails_only_its_request(autojump_clock):
    async with open_harness(max_frame_bytes=8192, register_frame_bytes=4096,
                            request_buffer_bytes=8192, speculative_backup=False) as h:
        # A chunk of ~6 KiB fits; one of ~9 KiB does not (base64 grows it by a third).
        provider = await h.add_provider("p", behaviour=Behaviour(text="y" * 4000))
        assert (await h.chat(stream=False)).status == 200
        provider.behaviour = Behaviour(text="y" * 7000)
        failed = await h.chat(stream=False)
        assert failed.status == 503 and "exceeds the 8192-byte limit" in failed.body.decode()
        assert provider.closed_with is None
        provider.behaviour = Behaviour()
        assert (await h.chat(stream=False)).status == 200
        await h.assert_quiescent()


def test_sizes_must_be_consistent():
    with pytest.raises(ValueError, match="request_buffer_bytes"):
        make_config(max_frame_bytes=8 * 1024 * 1024, request_buffer_bytes=1024 * 1024)
    with pytest.raises(ValueError, match="register_frame_bytes"):
        make_config(max_frame_bytes=4096, register_frame_bytes=8192, request_buffer_bytes=8192)


# ---- deterministic 4xx from a provider ----------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_a_deterministic_4xx_ends_the_request_at_once(autojump_clock, status):
    from provider_sim.behaviours import Fault

    message = "prompt is 9000 tokens; the context is 8192"
    async with open_harness() as h:
        first = await h.add_provider("first", behaviour=Behaviour(
            Fault.ERROR, status=status, error_message=message), decode_tps=1000)
        other = await h.add_provider("other", decode_tps=10)
        for stream in (False, True):
            result = await h.chat(stream=stream)
            assert result.status == status
            assert result.json()["error"]["message"] == message
            assert result.json()["error"]["code"] == "provider_rejected_request"
        anthropic = await h.request("/v1/messages", {
            "model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]})
        assert anthropic.status == status
        assert anthropic.json()["type"] == "error"
        assert anthropic.json()["error"]["message"] == message
        assert len(first.received) == 3 and other.received == []  # never retried elsewhere
        assert not h.state.breaker.cooldowns(trio.current_time())  # and no strike
        await h.assert_quiescent()


@pytest.mark.parametrize(("status", "strike"), [(500, True), (502, True), (429, False),
                                                (503, False), (401, False)])
async def test_sickness_and_capacity_still_fail_over(autojump_clock, status, strike):
    from provider_sim.behaviours import Fault

    async with open_harness(breaker_strikes=1) as h:
        await h.add_provider("first", behaviour=Behaviour(Fault.ERROR, status=status),
                             decode_tps=1000)
        await h.add_provider("other", decode_tps=10)
        result = await h.chat(stream=False)
        assert result.status == 200 and result.headers["x-provider-id"] == "other"
        cooling = h.state.breaker.is_cooling(("first", MODEL, "base"), trio.current_time())
        assert cooling is strike


# ---- SSE-framed chunk payloads ------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages",
                                  "/v1/completions"])
async def test_sse_framed_payloads_are_understood(autojump_clock, path):
    bodies = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}]},
              "/v1/responses": {"input": "x"}, "/v1/completions": {"prompt": "x"},
              "/v1/messages": {"max_tokens": 30, "messages": [{"role": "user", "content": "x"}]}}
    async with open_harness() as h:
        await h.add_provider("framed", sse_chunks=True)
        streamed = await h.request(path, {"model": MODEL, "stream": True, **bodies[path]})
        assert streamed.status == 200
        assert "data: data:" not in streamed.body.decode()
        assert _text(path, streamed, True).startswith("Hello from m1 on framed")
        assert _terminators(path, streamed) == 1
        whole = await h.request(path, {"model": MODEL, "stream": False, **bodies[path]})
        assert whole.status == 200
        assert _text(path, whole, False).startswith("Hello from m1 on framed")


async def test_sse_framed_boilerplate_is_still_held(autojump_clock):
    from provider_sim.behaviours import Fault

    async with open_harness() as h:
        await h.add_provider("framed", sse_chunks=True, decode_tps=1000,
                             behaviour=Behaviour(Fault.ROLE_THEN_ERROR))
        await h.add_provider("good", decode_tps=10)
        result = await h.chat()
        assert result.status == 200 and result.headers["x-provider-id"] == "good"
        assert result.headers["x-attempts"] == "2"


@pytest.mark.parametrize(("raw", "kind"), [
    ('data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n', "boilerplate"),
    ('data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
     'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', "content"),
    ("data: [DONE]\n\n", "terminal"),
    (': keep-alive\n\ndata: {"choices":[{"delta":{"content":"a"}}]}\n\n', "content"),
    ('event: x\ndata: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n', "content"),
])
def test_sse_payload_parsing(raw, kind):
    from coordinator.dispatch.chunks import parse_chunk
    from coordinator.protocol.endpoints import Endpoint

    assert parse_chunk(Endpoint.CHAT, raw).kind.value == kind


@pytest.mark.parametrize("raw", ["data: data: {}\n\n", "data: {}\n\ngarbage", "data: [1]",
                                 "data: {\n\n"])
def test_malformed_sse_payloads_are_provider_errors(raw):
    from coordinator.dispatch.chunks import ChunkError, parse_chunk
    from coordinator.protocol.endpoints import Endpoint

    with pytest.raises(ChunkError):
        parse_chunk(Endpoint.CHAT, raw)


# ---- small operator-facing defects ---------------------------------------------------


async def test_the_cooldown_gauge_agrees_with_the_status_page(autojump_clock):
    from provider_sim.behaviours import Fault

    async with open_harness(breaker_strikes=1) as h:
        for name in ("a", "b"):
            await h.add_provider(name, behaviour=Behaviour(Fault.ERROR, status=500))
        await h.chat(stream=False)  # both fail once: both cool down
        metrics = h.coordinator.metrics.render().decode()
        assert "coordinator_cooldowns_active 2.0" in metrics
        for name in ("a", "b"):
            h.kill(name)
            await h.wait_gone(name)
        snapshot = await h.registry.snapshot()
        assert not any(p.cooldowns for p in snapshot.providers)
        assert "coordinator_cooldowns_active 0.0" in h.coordinator.metrics.render().decode()
        await trio.sleep(10_000)  # and cooldowns that expire leave the gauge by themselves
        assert "coordinator_cooldowns_active 0.0" in h.coordinator.metrics.render().decode()


# ---- graceful drain ----------------------------------------------------------------


async def test_drain_lets_streams_finish_then_ends_the_rest(autojump_clock):
    from provider_sim.behaviours import Fault

    async with open_harness(drain_timeout=30.0) as h:
        short = await h.add_provider("short", behaviour=Behaviour(token_interval=1.0, tokens=10))
        long = await h.add_provider("long", behaviour=Behaviour(token_interval=1.0, tokens=100))
        # Accepted (a cold load: a 600 s budget), then silent: still waiting at the deadline.
        stuck = await h.add_provider("stuck", behaviour=Behaviour(Fault.STALL, accepted_delay=0.0))
        results: dict[str, object] = {}

        async def ask(name: str, **extra: object) -> None:
            results[name] = await h.chat(provider_ids=[name], **extra)

        async with trio.open_nursery() as nursery:
            for name in ("short", "long"):
                nursery.start_soon(ask, name)
            nursery.start_soon(ask, "stuck")
            await h.until(lambda: short.received and long.received and stuck.received)
            start = trio.current_time()
            nursery.start_soon(h.coordinator.shutdown)
            await h.until(lambda: h.coordinator.drain.draining)
            refused = await h.chat()
            assert refused.status == 503 and refused.headers["retry-after"]
            assert refused.json()["error"]["code"] == "shutting_down"
        assert trio.current_time() - start < 32.0
        finished, cut, waiting = results["short"], results["long"], results["stuck"]
        assert finished.status == 200 and "error" not in finished.body.decode()  # type: ignore[attr-defined]
        assert finished.sse[-1][1] == "[DONE]"  # type: ignore[attr-defined]
        assert cut.status == 200 and "shutting down" in cut.body.decode()  # type: ignore[attr-defined]
        assert [d for _, d in cut.sse].count("[DONE]") == 1  # type: ignore[attr-defined]
        assert waiting.status == 503  # type: ignore[attr-defined]
        for provider in (short, long, stuck):
            assert provider.closed_with == 1001
        assert stuck.cancelled and long.cancelled  # told to stop, not abandoned


async def test_a_drain_with_nothing_in_flight_is_immediate(autojump_clock):
    async with open_harness() as h:
        provider = await h.add_provider("p")
        assert (await h.chat()).status == 200
        start = trio.current_time()
        await h.coordinator.shutdown()
        assert trio.current_time() - start < 2.0
        assert provider.closed_with == 1001
        health = await h.request("/healthz", method="GET")
        assert health.status == 503 and health.json()["status"] == "draining"
        # A provider arriving now is turned away at the handshake, with a reason.
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                client, server = trio.testing.memory_stream_pair()
                nursery.start_soon(h._serve_edge, nursery, server)
                await trio_websocket.wrap_client_stream(nursery, client, "c", "/")
                await trio.sleep_forever()
        rejected = caught.value.subgroup(trio_websocket.ConnectionRejected)
        assert rejected is not None
        while isinstance(rejected, BaseExceptionGroup):
            rejected = rejected.exceptions[0]
        assert rejected.status_code == 503 and rejected.body == b"not admitting providers now"
        assert set(h.state.providers) == set()


# ---- the command line: signals and operator errors -------------------------------------


def _run_coordinator(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    environ.update({"COORDINATOR_API_KEYS": "k", "COORDINATOR_PROVIDER_TOKENS": "t",
                    **(env or {})})
    return subprocess.Popen([sys.executable, "-m", "coordinator", *args], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # a coordinator process
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_and_exits_0_without_a_traceback(signum):
    process = _run_coordinator("serve", "--port", "0", "--provider-port", "0")
    assert process.stdout is not None
    for line in process.stdout:  # wait until it serves
        if line.startswith("coordinator: HTTP on"):
            break
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "draining" in out and "coordinator stopped" in out


@pytest.mark.slow  # a coordinator process
@pytest.mark.parametrize(("args", "env", "names"), [
    (["--port", "70000"], {}, "--port"),
    (["--log-level", "LOUD"], {}, "--log-level"),
    ([], {"COORDINATOR_QUEUE_MAX": "abc"}, "COORDINATOR_QUEUE_MAX"),
    ([], {"COORDINATOR_CAPABILITY_FLOORS": "tools"}, "COORDINATOR_CAPABILITY_FLOORS"),
    ([], {"COORDINATOR_SPECULATIVE_BACKUP": "maybe"}, "COORDINATOR_SPECULATIVE_BACKUP"),
    ([], {"COORDINATOR_TTFT_BASE": "-5"}, "COORDINATOR_TTFT_BASE"),
    ([], {"COORDINATOR_BACKUP_FRACTION": "2"}, "COORDINATOR_BACKUP_FRACTION"),
    # A misspelled trait silently dropped the floor it meant (the default tools floor too).
    ([], {"COORDINATOR_CAPABILITY_FLOORS": "tool=0.6.3"}, "'tool' is not a trait"),
    ([], {"COORDINATOR_CAPABILITY_FLOORS": "tools=abc"}, "'abc' is not a version"),
    # A binding whose key is no key was a traceback from inside the running app.
    ([], {"COORDINATOR_PROVIDER_BINDINGS": "x=notbase64"}, "COORDINATOR_PROVIDER_BINDINGS"),
    ([], {"COORDINATOR_PROVIDER_BINDINGS": "x=QUJD"}, "must be 32 bytes"),
    # Sizes that contradict each other name the variable set and the values.
    ([], {"COORDINATOR_REGISTER_FRAME_BYTES": "2000", "COORDINATOR_MAX_FRAME_BYTES": "1500"},
     "COORDINATOR_REGISTER_FRAME_BYTES='2000': must be between 1024 and max_frame_bytes "
     "(1500), not 2000"),
])
def test_operator_errors_are_one_line_and_exit_2(args, env, names):
    process = _run_coordinator("serve", "--provider-port", "0", *args, env=env)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert names in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if names in line]) == 1


@pytest.mark.slow  # a coordinator process
def test_a_port_in_use_names_the_listener():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag, what in (("--port", "HTTP"), ("--provider-port", "providers")):
            other = "--provider-port" if flag == "--port" else "--port"
            process = _run_coordinator("serve", flag, str(port), other, "0")
            _, err = process.communicate(timeout=60)
            assert process.returncode == 2
            assert f"cannot listen for {what} on 127.0.0.1:{port}" in err
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # a coordinator process
def test_an_unreadable_pins_file_is_one_line_and_exit_2(tmp_path):
    process = _run_coordinator("serve", "--port", "0", "--provider-port", "0",
                               env={"COORDINATOR_IDENTITY_PINS_FILE": str(tmp_path)})
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"identity_pins_file {tmp_path}: Is a directory" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # a coordinator process
def test_an_unknown_variable_gets_a_warning_naming_the_closest():
    process = _run_coordinator("serve", env={"COORDINATOR_QUEUE_MAXX": "1",
                                             "COORDINATOR_TTFT_BASE": "-1"})
    _, err = process.communicate(timeout=60)
    assert "COORDINATOR_QUEUE_MAXX is not a coordinator setting; did you mean " \
           "COORDINATOR_QUEUE_MAX?" in err


async def test_several_events_in_one_frame_are_relayed_as_sent(autojump_clock):
    async with open_harness() as h:
        batched = await h.add_provider("batched", events_per_frame=8)
        for path, body in [("/v1/chat/completions", {"messages": [{"role": "user",
                                                                   "content": "x"}]}),
                           ("/v1/responses", {"input": "x"})]:
            streamed = await h.request(path, {"model": MODEL, "stream": True, **body})
            assert _text(path, streamed, True).startswith("Hello from m1 on batched")
            assert _terminators(path, streamed) == 1
            whole = await h.request(path, {"model": MODEL, "stream": False, **body})
            assert _text(path, whole, False).startswith("Hello from m1 on batched")
        single = await h.add_provider("single")
        before = (batched.frames_sent, single.frames_sent)
        for name in ("batched", "single"):
            assert (await h.chat(provider_ids=[name])).status == 200
        sent_batched = batched.frames_sent - before[0]
        sent_single = single.frames_sent - before[1]
        assert sent_batched <= 3 < 8 <= sent_single  # 11 events: 2 frames (+ complete) vs 12


def _simulator_says(coordinator_url: str, token: str, expected: str) -> str:
    """Run ``provider-sim fleet`` until its log shows ``expected``; its whole output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    sim = subprocess.Popen([sys.executable, "-m", "provider_sim", "fleet", "--ephemeral-keys", "--n", "1",
                            "--token", token, "--coordinator", coordinator_url], env=environ,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    give_up = threading.Timer(30, sim.kill)  # so the loop below ends even if it never says it
    give_up.start()
    try:
        assert sim.stdout is not None
        for line in sim.stdout:
            seen.append(line)
            if expected in line:
                break
    finally:
        give_up.cancel()
        sim.send_signal(signal.SIGINT)
        rest, _ = sim.communicate(timeout=30)
    return "".join(seen) + rest


@pytest.mark.slow  # coordinator and provider-sim processes
def test_the_simulator_tells_its_user_why_it_does_not_serve():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"ws://127.0.0.1:{s.getsockname()[1]}/"
    said = _simulator_says(closed, "t", "Connection refused")
    assert f"sim-0: cannot connect to {closed}" in said and "Connection refused" in said, said
    process = _run_coordinator("serve", "--port", "0", "--provider-port", "0")
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("coordinator: HTTP on"):
                providers = line.rsplit(" ", 1)[1].strip()
                break
        said = _simulator_says(providers, "wrong-token", "closed the connection")
        assert "the coordinator closed the connection: 1008 invalid provider token" in said, said
        said = _simulator_says(providers, "t", "registered")
        assert "Traceback" not in said and "sim-0: registered" in said, said
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


async def test_a_consumer_gone_before_its_answer_is_no_error(autojump_clock, caplog):
    """The consumer hangs up after sending its request; only then is the handler's
    answer ready. quart 0.23 (Python 3.13) raises ``ClientDisconnectedError`` out of
    the app when the hang-up is heard between the handler's return and the response's
    first write (CI found it as a raw request closed right after its body); quart 0.22
    writes the answer to the connection the consumer left. Either way the consumer
    left: nothing is logged as an error, no 500 is written, the connection closes."""
    app = QuartTrio("edge-test")
    heard = trio.Event()
    answered: list[str] = []

    @app.post("/echo")
    async def echo() -> tuple[str, int]:
        await quart_request.get_data()
        with trio.CancelScope(shield=True):  # a handler that does not notice the hang-up
            await heard.wait()
        answered.append("late answer")
        return "late answer", 400

    async def hearing(scope: dict[str, object], receive: Any, send: Any) -> None:
        async def receive_and_note() -> dict[str, object]:
            message: dict[str, object] = await receive()
            if message["type"] == "http.disconnect":
                heard.set()
            return message

        await app(scope, receive_and_note, send)

    table = Connections(5.0)
    with caplog.at_level("DEBUG", logger="coordinator"):
        async with open_connection(Edge(hearing, Drain()), table) as connection:
            await connection.client.send_all(b"POST /echo HTTP/1.1\r\nHost: edge\r\n"
                                              b"Content-Length: 1\r\n\r\nx")
            await connection.client.send_eof()  # the consumer hangs up (we still read)
            written = await connection.rest()
    assert heard.is_set() and answered == ["late answer"]  # ready after the hang-up
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert connection.slots.value == 1 and not table.open  # closed, its slot given back
    if _CONSUMER_GONE:  # quart 0.23: nothing is written, the edge says why at DEBUG
        assert written == b""
        assert "consumer left before its answer was sent" in caplog.text
    else:  # quart 0.22: the answer goes to a connection nobody reads, as it is
        assert written.startswith(b"HTTP/1.1 400 ") and written.endswith(b"late answer")


async def test_a_large_body_is_parsed_off_the_event_loop(autojump_clock, monkeypatch):
    # A 7.5 MB body of tiny nested arrays took seconds of pure Python to parse: on the
    # event loop it stalled every other request (/healthz waited 15.8 s under four).
    from coordinator.api import routes

    threads: list[bool] = []
    prepare = routes.Api._prepare

    def watched(self: routes.Api, *args: object) -> object:
        threads.append(threading.current_thread() is not threading.main_thread())
        return prepare(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(routes.Api, "_prepare", watched)
    monkeypatch.setattr(routes, "PARSE_IN_THREAD_BYTES", 200)
    async with open_harness() as h:
        await h.add_provider("p")
        small = await h.chat(stream=False)
        large = await h.chat(stream=False, x=[[[1]]] * 100)
        broken = await h.request("/v1/chat/completions", raw=b'{"model": "m1", ' + b" " * 300)
    assert small.status == 200 and large.status == 200, large.body
    assert broken.status == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    assert threads == [False, True, True]  # small on the loop; large and broken in a thread


# ---- HTTP/1 framing at the listener (issue 22, item 10) -------------------------------


def _http10(path: bytes = b"/healthz", *headers: bytes, body: bytes = b"") -> bytes:
    lines = [b"POST " + path + b" HTTP/1.0" if body else b"GET " + path + b" HTTP/1.0",
             *headers]
    if body:
        lines += [b"Authorization: Bearer " + API_KEY.encode(),
                  b"Content-Length: " + str(len(body)).encode()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _chunked_head(path: bytes = b"/v1/chat/completions", *headers: bytes) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"Transfer-Encoding: chunked\r\n\r\n")


async def _until_closed(stream: trio.SocketStream) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took."""
    start, data = trio.current_time(), b""
    with trio.fail_after(120):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                return data, trio.current_time() - start
            data += chunk


def _statuses(data: bytes) -> list[int]:
    return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


@pytest.mark.parametrize("pipelined", [
    [_http10(b"/healthz", b"Connection: keep-alive")] * 2,
    [_http10(b"/v1/chat/completions", b"Connection: keep-alive", body=_GOOD)] * 2,
    [_request(_GOOD)[:-len(_GOOD) - 4] + b"\r\nConnection: close\r\n\r\n" + _GOOD,
     b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"],
])
async def test_a_request_pipelined_after_one_that_ends_the_connection_leaves_it_answered(
        autojump_clock, caplog, pipelined):
    # hypercorn's h11 took the second request for garbage after the first and answered
    # the pair with one bare 400: the first, valid request went unanswered.
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery)
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        await stream.send_all(b"".join(pipelined))
        data, took = await _until_closed(stream)
        assert _statuses(data) == [200], data[:300]  # the first answered, then closed
        assert took < 1.0
        await stream.aclose()
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        await stream.send_all(pipelined[0])  # the listener serves on
        assert _statuses((await _until_closed(stream))[0]) == [200]
        nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_request_with_both_lengths_is_refused_and_its_connection_closed(autojump_clock):
    # RFC 9112 §6.3: Content-Length with Transfer-Encoding may be a smuggling attempt; the
    # request was served and the connection kept for whatever followed the chunked body.
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery)
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        await stream.send_all(_chunked_head(b"/v1/chat/completions", b"Content-Length: 4")
                              + b"%x\r\n%s\r\n0\r\n\r\n" % (len(_GOOD), _GOOD)
                              + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data, took = await _until_closed(stream)
        assert _statuses(data) == [400] and took < 1.0, data[:300]
        assert b"connection: close" in data.lower()
        assert b"both Content-Length and Transfer-Encoding" in data
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("path", "pieces"), [
    (b"/v1/chat/completions", [b"f" * 20 + b"\r\nabc"]),
    (b"/v1/chat/completions", [b"1\r\n{\r\n", b"%x\r\n" % 200_000]),  # while the body is read
    (b"/v1/messages", [b"%x\r\n" % 150_000 + b"x" * 150_000 + b"\r\n", b"%x\r\n" % 60_000]),
])
async def test_a_chunk_announcing_more_than_the_body_limit_is_refused_at_once(
        autojump_clock, path, pieces):
    # Such a chunk held its request, and a connection slot, for the 60 s body timeout.
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, max_body_bytes=200_000)
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        await stream.send_all(_chunked_head(path))
        for piece in pieces:
            await trio.sleep(0.5)  # a scripted delay: the application is reading by now
            await stream.send_all(piece)
        data, took = await _until_closed(stream)
        assert _statuses(data) == [413] and took < 1.0, data[:300]
        body = json.loads(data.partition(b"\r\n\r\n")[2].split(b"\r\n")[1])
        if path == b"/v1/messages":
            assert body["error"]["type"] == "request_too_large"
        else:
            assert body["error"]["code"] == "request_too_large"
        nursery.cancel_scope.cancel()

"""Regression tests for the attacks of the security review: each failed before its fix.

Crashes (the whole process used to die), identity takeover, exhaustion, and
provider output that used to become 500s or broken streams. Each test drives
the attack through the real edges and then checks the coordinator still
serves the next request.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import struct
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.settings
import nacl.signing
import pytest
import trio
import trio.testing
import trio_websocket
import wsproto
import wsproto.frame_protocol

from coordinator.app import serve
from coordinator.cluster import entries, shared
from coordinator.cluster.peer import PeerLink, PeerServer
from coordinator.protocol import (
    EncryptedPayload,
    InferenceComplete,
    InferenceResponseChunk,
    Usage,
    encode_frame,
)
from coordinator.providers.connection import ProviderConnection
from coordinator.providers.handshakes import GRACE, capped
from coordinator.providers.identity import key_id
from provider_sim.behaviours import Behaviour, Fault
from provider_sim.fleet import demo_fleet, run_fleet
from provider_sim.provider import SimProvider

from .harness import ADMIN_KEY, API_KEY, MODEL, TOKEN, Harness, make_config, model, open_harness


class _Errors(logging.Handler):
    """Collects ERROR records (and any traceback) from the coordinator's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture
def errors() -> _Errors:
    handler = _Errors()
    root = logging.getLogger("coordinator")
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


async def _raw_socket(h: Harness, nursery: trio.Nursery) -> trio_websocket.WebSocketConnection:
    """A client WebSocket to the provider edge that has not registered."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(h._serve_edge, nursery, server_stream)
    return await trio_websocket.wrap_client_stream(nursery, client_stream, "c", "/")


async def _closed_with(ws: trio_websocket.WebSocketConnection) -> int | None:
    try:
        while True:
            await ws.get_message()
    except trio_websocket.ConnectionClosed as exc:
        return exc.reason.code if exc.reason else None


async def _still_serves(h: Harness) -> None:
    result = await h.chat(stream=False)
    assert result.status == 200, result.body
    assert result.json()["choices"][0]["message"]["content"]


# ---- inputs that used to end the process ------------------------------------------


async def test_deeply_nested_frame_before_admission_closes_only_that_socket(
        autojump_clock, errors):
    async with open_harness() as h:
        await h.add_provider("p")
        async with trio.open_nursery() as nursery:
            ws = await _raw_socket(h, nursery)
            await ws.send_message("[" * 1000)
            assert await _closed_with(ws) == 1008
            nursery.cancel_scope.cancel()
        await _still_serves(h)
    assert not errors.records


async def test_deeply_nested_heartbeat_after_admission_is_one_rejected_frame(
        autojump_clock, errors):
    async with open_harness() as h:
        provider = await h.add_provider("p")
        assert provider.current_ws is not None
        await provider.current_ws.send_message('{"type":"heartbeat","x":' + "[" * 5000 + "}")
        await provider.current_ws.send_message("[" * 100_000)
        await _still_serves(h)
        assert provider.closed_with is None
        rejected = h.coordinator.metrics.frames_rejected.labels("malformed")._value.get()
        assert rejected == 2
    assert not errors.records


async def test_a_provider_sending_garbage_in_a_loop_is_counted_not_logged_each_time(
        autojump_clock, caplog):
    async with open_harness() as h:
        provider = await h.add_provider("p")
        assert provider.current_ws is not None
        for _ in range(50):
            await provider.current_ws.send_message("not json")
        await _still_serves(h)  # its answer came after them on the same socket
        assert h.coordinator.metrics.frames_rejected.labels("malformed")._value.get() == 50
    said = [r for r in caplog.records if r.name == "coordinator.providers.edge"
            and r.levelno == logging.WARNING and "rejected frame" in r.getMessage()]
    assert len(said) == 11 and "counted" in said[-1].getMessage()


@pytest.mark.parametrize("token", ["é", "\ud800", "x" * 10_000])
async def test_odd_provider_tokens_are_refused_with_1008(autojump_clock, errors, token):
    async with open_harness() as h:
        intruder = SimProvider("intruder", (model(),), token=token)
        await h.connect(intruder, wait=False)
        await h.until(lambda: intruder.closed_with is not None)
        assert intruder.closed_with == 1008
        await h.add_provider("p")
        await _still_serves(h)
    assert not errors.records


@pytest.mark.parametrize("kind", [[0.5, [], None], {"a": 1}])
async def test_a_content_part_whose_type_is_not_a_string_is_no_500(autojump_clock, errors, kind):
    # Found by the 100,000-example campaign (bodies, /v1/messages): the prompt-size
    # estimate looked an unhashable "type" up in a set, a TypeError and a 500.
    async with open_harness() as h:
        await h.add_provider("p")
        reply = await h.request("/v1/messages", {
            "model": "m1", "max_tokens": 16, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hello"}, {"type": kind}]}]})
        assert reply.status in (200, 400), reply.body
        await _still_serves(h)
    assert not errors.records


@pytest.mark.parametrize("number", [b"1e400", b"-1e999", b"1.7976931348623159e308"])
async def test_a_number_too_large_for_a_float_is_a_400(autojump_clock, errors, number):
    # It parsed to infinity and reached the provider as the bare word Infinity (not
    # JSON): a strict provider fails such a request, and its failures are strikes.
    async with open_harness() as h:
        await h.add_provider("p")
        reply = await h.request("/v1/chat/completions", raw=b'{"model":"m1","temperature":%s,'
                                b'"messages":[{"role":"user","content":"x"}]}' % number)
        assert reply.status == 400 and "out of range" in reply.json()["error"]["message"]
        assert (await h.chat(stream=False, temperature=1e308)).status == 200
    assert not errors.records


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
async def test_huge_max_tokens_is_a_400_and_the_registry_lives(autojump_clock, errors, field):
    async with open_harness() as h:
        await h.add_provider("p")
        digits = b'{"model":"m1","messages":[{"role":"user","content":"x"}],"%s":%s}' % (
            field.encode(), b"9" * 310)
        huge = await h.request("/v1/chat/completions", raw=digits)
        assert huge.status == 400
        assert "digits" in huge.json()["error"]["message"]
        big = await h.chat(stream=False, **{field: 10**12})
        assert big.status == 400
        assert big.json()["error"]["message"] == f"'{field}' must be at most 1000000"
        await _still_serves(h)
    assert not errors.records


async def test_a_failing_registry_message_gets_an_error_and_the_actor_lives(
        autojump_clock, monkeypatch):
    from coordinator.registry import scheduler

    async with open_harness() as h:
        await h.add_provider("p")
        real = scheduler.job_cost
        calls = 0

        def broken_once(record, job, now=None):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 1:
                raise OverflowError("simulated bug")
            return real(record, job, now)

        monkeypatch.setattr(scheduler, "job_cost", broken_once)
        failed = await h.chat(stream=False)
        assert failed.status == 500
        assert failed.json()["error"]["code"] == "internal_error"
        await _still_serves(h)
        await h.assert_quiescent()


async def test_non_ascii_api_key_is_a_401(autojump_clock, errors):
    async with open_harness() as h:
        await h.add_provider("p")
        for key in ("é", "\u00ff" * 3, "ключ"):
            result = await h.request("/v1/chat/completions", {"model": MODEL},
                                     headers={"authorization": f"Bearer {key}"})
            assert result.status == 401
            assert result.json()["error"]["type"] == "authentication_error"
            result = await h.request("/v1/chat/completions", {"model": MODEL},
                                     headers={"x-api-key": key, "authorization": ""})
            assert result.status == 401
        await _still_serves(h)
    assert not errors.records


# ---- identity -------------------------------------------------------------------------


async def test_takeover_by_claiming_another_providers_id_is_refused(autojump_clock, errors):
    async with open_harness(speculative_backup=False) as h:
        victim = await h.add_provider("prov-A", behaviour=Behaviour(token_interval=1.0, tokens=20))
        async with trio.open_nursery() as nursery:
            in_flight: list = []

            async def stream() -> None:
                in_flight.append(await h.chat())

            nursery.start_soon(stream)
            await h.until(lambda: len(victim.received) == 1)
            thief = SimProvider("prov-A", (model(),), token=TOKEN)  # its own keys
            await h.connect(thief, wait=False)
            await h.until(lambda: thief.closed_with is not None)
        assert thief.closed_with == 1008
        assert victim.closed_with is None
        [result] = in_flight
        assert result.status == 200 and "error" not in result.body.decode()
        assert h.state.providers["prov-A"].session == victim_session(h, victim)
        pinned = await h.chat(stream=False, provider_ids=["prov-A"])
        assert pinned.status == 200 and pinned.headers["x-provider-id"] == "prov-A"
        assert len(victim.received) == 2 and thief.received == []
    assert not errors.records


def victim_session(h: Harness, provider: SimProvider) -> int:
    return h.state.providers[provider.provider_id].session


async def test_nobody_can_register_another_providers_encryption_key(autojump_clock):
    async with open_harness() as h:
        victim = await h.add_provider("prov-A")
        copycat = SimProvider("copycat", (model(),), token=TOKEN, key=victim._key)
        await h.connect(copycat, wait=False)
        await h.until(lambda: copycat.closed_with is not None)
        assert copycat.closed_with == 1008
        assert "copycat" not in h.state.providers and victim.closed_with is None


@attrs.define(eq=False)
class _Squatter(SimProvider):
    """Registers another provider's X25519 public key, without its private half."""

    squatted: str = ""

    @property
    def public_key(self) -> str:
        return self.squatted


async def test_nobody_can_take_an_offline_providers_encryption_key(autojump_clock):
    # The challenge's signature covers the encryption key, but anyone can sign somebody
    # else's public key: a token holder registered an offline provider's key under its
    # own id, and (keys being unique) that provider was refused until the squatter left.
    async with open_harness() as h:
        victim = await h.add_provider("prov-A")
        h.kill("prov-A")
        await h.wait_gone("prov-A")
        squatter = _Squatter("squatter", (model(),), token=TOKEN, squatted=victim.public_key)
        await h.connect(squatter, wait=False)
        with trio.fail_after(60):  # within the challenge's budget, not never
            await h.until(lambda: squatter.closed_with is not None)
        assert squatter.closed_with == 1008 and "squatter" not in h.state.providers
        back = SimProvider("prov-A", (model(),), token=TOKEN, key=victim._key,
                           signing=victim.signing_key)
        await h.connect(back)
        assert back.closed_with is None
        await _still_serves(h)


async def test_without_an_id_a_provider_is_named_after_its_signing_key(autojump_clock):
    async with open_harness() as h:
        anonymous = SimProvider("ignored", (model(),), token=TOKEN)
        anonymous.provider_id = None  # type: ignore[assignment]
        await h.connect(anonymous, wait=False)
        derived = key_id(anonymous.register_message().signing_public_key or "")
        await h.until(lambda: derived in h.state.providers)
        # Claiming that derived id with another key is refused.
        thief = SimProvider(derived, (model(),), token=TOKEN)
        await h.connect(thief, wait=False)
        await h.until(lambda: thief.closed_with is not None)
        assert thief.closed_with == 1008 and anonymous.closed_with is None


async def test_an_operator_can_remove_a_pin_and_bind_ids_up_front(autojump_clock):
    bound = nacl.signing.SigningKey.generate()
    bound_b64 = SimProvider("x", (model(),), signing=bound).register_message().signing_public_key
    async with open_harness(provider_bindings={"fixed": bound_b64}) as h:
        first = await h.add_provider("prov-A")
        h.kill("prov-A")
        await h.wait_gone("prov-A")
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        assert (await h.request("/v1/admin/providers/prov-A/pin", method="DELETE")).status == 401
        # Not with the key in the URL, which the status page takes: a link must not act.
        assert (await h.request(f"/v1/admin/providers/prov-A/pin?key={ADMIN_KEY}",
                                method="DELETE")).status == 401
        removed = await h.request("/v1/admin/providers/prov-A/pin", method="DELETE", headers=admin)
        assert removed.status == 200 and removed.json()["pin"] == "removed"
        again = await h.request("/v1/admin/providers/prov-A/pin", method="DELETE", headers=admin)
        assert again.status == 404
        configured = await h.request("/v1/admin/providers/fixed/pin", method="DELETE",
                                     headers=admin)
        assert configured.status == 409
        rekeyed = await h.add_provider("prov-A")  # a new key may now claim the id
        assert rekeyed.signing_key is not first.signing_key
        wrong = SimProvider("fixed", (model(),), token=TOKEN)
        await h.connect(wrong, wait=False)
        await h.until(lambda: wrong.closed_with is not None)
        assert wrong.closed_with == 1008
        await h.add_provider("fixed", signing=bound)


@pytest.mark.parametrize(("field", "value"), [
    ("version", "0.7.0\r\nX-Evil: 1"),
    ("provider_id", "a b"),
    ("provider_id", "x" * 65),
])
async def test_header_bound_fields_are_validated_at_registration(autojump_clock, field, value):
    async with open_harness() as h:
        kwargs = {"version": value} if field == "version" else {}
        provider_id = value if field == "provider_id" else "odd"
        odd = SimProvider(provider_id, (model(),), token=TOKEN, **kwargs)
        await h.connect(odd, wait=False)
        await h.until(lambda: odd.closed_with is not None)
        assert odd.closed_with == 1008
        assert not h.state.providers


async def test_declared_speeds_are_clamped_to_a_plausible_range(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("liar", decode_tps=1e308, prefill_tps=1e308)
        await h.add_provider("honest", decode_tps=5000.0, prefill_tps=500_000.0)
        record = h.state.providers["liar"]
        assert record.decode_tps == 5000.0 and record.prefill_tps == 500_000.0
        served = {(await h.chat(stream=False)).headers["x-provider-id"] for _ in range(20)}
        assert served == {"liar", "honest"}  # a near-tie: load is spread, not captured


async def test_model_names_are_bounded_and_forgotten(autojump_clock):
    async with open_harness(max_models_per_provider=3, model_forget_after=60.0) as h:
        greedy = SimProvider("greedy", tuple(model(f"m{i}") for i in range(4)), token=TOKEN)
        await h.connect(greedy, wait=False)
        await h.until(lambda: greedy.closed_with is not None)
        assert greedy.closed_with == 1008
        await h.add_provider("p", model("gone"))
        h.kill("p")
        await h.wait_gone("p")
        # Remembered for a while: a request waits in the queue for its providers...
        with trio.move_on_after(1):
            await h.chat(stream=False, model_id="gone")
        await trio.sleep(60)
        # ...then forgotten: 404 at once.
        result = await h.chat(stream=False, model_id="gone")
        assert result.status == 404


# ---- exhaustion -------------------------------------------------------------------


async def test_pre_registration_frames_are_small(autojump_clock):
    async with open_harness(register_frame_bytes=1024) as h, trio.open_nursery() as nursery:
        at_limit = await _raw_socket(h, nursery)
        await at_limit.send_message("x" * 1024)  # read, and refused for what it says
        assert await _closed_with(at_limit) == 1008
        over = await _raw_socket(h, nursery)
        await over.send_message("x" * 1025)  # refused for its size before it is read
        assert await _closed_with(over) == 1009
        nursery.cancel_scope.cancel()
        # Once admitted, a provider may send frames up to max_frame_bytes.
        provider = await h.add_provider("p", behaviour=Behaviour(text="y" * 4000))
        await _still_serves(h)
        assert provider.closed_with is None


def test_byte_budget_bounds_what_a_stream_buffers():
    connection = ProviderConnection("p", 1, None, None, stream_buffer=1000,  # type: ignore[arg-type]
                                    stream_buffer_bytes=10_000)
    events = connection.open_stream("r")
    chunk = InferenceResponseChunk("r", encrypted_data=EncryptedPayload("k", "x" * 4000))
    assert connection.deliver("r", chunk) and connection.deliver("r", chunk)
    assert connection.pending == 1
    connection.deliver("r", chunk)  # 12,000 bytes buffered: over the budget
    assert connection.pending == 0
    assert connection.end_reason("r").startswith("consumer too slow")
    assert events.receive_nowait() == chunk  # what was buffered is still delivered


# ---- provider output that used to become 500s or broken streams --------------------


@pytest.mark.parametrize("raw", [
    '{"a":' * 5000 + "1" + "}" * 5000,
    "not json at all",
    '"a string"',
    '{"n": NaN}',
])
async def test_hostile_chunk_before_content_fails_over(autojump_clock, errors, raw):
    async with open_harness() as h:
        await h.add_provider("bad", behaviour=Behaviour(Fault.RAW_CHUNK, raw=raw, after_chunks=0),
                             decode_tps=1000)
        await h.add_provider("good", decode_tps=10)
        for stream in (True, False):
            result = await h.chat(stream=stream)
            assert result.status == 200
            assert result.headers["x-provider-id"] == "good"
        await h.assert_quiescent()
    assert not errors.records


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
async def test_hostile_chunk_after_content_ends_the_stream_in_band(autojump_clock, errors, path):
    async with open_harness() as h:
        # (The first Responses "content" events are announcements: still boilerplate.)
        await h.add_provider("bad", behaviour=Behaviour(Fault.RAW_CHUNK, raw="[" * 3000,
                                                        after_chunks=5))
        body = {"model": MODEL, "stream": True, "max_tokens": 50,
                "messages": [{"role": "user", "content": "hi"}]}
        if path == "/v1/responses":
            body = {"model": MODEL, "stream": True, "input": "hi"}
        result = await h.request(path, body)
        assert result.status == 200
        events = result.sse
        assert any("bad response chunk" in data for _, data in events)
        if path == "/v1/chat/completions":
            assert events[-1][1] == "[DONE]"
        else:
            assert events[-1][0] == "error"
        await h.assert_quiescent()
    assert not errors.records


async def test_a_chunk_cannot_inject_sse_lines(autojump_clock):
    payload = json.dumps({"choices": [{"index": 0, "delta": {
        "content": "hi\n\ndata: [DONE]\n\nevent: x"}}]})
    async with open_harness() as h:
        await h.add_provider("p", behaviour=Behaviour(Fault.RAW_CHUNK, raw=payload,
                                                      after_chunks=0))
        result = await h.chat()
        assert [d for _, d in result.sse].count("[DONE]") == 1
        assert "hi\n\ndata: [DONE]\n\nevent: x" in result.text
        responses = await h.request("/v1/responses", {"model": MODEL, "stream": True,
                                                      "input": "x"})
        assert all("\n" not in (name or "") for name, _ in responses.sse)


async def test_odd_chunks_on_non_streaming_requests_are_tolerated(autojump_clock, errors):
    odd = json.dumps({"choices": "nope", "type": 7, "index": "x",
                      "delta": [1, 2], "content_block": "str"})
    async with open_harness() as h:
        await h.add_provider("p", behaviour=Behaviour(Fault.RAW_CHUNK, raw=odd, after_chunks=1))
        for path, body in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
            ("/v1/completions", {"prompt": "x"}),
            ("/v1/responses", {"input": "x"}),
            ("/v1/messages", {"max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}),
        ]:
            result = await h.request(path, {"model": MODEL, "stream": False, **body})
            assert result.status == 200, (path, result.body)
    assert not errors.records


async def test_a_non_streaming_answer_is_bounded_and_the_provider_stopped(autojump_clock):
    # A non-streaming answer is held whole until it completes: a provider that kept
    # streaming content grew the coordinator's memory 1:1 with what it sent (probe).
    async with open_harness(max_response_bytes=4096, speculative_backup=False) as h:
        provider = await h.add_provider("p", behaviour=Behaviour(token_interval=0.01,
                                                                   tokens=1000))
        result = await h.chat(stream=False)
        assert result.status == 502, result.body
        assert result.json()["error"]["code"] == "response_too_large"
        await h.until(lambda: any(entry[1] == "cancel" for entry in provider.log))
        await h.assert_quiescent()
        # The same answer streamed flows through: only what is held is bounded.
        streamed = await h.chat(stream=True)
        assert streamed.status == 200 and b"data: [DONE]" in streamed.body
        provider.behaviour = Behaviour(tokens=5)
        assert (await h.chat(stream=False)).status == 200


@pytest.mark.parametrize("usage", [
    '{"prompt_tokens":-1000,"completion_tokens":3}',
    '{"prompt_tokens":1,"completion_tokens":' + "9" * 4300 + "}",
])
async def test_impossible_usage_is_a_provider_error(autojump_clock, errors, usage):
    async with open_harness(speculative_backup=False, max_attempts=1) as h:
        provider = await h.add_provider("p", behaviour=Behaviour(Fault.STALL_AFTER_ROLE))
        async with trio.open_nursery() as nursery:
            results: list = []

            async def ask() -> None:
                results.append(await h.chat(stream=False))

            nursery.start_soon(ask)
            await h.until(lambda: provider.log and provider.log[-1][1] == "received")
            rid = provider.log[-1][2]
            assert provider.current_ws is not None
            await provider.current_ws.send_message(
                f'{{"type":"inference_complete","request_id":"{rid}","usage":{usage}}}')
        [result] = results
        assert result.status in (502, 503)
        assert "-1000" not in result.body.decode()
        provider.behaviour = Behaviour()
        await _still_serves(h)
    assert not errors.records


async def test_valid_usage_passes_through(autojump_clock):
    frame = encode_frame(InferenceComplete("r", Usage(3, 4)))
    assert '"prompt_tokens":3' in frame


# ---- over real sockets --------------------------------------------------------------


async def _serve_fleet(nursery: trio.Nursery, providers: int = 1, **config: object) -> object:
    running = await nursery.start(serve, make_config(http_port=0, provider_port=0, **config))
    fleet = demo_fleet(providers, token=TOKEN)
    nursery.start_soon(run_fleet, fleet, running.provider_url)
    await running.registry.wait_for(lambda state: len(state.providers) >= providers)
    return running


def _address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].rstrip("/").rsplit(":", 1)
    return host, int(port)


_CHAT = json.dumps({"model": "sim-chat-small",
                    "messages": [{"role": "user", "content": "hi"}]}).encode()


def _post(body: bytes = _CHAT, key: str = API_KEY) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + key.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


async def _read_response(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        received = await stream.receive_some(65536)
        assert received, "the connection was closed before a response"
        data += received
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    return head


async def test_idle_keep_alive_connections_are_closed(autojump_clock):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, keep_alive_timeout=5.0)
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        await stream.send_all(_post())
        assert (await _read_response(stream)).startswith(b"HTTP/1.1 200")
        start = trio.current_time()
        assert await stream.receive_some(100) == b""  # the server closed it
        assert 5.0 <= trio.current_time() - start < 6.0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("request_head", [
    b"GET /healthz HTTP/1.0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\nConnection: close\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
])
async def test_a_client_that_asks_to_close_is_not_kept_waiting(autojump_clock, request_head):
    # Clients that read to the end of the connection waited keep_alive_timeout for it.
    # HTTP/1.0 is never kept alive (hypercorn's h11 answers it with Connection: close),
    # yet asking for keep-alive kept the connection open for keep_alive_timeout.
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, keep_alive_timeout=5.0)
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        start = trio.current_time()
        await stream.send_all(request_head)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        assert data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")) and b'"status"' in data
        assert trio.current_time() - start < 1.0
        nursery.cancel_scope.cancel()


async def test_a_body_that_never_arrives_is_a_408(autojump_clock):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery)
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                              b"Authorization: Bearer " + API_KEY.encode() +
                              b"\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        start = trio.current_time()
        head = await _read_response(stream)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert 60.0 <= trio.current_time() - start < 61.0
        nursery.cancel_scope.cancel()


async def test_connection_cap_queues_new_connections(autojump_clock):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, max_connections=2, keep_alive_timeout=5.0)
        address = _address(running.http_url)
        idle = [await trio.open_tcp_stream(*address) for _ in range(2)]
        for stream in idle:
            await stream.send_all(_post())
            await _read_response(stream)
        start = trio.current_time()
        late = await trio.open_tcp_stream(*address)  # waits in the backlog
        await late.send_all(_post())
        assert (await _read_response(late)).startswith(b"HTTP/1.1 200")
        assert trio.current_time() - start >= 5.0  # served once an idle one was closed
        nursery.cancel_scope.cancel()


async def _h2_stalled(address: tuple[str, int], path: str, headers: list[tuple[str, str]],
                      body: bytes = b"") -> trio.SocketStream:
    """An HTTP/2 (h2c) connection asking for ``path`` with a flow-control window of 0."""
    stream = await trio.open_tcp_stream(*address)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    conn.send_headers(1, [(":method", "POST" if body else "GET"), (":path", path),
                          (":scheme", "http"), (":authority", "x"), *headers],
                      end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    await stream.send_all(conn.data_to_send())
    return stream


async def test_http2_consumers_that_give_no_window_cannot_hold_the_connections(
        autojump_clock, errors):
    # hypercorn waits for an HTTP/2 stream's window without writing, so the listener's
    # write timeout never fired: max_connections such consumers locked everyone out.
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, max_connections=2, write_timeout=30.0,
                                     keep_alive_timeout=5.0)
        address = _address(running.http_url)
        chat = json.dumps({"model": "sim-chat-small", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        stalled = [await _h2_stalled(address, "/healthz", []),
                   await _h2_stalled(address, "/v1/chat/completions",
                                     [("authorization", f"Bearer {API_KEY}")], chat)]
        start = trio.current_time()
        for stream in stalled:
            with trio.fail_after(120):
                while await stream.receive_some(65536):  # until the server closes it
                    pass
        assert 30.0 <= trio.current_time() - start < 40.0  # write_timeout, then idle
        await running.registry.wait_for(lambda state: not any(
            r.leases for r in state.providers.values()))
        fresh = await trio.open_tcp_stream(*address)
        await fresh.send_all(_post())
        assert (await _read_response(fresh)).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()


@pytest.mark.slow  # real sockets: a 20,000-word answer into a 4 KiB window
async def test_a_consumer_that_stops_reading_is_cut_and_its_slot_released(autojump_clock):
    async with trio.open_nursery() as nursery:
        running = await nursery.start(serve, make_config(http_port=0, provider_port=0,
                                                         write_timeout=30.0))
        chatty = SimProvider("chatty", (model("sim-chat-small"),), token=TOKEN,
                             behaviour=Behaviour(text=" ".join(["word"] * 20_000)))
        brief = SimProvider("brief", (model("sim-chat-small"),), token=TOKEN)
        nursery.start_soon(chatty.run, running.provider_url)
        nursery.start_soon(brief.run, running.provider_url)
        await running.registry.wait_for(lambda state: len(state.providers) == 2)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(_address(running.http_url))
        stream = trio.SocketStream(sock)
        body = json.dumps({"model": "sim-chat-small", "stream": True, "max_tokens": 100000,
                           "provider_ids": ["chatty"],
                           "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
        fresh = _post(json.dumps({"model": "sim-chat-small", "provider_ids": ["brief"],
                                  "messages": [{"role": "user", "content": "hi"}]}).encode())
        await stream.send_all(_post(body))
        await stream.receive_some(100)  # the headers and first chunk; then stop reading
        others = await trio.open_tcp_stream(*_address(running.http_url))
        await others.send_all(fresh)  # meanwhile, other consumers are served
        assert (await _read_response(others)).startswith(b"HTTP/1.1 200")
        assert trio.current_time() < 30.0
        registry = running.registry
        await registry.wait_for(lambda state: not any(r.leases for r in state.providers.values()))
        assert (await registry.snapshot()).leases == 0
        assert trio.current_time() >= 30.0  # cut at the write timeout, not before
        assert any(event == "cancel" for _, event, _ in chatty.log)  # told to stop
        later = await trio.open_tcp_stream(*_address(running.http_url))
        await later.send_all(fresh)
        assert (await _read_response(later)).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()


@pytest.mark.slow  # real sockets in real time
async def test_tcp_reset_after_the_upgrade_does_not_end_the_listener(errors):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery)
        host, port = _address(running.provider_url)
        for _ in range(5):
            sock = trio.socket.socket()
            await sock.connect((host, port))
            await sock.send(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                            b"Sec-WebSocket-Version: 13\r\n\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
        # A listener that had died would neither admit this provider nor serve the request.
        provider = SimProvider("late", (model("sim-chat-small"),), token=TOKEN)
        nursery.start_soon(provider.run, running.provider_url)
        await provider.registered.wait()
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        await stream.send_all(_post())
        assert (await _read_response(stream)).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()
    assert not errors.records


@pytest.mark.slow  # real sockets in real time
async def test_websocket_upgrade_on_an_api_path_is_refused_cleanly(errors):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery)
        for path in (b"/v1/chat/completions", b"/status", b"/nowhere"):
            head = await _upgrade(_address(running.http_url), path)
            assert head.startswith(b"HTTP/1.1 403"), head
        nursery.cancel_scope.cancel()
    assert not errors.records


@pytest.mark.slow  # real sockets in real time
async def test_an_upgrade_with_a_request_pipelined_behind_it_is_refused_quietly(capfd, errors):
    """hypercorn's HTTP/1 state is broken by the second request before the 403 is sent:
    the refusal finds nobody to answer, and must not end in a logged traceback."""
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery)
        for _ in range(10):
            stream = await trio.open_tcp_stream(*_address(running.http_url))
            await stream.send_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + _UPGRADE
                                  + b"GET / HTTP/1.1\r\n\r\n")
            with trio.move_on_after(5):
                while await stream.receive_some(1000):
                    pass  # until the server closes
            await stream.aclose()
        await _still_serves_over(running)
        nursery.cancel_scope.cancel()
    assert not errors.records
    assert "Traceback" not in capfd.readouterr().err


async def _answer_the_close(address: tuple[str, int], first: bytes, answer: bytes) -> None:
    """Open a WebSocket, send ``first`` (a frame the server closes the socket for), and
    answer the server's Close with the raw frame ``answer`` instead of a Close (raw
    wsproto: a library client would answer the Close)."""
    stream = await trio.open_tcp_stream(*address)
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(client.send(wsproto.events.Request(host="x", target="/")))
    while True:
        data = await stream.receive_some(65536)
        if not data:
            break
        client.receive_data(data)
        for event in client.events():
            if isinstance(event, wsproto.events.AcceptConnection):
                await stream.send_all(client.send(wsproto.events.TextMessage(data=first.decode())))
            elif isinstance(event, wsproto.events.CloseConnection):
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(answer)
    await stream.aclose()


_CLIENT_FRAMES = wsproto.frame_protocol.FrameProtocol(client=True, extensions=[])


@pytest.mark.slow  # real sockets in real time
@pytest.mark.parametrize("answer", [
    _CLIENT_FRAMES.ping(b"ping"),
    _CLIENT_FRAMES.send_data("x" * (300 * 1024), fin=True),  # over register_frame_bytes
], ids=["a ping", "a message over the limit"])
async def test_answering_the_servers_close_with_a_frame_does_not_end_the_listener(errors, answer):
    """A socket that answered the provider listener's Close with a Ping, or with a message
    over its size limit, ended the whole process: trio-websocket's reader answered with a
    Pong (or a Close of its own) that wsproto refuses on a closing connection, and the
    LocalProtocolError escaped the listener (trio-websocket issue 184). Found by the fuzz
    campaign's peer-link target."""
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, close_timeout=0.2)  # it waits for our Close
        with trio.fail_after(20):
            await _answer_the_close(_address(running.provider_url), b'{"type":"nope"}', answer)
            await _still_serves_over(running)
            # And a provider is still admitted: the listener lives.
            provider = SimProvider("late", (model("sim-chat-small"),), token=TOKEN)
            nursery.start_soon(provider.run, running.provider_url)
            await provider.registered.wait()
        nursery.cancel_scope.cancel()
    assert not errors.records


async def _still_serves_over(running: Any) -> None:
    stream = await trio.open_tcp_stream(*_address(running.http_url))
    await stream.send_all(_post())
    assert (await _read_response(stream)).startswith(b"HTTP/1.1 200")
    await stream.aclose()


# Found by the fuzz campaign (raw HTTP bytes): requests pipelined behind a first one, a
# HTTP/1.0 and a bad-version request among them, then a reset. hypercorn 0.18 stopped
# reading such a connection and waited forever, holding one of max_connections.
_CHAT_FOR = b'{"model": "sim-chat-small", "messages": [{"role": "user", "content": "hello"}]}'
_STALLING = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHos",
    b"t: fuzz\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: "
    + str(len(_CHAT_FOR)).encode() + b"\r\n\r\n" + _CHAT_FOR
    + b"GET /healthz HTTP/1.0\r\nHost: fuzz\r\n\r\nGET /healthz HTTP/9.9\r\nHost: fuzz\r\n\r\n"
    + b"POST /v1/chat/completions HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 5\r\n\r\nj",
)


async def test_connections_stalled_in_the_http_layer_do_not_use_up_the_limit(
        autojump_clock, errors):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, max_connections=10)
        for _ in range(10):
            sock = trio.socket.socket()
            await sock.connect(_address(running.http_url))
            for piece in _STALLING:
                await sock.send(piece)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        with trio.fail_after(60):  # before, this waited forever in the accept backlog
            await _still_serves_over(running)
        nursery.cancel_scope.cancel()
    assert not errors.records


async def test_too_many_providers_in_admission_are_refused_at_the_handshake(autojump_clock):
    async with open_harness(max_pending_providers=2) as h, trio.open_nursery() as nursery:
        silent = [await _raw_socket(h, nursery) for _ in range(2)]
        assert (await _memory_upgrade(h, nursery)).startswith(b"HTTP/1.1 503")
        await silent[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert (await _memory_upgrade(h, nursery)).startswith(b"HTTP/1.1 101")
        nursery.cancel_scope.cancel()


async def test_sockets_in_the_websocket_handshake_are_capped_and_wait_in_the_backlog(
        autojump_clock):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, max_pending_providers=2, register_timeout=100.0)
        address = _address(running.provider_url)
        start = trio.current_time()
        silent = [await trio.open_tcp_stream(*address) for _ in range(2)]
        for stream in silent:
            await stream.send_all(b"GET / HTTP/1.1\r\n")  # an upgrade request, never finished
        # A third socket is not accepted until one of the two leaves the handshake (before
        # the cap, it was answered at once): here, when the oldest has held its place for
        # GRACE without finishing its upgrade request and the third needs it (before
        # that, only at register_timeout: half-sent requests starved real providers).
        assert (await _upgrade(address, b"/")).startswith(b"HTTP/1.1 101")
        assert GRACE <= trio.current_time() - start < GRACE + 1.0
        assert await silent[0].receive_some(100) == b""  # closed to make room
        assert await silent[1].receive_some(100) == b""  # cut at register_timeout
        assert 100.0 <= trio.current_time() - start < 101.0
        # Sockets that leave mid-handshake give their slots back at once: connecting
        # and closing is free, so it must not be a way to hold every slot.
        for _ in range(2):
            await (await trio.open_tcp_stream(*address)).aclose()
        start = trio.current_time()
        assert (await _upgrade(address, b"/")).startswith(b"HTTP/1.1 101")
        assert trio.current_time() - start < 1.0
        await _still_serves_over(running)
        nursery.cancel_scope.cancel()


async def test_a_socket_leaves_the_handshake_cap_when_answered_closed_or_left(autojump_clock):
    peers: list[Any] = []

    class Sockets(trio.abc.Listener[Any]):
        async def accept(self) -> Any:
            ours, theirs = trio.socket.socketpair()
            peers.append(trio.SocketStream(theirs))
            return trio.SocketStream(ours)

        async def aclose(self) -> None:
            pass

    listener, twin = capped([Sockets(), Sockets()], 2)  # type: ignore[list-item]
    answered, closed = await listener.accept(), await twin.accept()
    assert listener.in_handshake == 2
    with trio.move_on_after(1) as full:
        await listener.accept()
    assert full.cancelled_caught  # the third waits for a slot, on either listener
    await answered.send_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    await answered.send_all(b"more")  # a slot is given back once
    assert listener.in_handshake == 1
    await closed.aclose()
    await closed.aclose()
    assert listener.in_handshake == 0
    left = await listener.accept()
    assert listener.in_handshake == 1
    await peers[-1].aclose()  # its peer goes before an answer
    assert await left.receive_some(100) == b""
    assert listener.in_handshake == 0 and left.inner.socket.fileno() == -1  # closed at once
    for stream in (answered, closed, left, *peers):
        await stream.aclose()


_UPGRADE = (b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("opening", [
    b"garbage\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # HTTP, but no upgrade
    b"\x00" * 100 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + _UPGRADE + b"\x81\x05hello",  # an unmasked frame
])
async def test_a_hostile_handshake_never_keeps_its_slot(autojump_clock, opening):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, max_pending_providers=1, register_timeout=100.0)
        address = _address(running.provider_url)
        hostile = await trio.open_tcp_stream(*address)
        with contextlib.suppress(trio.BrokenResourceError):
            await hostile.send_all(opening)
        with trio.fail_after(200), contextlib.suppress(trio.BrokenResourceError):
            while await hostile.receive_some(65536):  # answered or cut, within the timeout
                pass
        await hostile.aclose()
        start = trio.current_time()
        assert (await _upgrade(address, b"/")).startswith(b"HTTP/1.1 101")
        assert trio.current_time() - start < 1.0  # its slot came back
        nursery.cancel_scope.cancel()


async def _memory_upgrade(h: Harness, nursery: trio.Nursery, serve: Any = None,
                          headers: bytes = b"") -> bytes:
    """The provider edge's (or ``serve``'s) answer to a raw upgrade request, in process."""
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(serve or h._serve_edge, nursery, server)
    await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + _UPGRADE)
    return await client.receive_some(1000)


async def test_a_provider_token_in_the_upgrade_request_has_admission_places_of_its_own(
        autojump_clock):
    # Sockets that upgrade and never register held every admission place for
    # register_timeout: a real provider was refused (503) all that time.
    async with open_harness(max_pending_providers=2) as h, trio.open_nursery() as nursery:
        silent = [await _raw_socket(h, nursery) for _ in range(2)]
        assert (await _memory_upgrade(h, nursery)).startswith(b"HTTP/1.1 503")
        wrong = b"Authorization: Bearer not-the-token\r\n"
        assert (await _memory_upgrade(h, nursery, headers=wrong)).startswith(b"HTTP/1.1 503")
        proven = f"Authorization: Bearer {TOKEN}\r\n".encode()
        assert (await _memory_upgrade(h, nursery, headers=proven)).startswith(b"HTTP/1.1 101")
        # The proven places are capped too (a token holder is not unlimited).
        assert (await _memory_upgrade(h, nursery, headers=proven)).startswith(b"HTTP/1.1 101")
        assert (await _memory_upgrade(h, nursery, headers=proven)).startswith(b"HTTP/1.1 503")
        await silent[0].aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.slow  # real sockets: 150 connections
@pytest.mark.parametrize("opening", [
    b"GET / HTTP/1.1\r\n",  # an upgrade request never finished: holds a handshake place
    b"GET / HTTP/1.1\r\nHost: x\r\n" + _UPGRADE,  # upgraded, never registers: admission
])
async def test_unfinished_handshakes_do_not_starve_a_provider_with_its_token(
        autojump_clock, opening):
    # 150 of them delayed a real provider's admission to register_timeout and beyond
    # (20 s for half-sent upgrade requests, 10 s for silent upgraded sockets).
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery)  # max_pending_providers 64, register_timeout 10
        address = _address(running.provider_url)
        crowd = []
        for _ in range(150):
            stream = await trio.open_tcp_stream(*address)
            await stream.send_all(opening)
            crowd.append(stream)
        start = trio.current_time()
        real = SimProvider("real", (model("sim-chat-small"),), token=TOKEN)
        nursery.start_soon(real.run, running.provider_url)
        await running.registry.wait_for(lambda state: "real" in state.providers)
        assert trio.current_time() - start < 3 * GRACE  # in the backlog behind the crowd
        await _still_serves_over(running)
        nursery.cancel_scope.cancel()


async def test_a_proven_socket_keeps_its_handshake_place(autojump_clock):
    peers: list[Any] = []

    class Sockets(trio.abc.Listener[Any]):
        async def accept(self) -> Any:
            ours, theirs = trio.socket.socketpair()
            peers.append(trio.SocketStream(theirs))
            return trio.SocketStream(ours)

        async def aclose(self) -> None:
            pass

    [listener] = capped([Sockets()], 2, tokens=("t",))
    proven, idle = await listener.accept(), await listener.accept()
    await peers[0].send_all(b"GET / HTTP/1.1\r\nAuthorization: Bearer t\r\n")
    await peers[0].send_all(b"Upgrade: websocket\r\n\r\n")  # in two pieces
    await proven.receive_some(1000)
    with trio.move_on_after(GRACE / 2) as waited:
        await listener.accept()
    assert waited.cancelled_caught  # every place held, none yet past its grace
    third = await listener.accept()  # at GRACE: the unproven one makes room
    assert idle.inner.socket.fileno() == -1 and proven.inner.socket.fileno() != -1
    await peers[2].send_all(b"GET / HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n")
    await third.receive_some(1000)
    fourth = await listener.accept()  # a wrong token proves nothing: it makes room too
    assert third.inner.socket.fileno() == -1 and proven.inner.socket.fileno() != -1
    assert listener.in_handshake == 2
    for stream in (proven, idle, third, fourth, *peers):
        await stream.aclose()


class _Said(logging.Handler):
    """Records a logger's warnings; ``event`` is set at the first."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.event = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.event.set()


@pytest.mark.slow  # real sockets in real time
async def test_a_link_refused_for_its_cluster_token_says_so_once(errors):
    # A wrong token looked healthy: requests for the other instance's providers failed
    # with "instance … is gone" and neither side said why.
    said, logger = _Said(), logging.getLogger("coordinator.cluster.peer")
    logger.addHandler(said)
    try:
        async with open_harness(cluster_token="right") as h, trio.open_nursery() as nursery:
            peers = PeerServer(h.coordinator.config, h.registry,
                               h.coordinator.dispatcher.directory)
            served, handled = trio.open_memory_channel[None](3)

            async def handle(request: trio_websocket.WebSocketRequest) -> None:
                await peers.handle(request)
                served.send_nowait(None)

            server = await nursery.start(functools.partial(
                trio_websocket.serve_websocket, handle, "127.0.0.1", 0, ssl_context=None))
            link = PeerLink("b", f"ws://127.0.0.1:{server.port}/", me="a", token="wrong")
            await nursery.start(link.run)
            for _ in range(3):
                await link._open()
                with trio.fail_after(10):
                    await handled.receive()  # refused and closed
                    await said.event.wait()
            nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(said)
    [warning] = said.records
    assert "instance b refused this instance's link (not a cluster member)" in \
        warning.getMessage() and "COORDINATOR_CLUSTER_TOKEN" in warning.getMessage()


async def test_links_that_never_say_hello_are_capped_like_providers_in_admission(
        autojump_clock):
    async with open_harness(max_pending_providers=2) as h, trio.open_nursery() as nursery:
        peers = PeerServer(h.coordinator.config, h.registry, h.coordinator.dispatcher.directory)

        async def serve_peer(nursery: trio.Nursery, stream: Any) -> None:
            await peers.handle(await trio_websocket.wrap_server_stream(nursery, stream))

        async def silent_link() -> trio_websocket.WebSocketConnection:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(serve_peer, nursery, server)
            return await trio_websocket.wrap_client_stream(nursery, client, "c", "/")

        silent = [await silent_link() for _ in range(2)]
        assert (await _memory_upgrade(h, nursery, serve_peer)).startswith(b"HTTP/1.1 503")
        await silent[0].aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert (await _memory_upgrade(h, nursery, serve_peer)).startswith(b"HTTP/1.1 101")
        nursery.cancel_scope.cancel()


async def _upgrade(address: tuple[str, int], path: bytes) -> bytes:
    """The response head to a raw WebSocket upgrade request."""
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + _UPGRADE)
    head = await stream.receive_some(1000)
    await stream.aclose()
    return head


async def test_a_request_head_that_trickles_in_is_cut(autojump_clock):
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery, request_head_timeout=10.0, keep_alive_timeout=5.0)
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):  # the server hung up mid-head
            for byte in _post():  # one byte every 4 s: never idle for 5 s
                await stream.send_all(bytes([byte]))
                await trio.sleep(4)
        assert 10.0 <= trio.current_time() - start <= 20.0  # noticed by the next send or two
        nursery.cancel_scope.cancel()


async def test_a_huge_model_name_is_refused_without_echoing_it(autojump_clock):
    async with open_harness() as h:
        result = await h.chat(stream=False, model_id="m" * 100_000)
        assert result.status == 400 and len(result.body) < 1000


# ---- the pure cores behind the above ----------------------------------------------


def test_model_memory_is_bounded_and_forgets():
    from coordinator.registry.models import ModelMemory

    memory = ModelMemory(forget_after=60.0, capacity=3)
    for i in range(5):
        memory.went_offline(f"m{i}", now=float(i))
    assert memory.names() == ["m2", "m3", "m4"]  # the oldest were dropped
    assert memory.remembers("m4", now=63.9) and not memory.remembers("m2", now=62.0)
    memory.came_online("m3")
    memory.sweep(now=1000.0)
    assert len(memory) == 0


def test_identity_book_binds_ids_to_keys():
    from coordinator.providers.admission import AdmissionError
    from coordinator.providers.identity import IdentityBook

    def key() -> str:
        return SimProvider("k", (model(),)).register_message().signing_public_key or ""

    a, b = key(), key()
    book = IdentityBook(max_pins=2)
    first = book.admit("prov-A", 1, a, "pk-a=")
    with pytest.raises(AdmissionError, match="bound to another key"):
        book.admit("prov-A", 2, b, "pk-b=")
    with pytest.raises(AdmissionError, match="public_key"):
        book.admit("prov-B", 3, b, "pk-a=")
    assert book.admit("prov-A", 4, a, "pk-a2=").session == 4  # same key: supersedes
    book.leave(first)  # an old session leaving does not free the newer one's id
    with pytest.raises(AdmissionError):
        book.admit(None, 5, b, "pk-a2=")
    assert book.admit(None, 6, b, "pk-b=").provider_id == key_id(b)
    with pytest.raises(AdmissionError, match="derived from another key"):
        book.admit(key_id(b), 7, a, "pk-c=")
    book.admit("prov-C", 8, b, "pk-d=")
    with pytest.raises(AdmissionError, match="no room"):
        book.admit("prov-D", 9, b, "pk-e=")


# ---- found by the fuzz campaign (tests/test_fuzz.py) ----------------------------------


@pytest.mark.slow  # real sockets in real time
async def test_pipelined_http10_garbage_then_reset_does_not_end_the_listener(errors):
    """hypercorn answered the garbage and closed the connection from two tasks at once."""
    pieces = (b"GET /healthz HTTP/1.0\r\nHost: fuzz\r\n\r\nGET /healthz HTTP/1.1\r\nHos",
              b"t: fuzz\r\n\r\nGET /healthz HTTP/1.0\r\nHost: fuzz\r\n\r\nGET /healthz HTTP/1.0"
              b"\r\nHost: fuzz\r\n\r\nGET /healthz HTTP/1.1\r\nHost: fuzz\r\n\r\n\x04U:")
    async with trio.open_nursery() as nursery:
        running = await _serve_fleet(nursery)
        for _ in range(10):
            sock = trio.socket.socket()
            await sock.connect(_address(running.http_url))
            for piece in pieces:
                await sock.send(piece)
            with trio.move_on_after(1):
                await sock.recv(65536)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        stream = await trio.open_tcp_stream(*_address(running.http_url))
        await stream.send_all(_post())
        assert (await _read_response(stream)).startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()
    assert not errors.records


async def test_a_host_header_that_does_not_encode_is_a_400(autojump_clock, errors):
    from .harness import asgi_call

    async with open_harness() as h:
        await h.add_provider("p")
        result = await asgi_call(h.coordinator.asgi, "GET", "/v1/models",
                                 {"authorization": f"Bearer {API_KEY}", "host": "a" * 64}, b"")
        assert result.status == 400 and result.json()["error"]["code"] == "bad_request"
        await _still_serves(h)
    assert not errors.records


async def test_an_unusable_encryption_key_is_refused_at_admission(autojump_clock, errors):
    import base64

    class ZeroKey(SimProvider):
        def register_message(self):  # type: ignore[no-untyped-def]
            return attrs.evolve(super().register_message(),
                                public_key=base64.b64encode(b"\0" * 32).decode())

    async with open_harness() as h:
        zero = ZeroKey("zero", (model(),), token=TOKEN)
        await h.connect(zero, wait=False)
        await h.until(lambda: zero.closed_with is not None)
        assert zero.closed_with == 1008 and "zero" not in h.state.providers
        await h.add_provider("p")
        await _still_serves(h)
    assert not errors.records


async def _linked(h: Harness, nursery: trio.Nursery) -> trio_websocket.WebSocketConnection:
    """A link into ``h``'s peer server (in memory) that has said hello with the token."""
    peers = PeerServer(h.coordinator.config, h.registry, h.coordinator.dispatcher.directory)
    client, server = trio.testing.memory_stream_pair()

    async def serve_peer() -> None:
        await peers.handle(await trio_websocket.wrap_server_stream(nursery, server))

    nursery.start_soon(serve_peer)
    link = await trio_websocket.wrap_client_stream(nursery, client, "c", "/",
                                                   max_message_size=1 << 24)
    await link.send_message('{"type":"hello","instance":"x","token":"right"}')
    return link


@pytest.mark.parametrize("depth", [200, 1000, 1023, 5000])
async def test_a_hostile_lease_costs_its_frame_not_the_link(autojump_clock, depth):
    """Issue 22 item 9: a lease nested deep raised RecursionError and dropped the link."""
    async with open_harness(cluster_token="right") as h, trio.open_nursery() as nursery:
        link = await _linked(h, nursery)
        nested = "[" * depth + "]" * depth
        for hostile in (
            '{"type":"relay","frame":"x","lease":{"request_id":' + nested + "}}",
            '{"type":"relay","frame":"x","lease":' + nested + "}",
            '{"type":"cancel","request_id":' + nested + ',"provider_id":"p","session":1}',
            '{"type":"relay","frame":"x","lease":{"request_id":"' + "r" * 100_000
            + '","provider_id":"p","session":1,"model":"m","shape":"base","version":"1"}}',
        ):
            await link.send_message(hostile)
        # The link is alive and still answers: a relay for a provider it does not have.
        await link.send_message(encode_frame_of_relay("r.1", "nobody"))
        with trio.fail_after(5):
            answer = json.loads(await link.get_message())
        assert answer == {"type": "refused", "provider_id": "nobody", "request_id": "r.1",
                          "reason": "gone"}
        nursery.cancel_scope.cancel()


def _directory_page(instance: str, *provider_ids: str, hardware: str = "Mac M2") -> Any:
    """A page of the directory as another instance writes it to Redis (JSON)."""
    return json.loads(json.dumps(entries.dump(entries.InstanceEntry(instance, "ws://b/", tuple(
        entries.ProviderEntry(provider_id, 1, "0.7.0", hardware, (model(),), 64.0, 100.0,
                              1000.0, 4, 0, "pk", "sk", True, 1 << 20)
        for provider_id in provider_ids)))))


def test_a_directory_page_is_held_to_what_admission_asks_of_names():
    """Names from another instance (through Redis) go into headers, logs and the status
    page: an unsafe one is no more mirrored than a provider could register it."""
    good = entries.load(_directory_page("b-1", "ok", hardware="x" * 128 + " " + "y" * 128))
    assert good is not None and [e.provider_id for e in good.providers] == ["ok"]
    mixed = entries.load(_directory_page("b-1", "ok", "p\n2026 CRITICAL FORGED", "é"))
    assert mixed is not None and [e.provider_id for e in mixed.providers] == ["ok"]
    assert entries.load(_directory_page("b\r\nX-Forged: 1", "ok")) is None
    assert entries.load(_directory_page("b" * 257, "ok")) is None
    page = _directory_page("b-1", "ok")
    page["providers"][0]["models"][0]["id"] = "m1\nFORGED"
    loaded = entries.load(page)
    assert loaded is not None and loaded.providers == ()


def test_a_breaker_key_from_redis_is_held_to_what_ids_may_be():
    """Cooldown keys announced through Redis end up in the admin JSON and the status page."""
    assert shared._triple(["p", "org/m|v2", "tools+vision"]) == ("p", "org/m|v2", "tools+vision")
    for hostile in (["p" * 100_000, "m", "base"], ["p\nFORGED", "m", "base"], [1, "m", "base"]):
        with pytest.raises(ValueError):
            shared._triple(hostile)
    assert shared._parts("{p|org/m|v2|base}") == ("p", "org/m|v2", "base")
    assert shared._parts("{p|m\x1b[2J|base}") is None


async def test_a_relay_cannot_take_over_a_request_already_on_the_provider(autojump_clock):
    """A relay naming the wire id of a consumer's request in flight on the provider took
    over its slot and its stream: the link got the provider's frames and the consumer,
    after 600 s of silence, an in-band error. Found by the fuzz campaign's peer target."""
    async with open_harness(cluster_token="right") as h, trio.open_nursery() as nursery:
        await h.add_provider("p", behaviour=Behaviour(token_interval=1.0))
        results: list[Any] = []
        answered = trio.Event()

        async def consume() -> None:
            results.append(await h.chat(stream=True))
            answered.set()

        nursery.start_soon(consume)
        await h.until(lambda: h.state.providers["p"].leases)
        [wire_id] = h.state.providers["p"].leases
        link = await _linked(h, nursery)
        await link.send_message(encode_frame_of_relay(wire_id, "p", h.state.providers["p"].session))
        with trio.fail_after(5):
            answer = json.loads(await link.get_message())
        assert answer == {"type": "refused", "provider_id": "p", "request_id": wire_id,
                          "reason": "duplicate"}
        with trio.fail_after(60):
            await answered.wait()
        [result] = results
        assert result.status == 200 and result.text and b'"error"' not in result.body
        await h.assert_quiescent()
        nursery.cancel_scope.cancel()


def encode_frame_of_relay(request_id: str, provider_id: str, session: int = 1) -> str:
    """A well-formed relay of a sealed request (sealed to a throwaway key)."""
    from coordinator.protocol import EncryptedPayload, InferenceRequest, encode_frame
    from coordinator.protocol.cluster import Relay, RelayLease, encode_peer_frame

    sealed = encode_frame(InferenceRequest(request_id, EncryptedPayload("k", "c")))
    return encode_peer_frame(Relay(RelayLease(request_id, provider_id, session, "m1", "base",
                                              "0.7"), sealed))


@pytest.mark.parametrize("relay", [
    encode_frame_of_relay("r.1", "nobody"),  # refused: no such provider
    encode_frame_of_relay("r.1", "p").replace('"frame":"{', '"frame":"[{'),  # not a request
], ids=["gone", "malformed"])
async def test_a_relay_whose_link_closes_before_its_refusal_is_no_error(autojump_clock, errors,
                                                                        relay):
    """The refusal of a relay whose link had closed meanwhile raised out of the link's
    handler: "peer link handler failed" and a traceback. Found by the peer fuzz target."""
    async with open_harness(cluster_token="right") as h, trio.open_nursery() as nursery:
        await h.add_provider("p")
        peers = PeerServer(h.coordinator.config, h.registry, h.coordinator.dispatcher.directory)
        client, server = trio.testing.memory_stream_pair()

        async def serve_peer() -> None:
            await peers.handle(await trio_websocket.wrap_server_stream(nursery, server))

        nursery.start_soon(serve_peer)
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await client.send_all(ws.send(wsproto.events.Request(host="x", target="/")))
        ws.receive_data(await client.receive_some())
        assert isinstance(next(ws.events()), wsproto.events.AcceptConnection)
        hello = '{"type":"hello","instance":"x","token":"right"}'
        await client.send_all(ws.send(wsproto.events.TextMessage(data=hello)))
        await trio.testing.wait_all_tasks_blocked()
        # The relay and the link's end in one write: the refusal finds the link closed.
        await client.send_all(ws.send(wsproto.events.TextMessage(data=relay))
                              + ws.send(wsproto.events.CloseConnection(code=1000)))
        await trio.testing.wait_all_tasks_blocked()
        assert not peers.serving
        await h.assert_quiescent()
        await _still_serves(h)
        nursery.cancel_scope.cancel()
    assert not errors.records

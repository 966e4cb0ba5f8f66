"""Deterministic whole-system simulation: one Trio run, virtual time, scripted chaos.

A :class:`Scenario` is a fleet (versions, models, vision, template verdicts, rates,
per-request fault scripts, churn) and a schedule of consumer requests (endpoint,
stream, tools, media, when the consumer hangs up). :func:`run_scenario` plays it
against the real coordinator under ``MockClock(autojump_threshold=0)`` and returns
what everyone saw; :func:`check_invariants` holds it to the contract.

Replay a failure printed by the property test with::

    python -m tests.simulation '<scenario json>'
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import attrs
import cattrs
import trio
import trio.testing

from coordinator.capabilities import meets_floor, parse_version
from coordinator.protocol import ModelInfo
from coordinator.protocol.endpoints import Endpoint
from coordinator.registry.table import OutcomeKind
from provider_sim.behaviours import Behaviour
from provider_sim.provider import SimProvider

from .harness import API_KEY, TOKEN, HttpResult, asgi_call, open_harness

MODEL = "m1"
VISION = "v1"
IMAGE_PARTS = {
    "/v1/chat/completions": {"type": "image_url", "image_url": {"url": "data:x"}},
    "/v1/responses": {"type": "input_image", "image_url": "data:x"},
    "/v1/messages": {"type": "image", "source": {"type": "base64", "data": "x",
                                                 "media_type": "image/png"}},
    "/v1/completions": {"type": "image_url", "image_url": {"url": "data:x"}},
}


@attrs.frozen
class ProviderSpec:
    provider_id: str
    version: str = "0.7.0"
    vision: bool = False
    template_render_ok: bool | None = None
    decode_tps: float = 100.0
    script: tuple[Behaviour, ...] = ()
    # Virtual times at which the provider drops its connection and comes back.
    drop_at: float | None = None
    back_after: float | None = None


@attrs.frozen
class RequestSpec:
    at: float
    endpoint: str = "/v1/chat/completions"
    stream: bool = True
    tools: bool = False
    media: bool = False
    hang_up_after: float | None = None


@attrs.frozen
class Scenario:
    providers: tuple[ProviderSpec, ...]
    requests: tuple[RequestSpec, ...]
    seed: int = 0
    speculative_backup: bool = True


converter = cattrs.Converter()


def to_json(scenario: Scenario) -> str:
    return json.dumps(converter.unstructure(scenario), separators=(",", ":"))


def from_json(text: str) -> Scenario:
    return converter.structure(json.loads(text), Scenario)


# ---- running -----------------------------------------------------------------------


@attrs.define
class Seen:
    """What one consumer request saw."""

    spec: RequestSpec
    started: float = 0.0
    finished: float | None = None
    result: HttpResult | None = None
    hung_up: bool = False


@attrs.define
class World:
    scenario: Scenario
    config: Any
    seen: list[Seen]
    providers: dict[str, SimProvider]
    audit: list[tuple[str, float, dict[str, Any]]]
    quiescent_error: str | None = None
    # The ledger after the schedule: request id -> (prompt, completion, close).
    ledger: dict[str, tuple[int, int, str]] = attrs.Factory(dict)
    open_reservations: int = 0


def body_for(spec: RequestSpec, index: int) -> dict[str, Any]:
    model = VISION if spec.media else MODEL
    text: Any = f"question {index}"
    if spec.media:
        text = [{"type": "text", "text": "what is this"}, IMAGE_PARTS[spec.endpoint]]
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": ["string", "null"]}}}}}
    body: dict[str, Any] = {"model": model, "stream": spec.stream, "max_tokens": 6}
    match spec.endpoint:
        case "/v1/responses":
            body["input"] = [{"role": "user", "content": text}]
            tool = {"type": "function", "name": "f", "parameters": tool["function"]["parameters"]}
        case "/v1/messages":
            body["messages"] = [{"role": "user", "content": text}]
            tool = {"name": "f", "input_schema": tool["function"]["parameters"]}
        case "/v1/completions":
            body["prompt"] = "question"
            if spec.media:
                body["messages"] = [{"role": "user", "content": text}]
        case _:
            body["messages"] = [{"role": "user", "content": text}]
    if spec.tools:
        body["tools"] = [tool]
    return body


async def run_scenario(scenario: Scenario) -> World:
    audit: list[tuple[str, float, dict[str, Any]]] = []
    async with open_harness(seed=scenario.seed,
                            speculative_backup=scenario.speculative_backup) as h:
        h.state.observer = lambda event, now, details: audit.append((event, now, details))
        world = World(scenario, h.coordinator.config, [], {}, audit)
        for spec in scenario.providers:
            models = [ModelInfo(MODEL, size_bytes=1024, template_render_ok=spec.template_render_ok)]
            models.append(ModelInfo(VISION, size_bytes=1024, is_vision=spec.vision or None,
                                    template_render_ok=spec.template_render_ok))
            provider = SimProvider(spec.provider_id, tuple(models), token=TOKEN,
                                   version=spec.version, decode_tps=spec.decode_tps,
                                   script=list(spec.script), seed=scenario.seed,
                                   heartbeat_interval=30.0)
            world.providers[spec.provider_id] = provider
            await h.connect(provider)
        async with trio.open_nursery() as nursery:
            for spec in scenario.providers:
                if spec.drop_at is not None:
                    nursery.start_soon(_churn, h, spec)
            for index, spec in enumerate(scenario.requests):
                seen = Seen(spec)
                world.seen.append(seen)
                nursery.start_soon(_consume, h, seen, index)
        try:
            await h.assert_quiescent()
        except AssertionError as exc:
            world.quiescent_error = f"not quiescent: {exc}"
        # Every racer is closed before its consumer's request ends, so each
        # abandoned provider request has been sent `cancel`: wait until the
        # providers have heard it (bounded, so a missing cancel fails, not hangs).
        with trio.move_on_after(60):
            await h.until(lambda: not _unstopped(world))
        accounts = h.coordinator.accounts
        world.open_reservations = len(accounts.ledger.open)
        await accounts.flush()
        world.ledger = _ledger_rows(accounts.store)
        return world


def _ledger_rows(store: Any) -> dict[str, tuple[int, int, str]]:
    """Every closed reservation, read from the embedded store's table (in memory here)."""
    rows = store._db.execute(
        "SELECT request_id, prompt_tokens, completion_tokens, close FROM ledger").fetchall()
    return {request_id: (prompt, completion, close)
            for request_id, prompt, completion, close in rows}


async def _churn(h: Any, spec: ProviderSpec) -> None:
    assert spec.drop_at is not None
    await trio.sleep(spec.drop_at)
    h.kill(spec.provider_id)
    await h.wait_gone(spec.provider_id)
    if spec.back_after is not None:
        await trio.sleep(spec.back_after)
        await h.connect(h.providers[spec.provider_id])


async def _consume(h: Any, seen: Seen, index: int) -> None:
    await trio.sleep(seen.spec.at)
    seen.started = trio.current_time()
    hangup = trio.Event()
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    payload = json.dumps(body_for(seen.spec, index)).encode()
    async with trio.open_nursery() as nursery:
        if seen.spec.hang_up_after is not None:
            nursery.start_soon(_hang_up, hangup, seen.spec.hang_up_after, seen)
        seen.result = await asgi_call(h.coordinator.asgi, "POST", seen.spec.endpoint, headers,
                                      payload, disconnect=hangup)
        seen.finished = trio.current_time()
        nursery.cancel_scope.cancel()


async def _hang_up(event: trio.Event, after: float, seen: Seen) -> None:
    await trio.sleep(after)
    seen.hung_up = True
    event.set()


def play(scenario: Scenario) -> World:
    return trio.run(run_scenario, scenario, clock=trio.testing.MockClock(autojump_threshold=0))


# ---- invariants --------------------------------------------------------------------

WIRE_ID = re.compile(r"([0-9a-f]{16})\.(\d+)")


def _text(endpoint: str, result: HttpResult, stream: bool) -> str:
    if not stream:
        body = result.json()
        match endpoint:
            case "/v1/chat/completions":
                return body["choices"][0]["message"]["content"] or ""
            case "/v1/completions":
                return str(body["choices"][0]["text"])
            case "/v1/responses":
                return "".join(c.get("text", "") for item in body["output"]
                               for c in item.get("content", []))
            case _:
                return "".join(b.get("text", "") for b in body["content"] if b["type"] == "text")
    out = []
    for event in result.sse_json:
        if "error" in event or event.get("type") == "error":
            continue
        match endpoint:
            case "/v1/chat/completions":
                out += [(c.get("delta") or {}).get("content") or "" for c in event.get("choices", [])]
            case "/v1/completions":
                out += [c.get("text") or "" for c in event.get("choices", [])]
            case "/v1/responses":
                if event.get("type") == "response.output_text.delta":
                    out.append(event["delta"])
            case _:
                if event.get("type") == "content_block_delta":
                    out.append(event["delta"].get("text", ""))
    return "".join(out)


def _terminators(endpoint: str, result: HttpResult) -> int:
    events = result.sse
    if endpoint in (Endpoint.RESPONSES.value, Endpoint.MESSAGES.value):
        final = {"response.completed", "message_stop", "error"}
        return sum(1 for name, _ in events if name in final)
    return sum(1 for _, data in events if data == "[DONE]")


def _errors_in_band(result: HttpResult) -> int:
    return sum(1 for name, data in result.sse
               if name == "error" or data.startswith('{"error"'))


def check_invariants(world: World) -> None:
    """Raise AssertionError naming the first broken promise."""
    cfg = world.config
    assert world.quiescent_error is None, world.quiescent_error
    received = _provider_events(world)
    _check_routing(world)
    per_attempt = max(cfg.ttft_base + 1.0 + cfg.preamble_timeout,
                      (cfg.ttft_base + 1.0) * cfg.backup_fraction + cfg.inference_timeout)
    head_bound = cfg.max_attempts * (cfg.queue_timeout + per_attempt) + 1.0
    for seen in world.seen:
        result = seen.result
        assert result is not None, "a request never ended"
        if seen.hung_up and result.status == 0:
            continue  # left before any answer: nothing to check but cleanup
        assert result.started_at is not None
        waited = result.started_at - seen.started
        assert waited <= head_bound, f"waited {waited:.1f}s > budget {head_bound:.1f}s"
        if result.status != 200:
            if seen.hung_up and _cut_short(result):
                continue  # left between the head and the body: a cut answer is all it gets
            _check_error_shape(seen, result)
            assert not WIRE_ID.search(result.body.decode()), "provider bytes in an error"
            continue
        request_id = result.headers["x-request-id"]
        winner = result.headers["x-provider-id"]
        wires = {m.group(0) for m in WIRE_ID.finditer(result.body.decode())
                 if m.group(1) == request_id}
        assert len(wires) <= 1, f"bytes from several racers reached the consumer: {wires}"
        for wire in wires:
            assert received.get(wire, (None,))[0] == winner, f"{wire} is not the winner's"
        text = _text(seen.spec.endpoint, result, seen.spec.stream)
        expected_prefix = f"Hello from {_model(seen)} on {winner}."
        assert expected_prefix.startswith(text) or text.startswith(expected_prefix[:len(text)]), \
            f"content duplicated or foreign: {text!r}"
        if seen.spec.stream and not seen.hung_up:
            assert _terminators(seen.spec.endpoint, result) == 1, "not exactly one terminator"
            errors = _errors_in_band(result)
            assert errors <= 1, "more than one in-band error"
            if errors:
                assert text, "an in-band error before any content"
                commit = result.started_at
                later = [w for w, (_, t) in received.items()
                         if w.startswith(request_id + ".") and t > commit]
                assert not later, f"post-content failure was retried: {later}"
    _check_cancels(world)
    _check_ledger(world)


def _check_ledger(world: World) -> None:
    """Charged exactly once, for what the consumer received: the tokens of a completed
    answer (its usage), or the content events a cut stream delivered; a request that
    delivered nothing is refunded; no reservation is left open."""
    assert world.open_reservations == 0, f"{world.open_reservations} reservations left open"
    charged = 0
    for seen in world.seen:
        result = seen.result
        assert result is not None
        if result.status != 200:
            continue  # refunded: the total below counts every entry
        request_id = result.headers["x-request-id"]
        prompt, completion, close = world.ledger[request_id]
        if seen.spec.stream:
            received = _content_events(seen.spec.endpoint, result)
            assert completion == received, \
                f"{request_id} charged {completion} completion tokens, received {received}"
            assert (prompt > 0) == (received > 0), f"{request_id} prompt charge {prompt}"
        elif not _has_answer(seen.spec.endpoint, result):
            assert (prompt, completion) == (0, 0), f"{request_id}: an empty answer charged"
        else:
            usage = result.json()["usage"]
            expected = (usage.get("prompt_tokens", usage.get("input_tokens")),
                        usage.get("completion_tokens", usage.get("output_tokens")))
            assert (prompt, completion) == expected, f"{request_id} charged {prompt, completion}"
        assert close == ("settled" if prompt + completion else "refunded"), (request_id, close)
        charged += prompt + completion
    total = sum(prompt + completion for prompt, completion, _ in world.ledger.values())
    assert total == charged, f"the ledger charged {total}, consumers received {charged}"


def _has_answer(endpoint: str, result: HttpResult) -> bool:
    """A non-streaming answer with text or a tool call in it."""
    body = result.json()
    if _text(endpoint, result, False):
        return True
    match endpoint:
        case "/v1/chat/completions":
            return bool(body["choices"][0]["message"].get("tool_calls"))
        case "/v1/responses":
            return any(item.get("type") == "function_call" for item in body["output"])
        case "/v1/messages":
            return any(block.get("type") == "tool_use" for block in body["content"])
    return False


def _content_events(endpoint: str, result: HttpResult) -> int:
    """Pieces of the answer the consumer received (text or a tool call's arguments)."""
    pieces = 0
    for event in result.sse_json:
        match endpoint:
            case "/v1/chat/completions":
                deltas = [c.get("delta") or {} for c in event.get("choices", [])]
                pieces += any(d.get("content") or d.get("tool_calls") for d in deltas)
            case "/v1/completions":
                pieces += any(c.get("text") for c in event.get("choices", []))
            case "/v1/responses":
                pieces += str(event.get("type", "")).endswith(".delta")
            case _:
                pieces += event.get("type") == "content_block_delta"
    return pieces


def _model(seen: Seen) -> str:
    return VISION if seen.spec.media else MODEL


def _cut_short(result: HttpResult) -> bool:
    """Less body than the head announced (quart-trio stops sending once the client leaves)."""
    announced = result.headers.get("content-length")
    return announced is not None and len(result.body) < int(announced)


def _check_error_shape(seen: Seen, result: HttpResult) -> None:
    body = result.json()
    if seen.spec.endpoint == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"], body
    else:
        assert body["error"]["message"] and body["error"]["type"], body
    if result.status in (429, 503):
        assert "retry-after" in result.headers


def _provider_events(world: World) -> dict[str, tuple[str, float]]:
    """wire id -> (provider id, time received)."""
    out = {}
    for pid, provider in world.providers.items():
        for at, event, wire in provider.log:
            if event == "received":
                out[wire] = (pid, at)
    return out


def _check_routing(world: World) -> None:
    """Every grant against an independent model of the rules."""
    specs = {s.provider_id: s for s in world.scenario.providers}
    floor = parse_version(world.config.capability_floors.get("tools"))
    strikes: dict[tuple[str, str, str], list[float]] = {}
    cooling: dict[tuple[str, str, str], float] = {}
    primaries: list[float] = []
    backups: list[float] = []
    for event, now, details in sorted(world.audit, key=lambda e: e[1]):
        if event == "cold_backup":
            continue  # a primary loading a cold model: outside the hedge budget
        if event in ("primary", "backup"):
            (primaries if event == "primary" else backups).append(now)
            if event == "backup":
                window = world.config.hedge_window
                recent = [t for t in primaries if now - t <= window]
                spent = [t for t in backups if now - t <= window]
                assert len(spent) <= world.config.hedge_budget * len(recent) + 2, \
                    f"hedge budget exceeded at {now}: {len(spent)} backups, {len(recent)} primaries"
            continue
        if event == "register":
            # A fresh session of a provider starts with a clean slate.
            for table in (strikes, cooling):
                for key in [k for k in table if k[0] == details["provider_id"]]:
                    del table[key]
            continue
        lease = details["lease"]
        key = (lease.provider_id, lease.model, lease.shape)
        if event == "release":
            outcome = details["outcome"]
            if outcome.kind is OutcomeKind.SUCCESS:
                strikes.pop(key, None)
                cooling.pop(key, None)
            elif outcome.kind is OutcomeKind.FAILURE and outcome.status in (500, 502, 504):
                if cooling.get(key, -1.0) > now:
                    cooling[key] = now + world.config.breaker_cooldown
                    continue
                recent = [t for t in strikes.get(key, []) if now - t < world.config.breaker_window]
                recent.append(now)
                if len(recent) >= world.config.breaker_strikes:
                    strikes.pop(key, None)
                    cooling[key] = now + world.config.breaker_cooldown
                else:
                    strikes[key] = recent
            continue
        job = details["job"]
        spec = specs[lease.provider_id]
        assert spec.template_render_ok is not False, f"routed to template-fenced {key}"
        if job.traits.requires_vision:
            assert spec.vision, f"media routed to non-vision {key}"
        if job.traits.has_tools:
            assert meets_floor(parse_version(spec.version), floor), f"tools below floor {key}"
        assert cooling.get(key, -1.0) <= now, f"routed to cooled {key}"


def _check_cancels(world: World) -> None:
    """Every provider request ended by the provider, by its socket, or by our cancel."""
    unstopped = _unstopped(world)
    assert not unstopped, f"never told to stop: {unstopped}"


def _unstopped(world: World) -> list[str]:
    out = []
    for pid, provider in world.providers.items():
        ended: dict[str, set[str]] = {}
        for _, event, wire in provider.log:
            ended.setdefault(wire, set()).add(event)
        closed_at = [t for t, e, _ in provider.log if e == "closed"]
        dropped = bool(closed_at) or any(s.drop_at is not None for s in world.scenario.providers
                                         if s.provider_id == pid)
        for wire, events in ended.items():
            if "received" not in events:
                continue
            if not (events & {"complete", "error", "cancel", "closed"} or dropped):
                out.append(f"{pid}:{wire}")
    return out


def main(argv: list[str]) -> None:
    scenario = from_json(argv[1])
    world = play(scenario)
    check_invariants(world)
    print(f"replayed {len(scenario.requests)} requests on {len(scenario.providers)} providers:")
    for seen in world.seen:
        r = seen.result
        print(f"  {seen.spec.endpoint:22} stream={seen.spec.stream!s:5} -> "
              f"{r.status if r else '-'} {r.headers.get('x-provider-id', '') if r else ''}")
    print("all invariants hold")


if __name__ == "__main__":
    main(sys.argv)

"""``coordinator load``: concurrent consumers against any OpenAI-compatible URL.

Bounded in count and time, loopback only. Reports the success rate, every
client-visible error by kind, p50/p90/p99 time to first byte and total latency,
requests per second, and (when the target is a coordinator) its failover and
speculative counters; writes JSON, prints a readable summary with a progress
bar while it runs, and optionally a latency-CDF PNG (needs matplotlib).
With ``--embedded N`` it first starts a coordinator and N simulated providers
in this process, with ``--fault-mix`` applied to the fleet.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import sys
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from coordinator.protocol.endpoints import Endpoint

from .client import ConnectionLost, HttpConnection

IMAGE_DATA = "iVBORw0KGgo="
IMAGE_URL = f"data:image/png;base64,{IMAGE_DATA}"
IMAGE = {"type": "image_url", "image_url": {"url": IMAGE_URL}}
LOOKUP = {"type": "object", "properties": {"q": {"type": ["string", "null"]}}}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": LOOKUP}}


@attrs.frozen
class Mix:
    stream: float = 0.8
    tools: float = 0.1
    images: float = 0.0


@attrs.define
class Stats:
    started: float = 0.0
    started_requests: int = 0
    done: int = 0
    ok: int = 0
    errors: dict[str, int] = attrs.field(factory=dict)
    first_byte: list[float] = attrs.field(factory=list)
    total: list[float] = attrs.field(factory=list)

    def record_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


TRANSPORT_BACKOFF = 0.1  # seconds a consumer waits after a connection fails


def require_loopback(url: str) -> tuple[str, int]:
    """The URL's host and port; SystemExit with a reason unless it is on loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or 80
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"cannot load {url}: {exc}") from None
    for info in infos:
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise SystemExit(f"refusing to load {host}: load runs target loopback only")
    return host, port


CHAT, COMPLETIONS, RESPONSES, MESSAGES = (e.value for e in (
    Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES, Endpoint.MESSAGES))
PATHS = tuple(e.value for e in Endpoint)
RESPONSES_TOOL = {"type": "function", "name": "lookup", "parameters": LOOKUP}
MESSAGES_TOOL = {"name": "lookup", "input_schema": LOOKUP}


def make_body(model: str, mix: Mix, rng: random.Random, tokens: int,
              extra: dict[str, Any] | None = None, path: str = CHAT) -> dict[str, Any]:
    """One request body in the shape ``path`` takes (images and tools where it has them)."""
    stream = rng.random() < mix.stream
    image, tools = rng.random() < mix.images, rng.random() < mix.tools
    body: dict[str, Any] = {"model": model, "stream": stream}
    if path == COMPLETIONS:
        body.update(prompt="Say something.", max_tokens=tokens)
    elif path == RESPONSES:
        body.update(input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            *([{"type": "input_image", "image_url": IMAGE_URL}] if image else [])]}],
            max_output_tokens=tokens)
        if tools:
            body["tools"] = [RESPONSES_TOOL]
    elif path == MESSAGES:
        content: Any = "Say something."
        if image:
            content = [{"type": "text", "text": "What is this?"},
                       {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                    "data": IMAGE_DATA}}]
        body.update(max_tokens=tokens, messages=[{"role": "user", "content": content}])
        if tools:
            body["tools"] = [MESSAGES_TOOL]
    else:
        content = [{"type": "text", "text": "What is this?"}, IMAGE] if image else "Say something."
        body.update(max_tokens=tokens, messages=[{"role": "user", "content": content}])
        if tools:
            body["tools"] = [TOOL]
    return {**body, **(extra or {})}


_FINAL_EVENTS = {MESSAGES: "message_stop", RESPONSES: "response.completed"}


def classify_reply(status: int, body: bytes, stream: bool, path: str = CHAT) -> str | None:
    """None for a clean answer; otherwise the kind of error the consumer saw."""
    if status != 200:
        try:
            error = json.loads(body).get("error", {})
            kind = error.get("code") or error.get("type") or "error"
        except (ValueError, AttributeError):
            kind = "unparsable"
        return f"http_{status}:{kind}"
    if stream:
        text = body.decode(errors="replace")
        final = _FINAL_EVENTS.get(path)
        if final is not None:  # these streams end with a final event; errors are events
            if "event: error" in text:
                return "inband_error"
            return None if f"event: {final}" in text else "truncated_stream"
        if 'data: {"error"' in text:
            return "inband_error"
        if not text.rstrip().endswith("data: [DONE]"):
            return "truncated_stream"
    return None


async def consumer(host: str, port: int, path: str, key: str, model: str, mix: Mix,
                   tokens: int, rng: random.Random, stats: Stats, deadline: float,
                   budget: list[int], extra: dict[str, Any] | None = None) -> None:
    conn = HttpConnection(host, port)
    headers = [("content-type", "application/json")]
    if key:  # no key: a target that needs none (a provider's own HTTP mode)
        headers.append(("authorization", f"Bearer {key}"))
    try:
        while trio.current_time() < deadline and budget[0] > 0:
            budget[0] -= 1
            stats.started_requests += 1
            body = make_body(model, mix, rng, tokens, extra, path)
            try:
                reply = await conn.request("POST", path, headers, json.dumps(body).encode())
            except (OSError, ConnectionLost, trio.BrokenResourceError) as exc:
                stats.done += 1
                stats.record_error(f"transport:{type(exc).__name__}")
                # A server that refuses connections (draining, gone) is not hammered.
                await trio.sleep(TRANSPORT_BACKOFF)
                continue
            stats.done += 1
            kind = classify_reply(reply.status, reply.body, bool(body["stream"]), path)
            if kind is None:
                stats.ok += 1
                stats.first_byte.append(reply.first_byte)
                stats.total.append(reply.total)
            else:
                stats.record_error(kind)
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()


async def progress(stats: Stats, deadline: float, requests: int | None) -> None:
    while True:
        await trio.sleep(0.5)
        elapsed = trio.current_time() - stats.started
        span = deadline - stats.started
        fraction = min(1.0, max(elapsed / span if span else 0.0,
                                stats.done / requests if requests else 0.0))
        bar = "#" * int(fraction * 30)
        sys.stderr.write(f"\r[{bar:<30}] {stats.done} done, {sum(stats.errors.values())} errors, "
                         f"{stats.done / max(elapsed, 1e-9):.0f} req/s")
        sys.stderr.flush()


async def scrape_counters(host: str, port: int) -> dict[str, float]:
    """Coordinator failover and speculative counters from /metrics (empty if absent)."""
    conn = HttpConnection(host, port)
    try:
        reply = await conn.request("GET", "/metrics", [])
    except (OSError, ConnectionLost):
        return {}
    finally:
        await conn.aclose()
    if reply.status != 200:
        return {}
    wanted = ("coordinator_dispatch_total", "coordinator_speculative_dispatch_total",
              "coordinator_speculative_win_total", "coordinator_inband_error_total",
              "coordinator_cooldown_entered_total")
    counters: dict[str, float] = {}
    for line in reply.body.decode().splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            counters[name] = float(value)
    return counters


async def run_load(url: str, *, key: str, model: str, concurrency: int, duration: float,
                   requests: int | None, mix: Mix, tokens: int = 16, seed: int = 0,
                   path: str = "/v1/chat/completions", show_progress: bool = True,
                   grace: float = 5.0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    host, port = require_loopback(url)
    stats = Stats(started=trio.current_time())
    deadline = stats.started + duration
    budget = [requests if requests is not None else 10**12]
    before = await scrape_counters(host, port)
    async with trio.open_nursery() as nursery:
        if show_progress:
            nursery.start_soon(progress, stats, deadline, requests)
        # Bounded in time: requests still running a grace period after the
        # deadline (a stalled stream, say) are cut off and counted.
        with trio.move_on_at(deadline + grace):
            async with trio.open_nursery() as consumers:
                for i in range(concurrency):
                    consumers.start_soon(consumer, host, port, path, key, model, mix, tokens,
                                         random.Random(seed * 10_000 + i), stats, deadline,
                                         budget, extra)
        nursery.cancel_scope.cancel(reason="load run over")
    cut_off = stats.started_requests - stats.done
    if cut_off:
        stats.errors["cut_off_at_deadline"] = cut_off
    if show_progress:
        sys.stderr.write("\n")
    elapsed = trio.current_time() - stats.started
    after = await scrape_counters(host, port)
    return {
        "url": url, "concurrency": concurrency, "elapsed_s": elapsed,
        "requests": stats.started_requests,
        "ok": stats.ok,
        "success_rate": stats.ok / stats.started_requests if stats.started_requests else 0.0,
        "errors": stats.errors, "requests_per_s": stats.done / elapsed if elapsed else 0.0,
        "first_byte_ms": {f"p{q}": percentile(stats.first_byte, q) * 1000 for q in (50, 90, 99)},
        "total_ms": {f"p{q}": percentile(stats.total, q) * 1000 for q in (50, 90, 99)},
        "coordinator": {k: after[k] - before.get(k, 0.0) for k in after},
        "_samples": {"first_byte": stats.first_byte, "total": stats.total},
    }


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"{report['requests']} requests in {report['elapsed_s']:.1f}s at concurrency "
        f"{report['concurrency']}: {report['requests_per_s']:.1f} req/s, "
        f"success {report['success_rate'] * 100:.2f}%",
        "time to first byte ms: " + "  ".join(f"{k} {v:.2f}" for k, v in
                                               report["first_byte_ms"].items()),
        "total latency ms:      " + "  ".join(f"{k} {v:.2f}" for k, v in
                                               report["total_ms"].items()),
    ]
    if report["errors"]:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(report["errors"].items())))
    if report["coordinator"]:
        lines.append("coordinator: " + ", ".join(
            f"{k.replace('coordinator_', '')} +{v:g}" for k, v in sorted(report["coordinator"].items())
            if v))
    return "\n".join(lines)


def write_cdf(report: dict[str, Any], path: str) -> str:
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        return "matplotlib is not installed: no CDF written (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, samples in report["_samples"].items():
        ordered = sorted(s * 1000 for s in samples)
        if ordered:
            ax.plot(ordered, [i / len(ordered) for i in range(1, len(ordered) + 1)], label=name)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"latency CDF written to {path}"


# The embedded fleet fails a few requests after boilerplate, so a plain run shows
# the invisible failover at work (the consumer should still see 100 % success).
DEFAULT_FAULT_MIX = "role_then_error=0.05,role_then_disconnect=0.02"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="target, loopback only (default: an embedded coordinator and fleet)")
    parser.add_argument("--key", default="", help="API key for --url (default: none)")
    parser.add_argument("--model", default="sim-chat-small", help="model (default: %(default)s)")
    parser.add_argument("--path", default=CHAT, choices=PATHS,
                        help="endpoint; bodies take its shape (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="concurrent consumers (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds, at most 600 (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=None,
                        help="stop after this many (default: no limit)")
    parser.add_argument("--stream", type=float, default=0.8,
                        help="fraction streaming (default: %(default)s)")
    parser.add_argument("--tools", type=float, default=0.1,
                        help="fraction with tools (default: %(default)s)")
    parser.add_argument("--images", type=float, default=0.0,
                        help="fraction with an image (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=16,
                        help="max_tokens per request (default: %(default)s)")
    parser.add_argument("--embedded", type=int, default=4,
                        help="providers of the embedded fleet (default: %(default)s)")
    parser.add_argument("--fault-mix", default=DEFAULT_FAULT_MIX,
                        help="embedded fleet faults per request, e.g. "
                        "role_then_error=0.05,stall=0.01; '' for a healthy fleet "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--json", default=None, help="write the report here (default: no)")
    parser.add_argument("--cdf", default=None,
                        help="write a latency CDF PNG here; needs matplotlib (default: no)")


def parse_fault_mix(text: str) -> tuple[tuple[float, Any], ...]:
    from provider_sim.behaviours import parse_behaviour

    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        spec, _, probability = part.rpartition("=")
        out.append((float(probability), parse_behaviour(spec)))
    return tuple(out)


async def run_embedded(args: argparse.Namespace) -> dict[str, Any]:
    from coordinator.app import serve
    from coordinator.config import Config
    from provider_sim.behaviours import Behaviour
    from provider_sim.fleet import demo_fleet, run_fleet

    config = Config(http_port=0, provider_port=0, api_keys=("load",),
                    provider_tokens=("demo-provider-token",), seed=args.seed)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(serve, config)
        fleet = demo_fleet(args.embedded, behaviour=Behaviour(tokens=args.tokens), seed=args.seed)
        for provider in fleet:
            provider.fault_mix = parse_fault_mix(args.fault_mix)
        nursery.start_soon(run_fleet, fleet, running.provider_url)
        await running.registry.wait_for(lambda state: len(state.providers) >= len(fleet))
        report = await _run(args, running.http_url, "load")
        nursery.cancel_scope.cancel(reason="load run over")
    return report


async def _run(args: argparse.Namespace, url: str, key: str) -> dict[str, Any]:
    return await run_load(
        url, key=key, model=args.model, concurrency=args.concurrency,
        duration=min(args.duration, 600.0), requests=args.requests,
        mix=Mix(args.stream, args.tools, args.images), tokens=args.tokens, seed=args.seed,
        path=args.path)


def run_from_args(args: argparse.Namespace) -> None:
    from provider_sim.signals import until_signalled

    embedded = args.url is None
    if not embedded:
        require_loopback(args.url)  # here, so a refusal is one line, not a traceback
    report = (trio.run(until_signalled, run_embedded, args) if embedded
              else trio.run(until_signalled, _run, args, args.url, args.key))
    if report is None:
        print("interrupted: no report", file=sys.stderr)
        return
    print(summary(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({k: v for k, v in report.items() if not k.startswith("_")}, out, indent=2)
        print(f"report written to {args.json}")
    if args.cdf:
        print(write_cdf(report, args.cdf))

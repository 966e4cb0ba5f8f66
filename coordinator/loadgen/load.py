"""``coordinator load``: concurrent consumers against any OpenAI-compatible URL.

Bounded in count and time, loopback only. Reports the success rate, every
client-visible error by kind, p50/p90/p99 time to first byte and total latency,
requests per second, and (when the target is a coordinator) its failover and
speculative counters; writes JSON, prints a readable summary with a progress
bar while it runs, and optionally a latency-CDF PNG (needs matplotlib).
The command line (flags, the embedded fleet, signals, exit status) is in
``cli.py``.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from coordinator.protocol.endpoints import Endpoint
from coordinator.untrusted import printable

from .client import ConnectionLost, HttpConnection
from .progress import ProgressBar, bar_for

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


def loopback_address(url: str) -> tuple[str, int]:
    """The URL's host and port; ValueError with a reason unless it is on loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or 80
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot load {url}: {exc}") from None
    for info in infos:
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise ValueError(f"refusing to load {host}: load runs target loopback only")
    return host, port


def require_loopback(url: str) -> tuple[str, int]:
    """The URL's host and port; SystemExit with a reason unless it is on loopback."""
    try:
        return loopback_address(url)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


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
        # The server's word, printed in the report: one short line, whatever it sent.
        return f"http_{status}:{printable(kind, 60)}"
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


async def progress(stats: Stats, deadline: float, requests: int | None,
                   bar: ProgressBar) -> None:
    while True:
        elapsed = trio.current_time() - stats.started
        span = deadline - stats.started
        fraction = min(1.0, max(elapsed / span if span else 0.0,
                                stats.done / requests if requests else 0.0))
        filled = "#" * int(fraction * 30)
        bar.draw(f"[{filled:<30}] {stats.done} done, {sum(stats.errors.values())} errors, "
                 f"{stats.done / max(elapsed, 1e-9):.0f} req/s")
        await trio.sleep(0.5)


SCRAPE_TIMEOUT = 5.0  # seconds: a target that does not answer /metrics has no counters


async def scrape_counters(host: str, port: int) -> dict[str, float]:
    """Coordinator failover and speculative counters from /metrics (empty if absent)."""
    conn = HttpConnection(host, port)
    reply = None
    try:
        with trio.move_on_after(SCRAPE_TIMEOUT):
            reply = await conn.request("GET", "/metrics", [])
    except (OSError, ConnectionLost, trio.BrokenResourceError):
        return {}
    finally:
        with trio.CancelScope(shield=True):
            await conn.aclose()
    if reply is None or reply.status != 200:
        return {}
    wanted = ("coordinator_dispatch_total", "coordinator_speculative_dispatch_total",
              "coordinator_speculative_win_total", "coordinator_inband_error_total",
              "coordinator_cooldown_entered_total")
    counters: dict[str, float] = {}
    for line in reply.body.decode(errors="replace").splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            try:
                counters[name] = float(value)
            except ValueError:
                continue
    return counters


async def first_of(stop: trio.Event, work: Callable[[], Awaitable[None]]) -> bool:
    """Run ``work`` until it returns or ``stop`` is set; True if it was stopped."""
    stopped = False
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            await work()
            nursery.cancel_scope.cancel(reason="done")

        async def watch() -> None:
            nonlocal stopped
            await stop.wait()
            stopped = True
            nursery.cancel_scope.cancel(reason="stopped")

        nursery.start_soon(run)
        nursery.start_soon(watch)
    return stopped


async def run_load(url: str, *, key: str, model: str, concurrency: int, duration: float,
                   requests: int | None, mix: Mix, tokens: int = 16, seed: int = 0,
                   path: str = "/v1/chat/completions", show_progress: bool = True,
                   grace: float = 5.0, extra: dict[str, Any] | None = None,
                   stop: trio.Event | None = None,
                   bar: ProgressBar | None = None) -> dict[str, Any]:
    """Drive ``url`` and report. Setting ``stop`` ends the run early: the report then
    covers the requests completed so far and says it is partial.

    The progress bar goes to ``bar``, or with ``show_progress`` to stderr if a terminal.
    """
    host, port = require_loopback(url)
    stop = stop if stop is not None else trio.Event()
    if bar is None and show_progress:
        bar = bar_for(sys.stderr)
    stats = Stats(started=trio.current_time())
    deadline = stats.started + duration
    budget = [requests if requests is not None else 10**12]
    before = await scrape_counters(host, port)

    async def drive() -> None:
        # Bounded in time: requests still running a grace period after the
        # deadline (a stalled stream, say) are cut off and counted.
        with trio.move_on_at(deadline + grace):
            async with trio.open_nursery() as consumers:
                for i in range(concurrency):
                    consumers.start_soon(consumer, host, port, path, key, model, mix, tokens,
                                         random.Random(seed * 10_000 + i), stats, deadline,
                                         budget, extra)

    async with trio.open_nursery() as nursery:
        if bar is not None:
            nursery.start_soon(progress, stats, deadline, requests, bar)
        stopped = await first_of(stop, drive)
        nursery.cancel_scope.cancel(reason="load run over")
    if bar is not None:
        bar.finish()
    in_flight = stats.started_requests - stats.done
    if in_flight and not stopped:
        stats.errors["cut_off_at_deadline"] = in_flight
    # Stopped early: what was in flight was abandoned by us, not failed by the target.
    counted = stats.done if stopped else stats.started_requests
    elapsed = trio.current_time() - stats.started
    after = await scrape_counters(host, port)
    return {
        "url": url, "concurrency": concurrency, "elapsed_s": elapsed,
        "partial": stopped,
        "abandoned_in_flight": in_flight if stopped else 0,
        "requests": counted,
        "ok": stats.ok,
        "success_rate": stats.ok / counted if counted else 0.0,
        "errors": stats.errors, "requests_per_s": stats.done / elapsed if elapsed else 0.0,
        "first_byte_ms": {f"p{q}": percentile(stats.first_byte, q) * 1000 for q in (50, 90, 99)},
        "total_ms": {f"p{q}": percentile(stats.total, q) * 1000 for q in (50, 90, 99)},
        "coordinator": {k: after[k] - before.get(k, 0.0) for k in after},
        "_samples": {"first_byte": stats.first_byte, "total": stats.total},
    }


def summary(report: dict[str, Any]) -> str:
    lines = [
        *([f"PARTIAL REPORT: stopped early ({report.get('interrupted_by') or 'stop'}); "
           f"{report['abandoned_in_flight']} request(s) in flight were abandoned, not counted"]
          if report.get("partial") else []),
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

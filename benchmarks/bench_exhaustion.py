"""Resource exhaustion on loopback: the coordinator (a subprocess, with a 2-provider fleet) under
A, 2,000 consumer connections, one chat request each, then held idle; B, 100 provider WebSockets each
sending 6 MiB of a text frame announced as 8 MiB, then held (B_small: 192 KiB, under the pre-registration
limit). Samples the server's RSS and fds. ``python -m benchmarks.bench_exhaustion [--json]``, ~1 min.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import h11
import trio

from benchmarks.bench_stack import ROOT, free_port, rss_kib, wait_ready

KEY, TOKEN, HOST, BIN = "k", "t", "127.0.0.1", Path(sys.executable).parent
CHAT = b'{"model":"sim-chat-small","messages":[{"role":"user","content":"hi"}]}'
FAILS = (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError)
CONSUMERS, PROVIDERS, CHUNK = 2000, 100, b"a" * 65536
FRAME_HEAD = bytes([0x81, 0x80 | 127]) + (8 << 20).to_bytes(8, "big") + b"\0\0\0\0"  # zero mask
UPGRADE = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
REQUEST = h11.Request(method="POST", target="/v1/chat/completions", headers=[
    ("host", HOST), ("authorization", f"Bearer {KEY}"), ("content-type", "application/json"),
    ("content-length", str(len(CHAT)))])
Stats = dict[str, Any]


def snapshot(pid: int) -> Stats:
    return {"rss_mib": round(rss_kib(pid) / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


async def sample(pid: int, top: Stats) -> None:  # top: the peaks since it was last cleared
    while True:
        top.update({k: max(v, top.get(k, 0)) for k, v in snapshot(pid).items()})
        await trio.sleep(0.05)


async def chat(port: int, budget: float = 20.0) -> Stats:
    """One chat request on a fresh connection: its status (or error) and latency."""
    start = trio.current_time()
    try:
        with trio.fail_after(budget):
            async with await trio.open_tcp_stream(HOST, port) as stream:
                status: int | str = await exchange(stream)
    except FAILS as exc:
        status = type(exc).__name__
    return {"status": status, "latency_s": round(trio.current_time() - start, 3)}


async def exchange(stream: trio.SocketStream) -> int:  # send the chat request, read the response
    conn, status = h11.Connection(h11.CLIENT), 0
    for part in (REQUEST, h11.Data(data=CHAT), h11.EndOfMessage()):
        await stream.send_all(conn.send(part) or b"")
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))  # at EOF next_event() raises
        status = getattr(event, "status_code", status)
    return status


async def until_eof(stream: trio.SocketStream) -> bytes:  # all the peer sends until it closes or resets
    got = bytearray()
    with contextlib.suppress(trio.BrokenResourceError):
        while data := await stream.receive_some(65536):
            got += data
    return bytes(got)


async def attack_a(port: int, pid: int) -> Stats:
    """Connect, one request each, then idle until the server closes (bounded concurrency)."""
    n: collections.Counter[str] = collections.Counter()  # statuses, failures, idle held now/peak
    closed_after: list[float] = []
    probes: list[Stats] = []
    limiter, start = trio.CapacityLimiter(200), trio.current_time()

    async def consumer() -> None:
        stream: trio.SocketStream | None = None
        try:
            async with limiter:
                with trio.fail_after(30):
                    stream = await trio.open_tcp_stream(HOST, port)
                with trio.fail_after(60):
                    n[f"status {await exchange(stream)}"] += 1
            served, n["held"] = trio.current_time(), n["held"] + 1
            n["peak_held"] = max(n["peak_held"], n["held"])
            with trio.move_on_after(30):
                await until_eof(stream)
                closed_after.append(trio.current_time() - served)
            n["held"] -= 1
        except FAILS as exc:
            n[f"failed {type(exc).__name__}"] += 1
        finally:
            if stream is not None:
                await stream.aclose()

    async def probe() -> None:  # a fresh request on a new connection every 2 s
        while True:
            await trio.sleep(2.0)
            probes.append({"idle_held": n["held"], **snapshot(pid), **(await chat(port))})

    with trio.move_on_after(60):  # the whole run stays under 3 minutes
        async with trio.open_nursery() as outer:
            outer.start_soon(probe)
            async with trio.open_nursery() as nursery:
                for _ in range(CONSUMERS):
                    nursery.start_soon(consumer)
            outer.cancel_scope.cancel()
    return {"counts": dict(n), "seconds": round(trio.current_time() - start, 1), "probes": probes,
            "closed_by_server": len(closed_after), "max_close_s": round(max(closed_after, default=-1), 3),
            "median_close_s": round(statistics.median(closed_after or [-1]), 3)}


async def attack_b(http_port: int, port: int, size: int) -> Stats:
    """Every handshake first (filling admission), then on each accepted socket a half-sent frame."""
    n: collections.Counter[str] = collections.Counter()  # handshake statuses, server close codes
    accepted: list[tuple[trio.SocketStream, bytes]] = []
    eof_s: list[float] = []
    sent_kib: list[float] = []

    async def handshake() -> None:
        stream, head = None, b""
        with contextlib.suppress(*FAILS), trio.fail_after(10):
            stream = await trio.open_tcp_stream(HOST, port)
            await stream.send_all(UPGRADE)
            while b"\r\n\r\n" not in head and (data := await stream.receive_some(4096)):
                head += data
        n[f"handshake {head.split(b' ', 2)[1].decode() if head else 'failed'}"] += 1
        if stream is not None and head.startswith(b"HTTP/1.1 101"):
            accepted.append((stream, head.partition(b"\r\n\r\n")[2]))
        elif stream is not None:
            await stream.aclose()

    async def half_frame(stream: trio.SocketStream, got: bytes) -> None:
        start, sent = trio.current_time(), 0

        async def send() -> None:
            nonlocal sent
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(FRAME_HEAD)
                while sent < size:
                    await stream.send_all(CHUNK[:size - sent])
                    sent += len(CHUNK[:size - sent])

        with trio.move_on_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                got += await until_eof(stream)
                eof_s.append(trio.current_time() - start)
                nursery.cancel_scope.cancel()
        sent_kib.append(sent / 1024)
        n[f"close {int.from_bytes(got[2:4], 'big') if len(got) >= 4 and got[0] == 0x88 else None}"] += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(PROVIDERS):
            nursery.start_soon(handshake)
    async with trio.open_nursery() as nursery:
        for stream, got in accepted:
            nursery.start_soon(half_frame, stream, got)
        await trio.sleep(0.05)  # the frames are on their way: is the API still served?
        probe = {"attack_open": len(accepted) - len(eof_s), **(await chat(http_port, 10))}
    return {"counts": dict(n), "held": len(accepted), "closed_by_server": len(eof_s),
            "median_eof_s": round(statistics.median(eof_s or [-1]), 3),
            "median_sent_kib": statistics.median(sent_kib or [-1]), "chat_during": probe}


async def run(pid: int, port: int, pport: int) -> Stats:
    await wait_ready(port, 2)
    results: Stats = {"idle": snapshot(pid)}
    top: Stats = {}  # peaks
    attacks = {"A": partial(attack_a, port, pid), "B": partial(attack_b, port, pport, 6 << 20),
               "B_small": partial(attack_b, port, pport, 192 << 10)}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample, pid, top)
        for name, attack in attacks.items():
            top.clear()
            results[name] = {**await attack(), "peak": dict(top)}
            await trio.sleep(1.0)  # then "after": once the attack's sockets are gone
            results[name]["after"] = snapshot(pid)
        results["final_chat"], results["end"] = await chat(port), snapshot(pid)
        nursery.cancel_scope.cancel()
    return results


def report(r: Stats) -> str:
    def rss(x: Stats) -> str:
        return f"{x['rss_mib']} MiB ({x['rss_mib'] - r['idle']['rss_mib']:+.1f}), {x['fds']} fds"

    a, f = r["A"], r["final_chat"]
    lines = [f"idle: {rss(r['idle'])}",
             f"A {CONSUMERS} keep-alive consumers ({a['seconds']} s): {a['counts']}; server closed "
             f"{a['closed_by_server']} idle after median {a['median_close_s']:.3f} s "
             f"(max {a['max_close_s']:.3f} s)",
             "  fresh requests meanwhile (status, s, idle held, server fds): "
             f"{[(p['status'], p['latency_s'], p['idle_held'], p['fds']) for p in a['probes']]}",
             f"  peak {rss(a['peak'])}; after {rss(a['after'])}"]
    for name, what in (("B", "6 MiB"), ("B_small", "192 KiB")):
        b, c = r[name], r[name]["chat_during"]
        lines += [f"{name} {PROVIDERS} sockets sending {what} of an 8 MiB frame: {b['counts']}; "
                  f"{b['held']} sent median {b['median_sent_kib']:.0f} KiB; server closed "
                  f"{b['closed_by_server']} after median {b['median_eof_s']:.3f} s",
                  f"  chat with {c.get('attack_open')} attack sockets open: {c.get('status')} in "
                  f"{c.get('latency_s')} s; peak {rss(b['peak'])}; after {rss(b['after'])}"]
    return "\n".join([*lines, f"end: server alive {r['alive']}, chat {f['status']} in {f['latency_s']} s; "
                      f"{rss(r['end'])}; exit {r['exit_code']}; log errors {r['log_errors']}"])


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    port, pport = free_port(), free_port()
    env = {**os.environ, "COORDINATOR_API_KEYS": KEY, "COORDINATOR_PROVIDER_TOKENS": TOKEN}
    with tempfile.TemporaryFile("w+") as log:
        kw: Stats = {"cwd": ROOT, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        procs = [subprocess.Popen([BIN / "coordinator", "serve", "--port", str(port), "--provider-port",
                                   str(pport), "--log-level", "WARNING"], **(kw | {"stderr": log})),
                 subprocess.Popen([BIN / "provider-sim", "fleet", "--ephemeral-keys",
                                   "--n", "2", "--token", TOKEN,
                                   "--coordinator", f"ws://{HOST}:{pport}/"], **kw)]
        try:
            results = trio.run(run, procs[0].pid, port, pport)
            results["alive"] = procs[0].poll() is None
        finally:
            for proc in reversed(procs):
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                proc.kill()  # a no-op once it has exited
                proc.wait()
        log.seek(0)
        errors = [x for x in log.read().splitlines() if "ERROR" in x or "Traceback" in x]
    results.update(log_errors=errors[:3], exit_code=procs[0].returncode)
    print(json.dumps(results, indent=2) if "--json" in sys.argv[1:] else report(results))


if __name__ == "__main__":
    main()

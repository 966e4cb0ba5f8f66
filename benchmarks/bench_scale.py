"""The coordinator at fleet scale: 10, 1,000 and 10,000 simulated providers, one run.

Per size N: ``coordinator serve`` and ``provider-sim fleet --n N`` as subprocesses on
loopback; once /healthz shows N providers: RSS and idle CPU, 300 serial streaming
requests (``X-Timing`` route / first content, client first byte), then concurrency-64
throughput and server CPU per request. ``python -m benchmarks.bench_scale``; writes
``bench-results/scale.json`` (subprocess stderr in ``bench-results/scale-logs/``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
from pathlib import Path
from typing import Any

import h11
import trio

from benchmarks.bench_stack import (
    KEY,
    PY,
    ROOT,
    TOKEN,
    coordinator_env,
    free_port,
    pin_load_elsewhere,
    processes,
    rss_kib,
    server,
)
from coordinator.loadgen.client import HttpConnection
from coordinator.loadgen.load import Mix, classify_reply, percentile, run_load

MODEL = "sim-chat-small"
TICK = os.sysconf("SC_CLK_TCK")
FIELDS = ("parse", "route", "queue", "encrypt", "dispatch", "first_content")
BODY = json.dumps({"model": MODEL, "max_tokens": 14, "stream": True,
                   "messages": [{"role": "user", "content": "Say something."}]}).encode()
REGISTER_LIMIT = float(os.environ.get("BENCH_REGISTER_LIMIT", "180"))
IDLE_SECONDS, SERIAL, WARM = 10.0, 300, 20
HEAD = ("reg s", "RSS MiB", "idle CPU%", "route us p50/p99", "1st content us p50/p99",
        "TTFB ms p50/p99", "req/s c64", "CPU ms/req", "errors")
say = functools.partial(print, flush=True)


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def logged(argv: list[str], log: Path) -> list[str]:
    """``argv`` with stderr written to ``log``; ``exec`` keeps the pid we measure."""
    return ["sh", "-c", 'exec "$@" 2>"$0"', str(log), *argv]


def capacity_problem(n: int) -> str | None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < n + 1024:
        return f"RLIMIT_NOFILE hard limit {hard} < {n} providers + 1024"
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return f"{high - low + 1} ephemeral ports for {n} sockets" if high - low < n + 1024 else None


async def post(stream: trio.SocketStream, conn: h11.Connection) -> tuple[int, dict[str, str], bytes, float]:
    """``BODY`` on a keep-alive h11 connection: status, headers, body, first body byte (s)."""
    start = trio.current_time()
    head = [("host", "127.0.0.1"), ("content-length", str(len(BODY))),
            ("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
    request = h11.Request(method="POST", target="/v1/chat/completions", headers=head)
    await stream.send_all(conn.send(request) + conn.send(h11.Data(data=BODY))
                          + conn.send(h11.EndOfMessage()))
    status, headers, chunks, first = 0, {}, [], None
    while not isinstance(event := conn.next_event(), h11.EndOfMessage | h11.ConnectionClosed):
        if event is h11.NEED_DATA:
            if not (data := await stream.receive_some(65536)):
                raise ConnectionError("server closed the connection")
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            first = trio.current_time() - start if first is None else first
            chunks.append(bytes(event.data))
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
    return status, headers, b"".join(chunks), first or 0.0


async def wait_providers(port: int, pids: list[int], n: int, limit: float, label: str) -> int:
    """Poll /healthz until it shows ``n`` providers or ``limit`` passes; return the last count."""
    conn, seen, start, last = HttpConnection("127.0.0.1", port), -1, trio.current_time(), 0.0
    with trio.move_on_after(limit):
        while seen < n:
            with contextlib.suppress(Exception):
                reply = await conn.request("GET", "/healthz", [])
                seen = json.loads(reply.body)["providers"] if reply.status == 200 else seen
            if (now := trio.current_time()) - last >= 5.0:
                last = now
                say(f"  [{label}] {now - start:5.0f} s: {max(seen, 0)}/{n} providers, coordinator RSS "
                    f"{rss_kib(pids[0]) / 1024:.0f} MiB, CPU s coordinator/fleet "
                    + "/".join(f"{cpu_s(pid):.1f}" for pid in pids))
            await trio.sleep(0.5 if seen < n else 0)
    await conn.aclose()
    return seen


async def serial(port: int) -> dict[str, Any]:
    """``WARM`` then ``SERIAL`` requests one at a time on one keep-alive connection."""
    errors, stream = dict[str, int](), None
    parts: dict[str, list[float]] = {k: [] for k in (*(f"{f}_us" for f in FIELDS), "first_byte_ms")}
    conn = h11.Connection(h11.CLIENT)
    for i in range(WARM + SERIAL):
        try:
            if stream is None or conn.our_state is not h11.IDLE:
                if stream is not None:
                    await stream.aclose()
                stream, conn = await trio.open_tcp_stream("127.0.0.1", port), h11.Connection(h11.CLIENT)
            status, headers, body, first = await post(stream, conn)
            kind = classify_reply(status, body, True)
        except (OSError, ConnectionError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            kind = type(exc).__name__
            conn.send_failed()  # not IDLE: the next request reconnects
        if kind is not None:
            errors[kind] = errors.get(kind, 0) + 1
        elif i >= WARM:
            parts["first_byte_ms"].append(first * 1000)
            for name, _, value in (p.partition("=") for p in headers.get("x-timing", "").split(",")):
                if f"{name}_us" in parts:
                    parts[f"{name}_us"].append(float(value))
    if stream is not None:
        await stream.aclose()
    return {"requests": SERIAL, "ok": len(parts["first_byte_ms"]), "errors": errors,
            **{k: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for k, v in parts.items()}}


async def measure(n: int, seconds: float, logs: Path) -> dict[str, Any]:
    port, pport = free_port(), free_port()
    env = coordinator_env(port, pport, COORDINATOR_MAX_PENDING_PROVIDERS="2048",
                          COORDINATOR_DEFAULT_PROVIDER_SLOTS="8")
    result: dict[str, Any] = {"providers": n, "phase_s": {}}
    marks = [trio.current_time()]

    def lap(name: str) -> None:
        marks.append(trio.current_time())
        result["phase_s"][name] = round(marks[-1] - marks[-2], 2)
        say(f"  [N={n}] {name}: {marks[-1] - marks[-2]:.1f} s")

    coordinator = logged(server([PY, "-m", "coordinator", "serve", "--log-level", "WARNING"]),
                         logs / f"coordinator-{n}.log")
    fleet = logged([PY, "-m", "provider_sim", "fleet", "--ephemeral-keys", "--n", str(n), "--coordinator",
                    f"ws://127.0.0.1:{pport}/", "--token", TOKEN], logs / f"fleet-{n}.log")
    with processes((coordinator, env)) as (coord,):
        if await wait_providers(port, [coord.pid], 0, 30.0, "start") < 0:
            raise RuntimeError("coordinator did not answer /healthz within 30 s")
        lap("coordinator_start")
        result["rss_empty_kib"] = rss_kib(coord.pid)
        with processes((fleet, {})) as (sim,):
            seen = await wait_providers(port, [coord.pid, sim.pid], n, REGISTER_LIMIT, f"N={n}")
            lap("register")
            result["register_cpu_s"] = {"coordinator": cpu_s(coord.pid), "fleet": cpu_s(sim.pid)}
            if seen < n:
                result["dropped"] = f"{max(seen, 0)}/{n} providers after {REGISTER_LIMIT:.0f} s"
            else:
                await trio.sleep(2.0)
                c0, f0, t0 = cpu_s(coord.pid), cpu_s(sim.pid), trio.current_time()
                await trio.sleep(IDLE_SECONDS)
                wall = trio.current_time() - t0
                result["idle"] = {"rss_kib": rss_kib(coord.pid), "fleet_rss_kib": rss_kib(sim.pid),
                                  "cpu_pct": (cpu_s(coord.pid) - c0) / wall * 100,
                                  "fleet_cpu_pct": (cpu_s(sim.pid) - f0) / wall * 100}
                lap("idle")
                with trio.fail_after(180):
                    result["serial"] = await serial(port)
                lap("serial")
                c0, f0 = cpu_s(coord.pid), cpu_s(sim.pid)
                hot = await run_load(f"http://127.0.0.1:{port}", key=KEY, model=MODEL,
                                     concurrency=64, duration=seconds, requests=None,
                                     mix=Mix(stream=1.0, tools=0.0, images=0.0), tokens=14,
                                     show_progress=False)
                cpu, done = cpu_s(coord.pid) - c0, max(1, hot["ok"])
                result["throughput"] = {
                    "requests_per_s": hot["requests_per_s"], "ok": hot["ok"], "errors": hot["errors"],
                    "elapsed_s": hot["elapsed_s"], "first_byte_ms": hot["first_byte_ms"],
                    "server_cpu_s": cpu, "server_cpu_pct": cpu / hot["elapsed_s"] * 100,
                    "server_cpu_ms_per_request": cpu * 1000 / done, "counters": hot["coordinator"],
                    "fleet_cpu_ms_per_request": (cpu_s(sim.pid) - f0) * 1000 / done}
                lap("throughput")
        lap("fleet_stop")
    lap("coordinator_stop")
    return result


def table(sizes: dict[str, dict[str, Any]]) -> str:
    rows = [f"{'N':>6}" + "".join(f"{h:>{len(h) + 2}}" for h in HEAD)]
    for n, r in sizes.items():
        if "throughput" not in r:
            rows.append(f"{n:>6}  dropped: {r.get('dropped', 'incomplete')}")
            continue
        s, t = r["serial"], r["throughput"]
        route, content, first = s["route_us"], s["first_content_us"], s["first_byte_ms"]
        cells = (f"{r['phase_s']['register']:.1f}", f"{r['idle']['rss_kib'] / 1024:.1f}",
                 f"{r['idle']['cpu_pct']:.1f}", f"{route['p50']:.0f}/{route['p99']:.0f}",
                 f"{content['p50']:.0f}/{content['p99']:.0f}", f"{first['p50']:.2f}/{first['p99']:.2f}",
                 f"{t['requests_per_s']:.0f}", f"{t['server_cpu_ms_per_request']:.2f}",
                 str(sum(s["errors"].values()) + sum(t["errors"].values())))
        rows.append(f"{n:>6}" + "".join(f"{c:>{len(h) + 2}}" for c, h in zip(cells, HEAD, strict=True)))
    return "\n".join(rows)


def ratios(sizes: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Route p50 and server CPU per request at each size over the same at N=10."""
    done = {n: (r["serial"]["route_us"]["p50"], r["throughput"]["server_cpu_ms_per_request"])
            for n, r in sizes.items() if "throughput" in r}
    base, out = done.pop("10", (0.0, 0.0)), {}
    for n, (route, cpu) in done.items() if all(base) else ():
        out[f"route_p50_{n}_over_10"], out[f"cpu_per_request_{n}_over_10"] = route / base[0], cpu / base[1]
    return out


async def main_async(ns: list[int], seconds: float, logs: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"load_before": os.getloadavg(), "cpus": os.cpu_count(),
                               "bench_seconds": seconds, "sizes": {}}
    for n in ns:
        say(f"N={n}: starting (load average {os.getloadavg()[0]:.2f})")
        try:
            problem = capacity_problem(n)
            results["sizes"][str(n)] = ({"providers": n, "dropped": problem} if problem
                                        else await measure(n, seconds, logs))
        except (RuntimeError, OSError, trio.TooSlowError) as exc:
            results["sizes"][str(n)] = {"providers": n, "dropped": f"failed: {exc!r}"}
    results["notes"] = [f"N={n} dropped: {r['dropped']}" for n, r in results["sizes"].items()
                        if "dropped" in r]
    results["ratios"], results["load_after"] = ratios(results["sizes"]), os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000,10000", help="fleet sizes (default: %(default)s)")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the subprocesses inherit it
    out = ROOT / "bench-results"
    (logs := out / "scale-logs").mkdir(parents=True, exist_ok=True)
    pin_load_elsewhere()  # BENCH_SERVER_CPUS, as in bench_stack
    results = trio.run(main_async, [int(s) for s in args.sizes.split(",") if s.strip()],
                       float(os.environ.get("BENCH_SECONDS", "10")), logs)
    (out / "scale.json").write_text(json.dumps(results, indent=2))
    say(table(results["sizes"]))
    say("\n".join([*(f"{k}: {v:.2f}" for k, v in results["ratios"].items()),
                   *(f"note: {note}" for note in results["notes"])]))
    say(f"load average before {results['load_before']}, after {results['load_after']}")


if __name__ == "__main__":
    main()

"""Stack floor vs direct-to-provider vs minimal relay vs coordinator, measured in one run.

Each server runs in its own process; the load generator (coordinator.loadgen.load,
an h11 client) runs here. All share this machine's cores, so read the ratios,
not the absolute numbers. ``BENCH_SERVER_CPUS=0`` pins each server (floor,
direct provider, minimal relay, coordinator) to CPU 0 and everything else (load
generator, simulated fleet, the relay's upstream) to the other CPUs, so the
server's work is not shared with its load. The minimal relay (``relay_app.py``)
and the coordinator alternate, one event per provider frame and then 16, so the
machine's drift hits each pair alike. Run: ``python -m benchmarks.bench_stack`` or
``nox -s bench``. ``BENCH_SMOKE=1`` (with ``BENCH_SECONDS=2``) runs every phase with
few requests: it checks the benchmark runs and measures nothing. Writes
``bench-results/stack.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from coordinator.loadgen.client import HttpConnection
from coordinator.loadgen.load import Mix, percentile, run_load

KEY = "bench-key"
TOKEN = "bench-token"
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


SMOKE = os.environ.get("BENCH_SMOKE") == "1"
SERIAL_REQUESTS = 40 if SMOKE else 400  # c=1, for time to first byte
FAILOVER_REQUESTS = 30 if SMOKE else 300
IDLE_STREAMS = 100 if SMOKE else 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


SERVER_CPUS = os.environ.get("BENCH_SERVER_CPUS", "")


def pin_load_elsewhere() -> None:
    """With BENCH_SERVER_CPUS, this process and what it starts run on the other CPUs."""
    if SERVER_CPUS:
        server = {int(c) for c in SERVER_CPUS.split(",")}
        others = os.sched_getaffinity(0) - server
        if others:
            os.sched_setaffinity(0, others)


def server(argv: list[str]) -> list[str]:
    """``argv`` pinned to BENCH_SERVER_CPUS (when set)."""
    return ["taskset", "-c", SERVER_CPUS, *argv] if SERVER_CPUS else argv


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextlib.contextmanager
def processes(*commands: tuple[list[str], dict[str, str]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    try:
        for argv, env in commands:
            procs.append(subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env},
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield procs
    finally:
        stop(procs)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate every process, then wait for each (killing one that will not go)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def coordinator_env(port: int, pport: int, **extra: str) -> dict[str, str]:
    return {"COORDINATOR_API_KEYS": KEY, "COORDINATOR_PROVIDER_TOKENS": TOKEN,
            "COORDINATOR_HTTP_PORT": str(port), "COORDINATOR_PROVIDER_PORT": str(pport),
            "COORDINATOR_DEFAULT_PROVIDER_SLOTS": "64", **extra}


def fleet_file(tmp: Path, name: str, providers: list[dict[str, Any]]) -> Path:
    lines = [f'token = "{TOKEN}"']
    for p in providers:
        lines.append("[[provider]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in p.items()]
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def wait_ready(port: int, providers: int) -> None:
    conn = HttpConnection("127.0.0.1", port)
    for _ in range(400):
        with contextlib.suppress(Exception):
            reply = await conn.request("GET", "/healthz", [])
            if reply.status == 200 and json.loads(reply.body)["providers"] >= providers:
                await conn.aclose()
                return
        await trio.sleep(0.05)
    raise RuntimeError("coordinator fleet never became ready")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (/proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput_and_latency(url: str, *, duration: float, warm: bool = True,
                                 extra: dict[str, Any] | None = None,
                                 pid: int | None = None) -> dict[str, Any]:
    """c=64 throughput (and the server's CPU per request, given its ``pid``), c=1 TTFB."""
    mix = Mix(stream=1.0, tools=0.0, images=0.0)
    if warm:
        await run_load(url, key=KEY, model="sim-chat-small", concurrency=8, duration=1.0,
                       requests=None, mix=mix, tokens=14, show_progress=False)
    cpu_before = cpu_seconds(pid) if pid else 0.0
    hot = await run_load(url, key=KEY, model="sim-chat-small", concurrency=64, duration=duration,
                         requests=None, mix=mix, tokens=14, show_progress=False)
    cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / max(1, hot["ok"]) if pid else None
    serial = await run_load(url, key=KEY, model="sim-chat-small", concurrency=1, duration=60.0,
                            requests=SERIAL_REQUESTS, mix=mix, tokens=14, show_progress=False,
                            extra=extra)
    fb = serial["_samples"]["first_byte"]
    return {"rps_c64": hot["requests_per_s"], "errors_c64": hot["errors"],
            "cpu_ms_per_request": cpu_ms,
            "ttfb_c1_p50_ms": percentile(fb, 50) * 1000, "ttfb_c1_p99_ms": percentile(fb, 99) * 1000,
            "errors_c1": serial["errors"]}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def idle_streams(port: int, pid: int, count: int) -> dict[str, Any]:
    """Hold ``count`` committed streams open (first content received, then idle)."""
    body = json.dumps({"model": "sim-chat-small", "stream": True, "max_tokens": 3,
                       "messages": [{"role": "user", "content": "hold"}]}).encode()
    before = rss_kib(pid)
    opened = trio.Semaphore(0)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)
    failures = 0

    async def hold(done: trio.Event) -> None:
        nonlocal failures
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            failures += 1
            opened.release()
            return
        async with stream:
            await stream.send_all(head)
            got = b""
            with trio.move_on_after(60):
                while b"content" not in got:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        data = b""
                    if not data:
                        failures += 1
                        break
                    got += data
            opened.release()
            await done.wait()

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(hold, done)
        for _ in range(count):
            await opened.acquire()
        await trio.sleep(1.0)
        during = rss_kib(pid)
        done.set()
    return {"streams": count, "failed": failures, "rss_before_kib": before,
            "rss_during_kib": during,
            "kib_per_stream": (during - before) / max(1, count - failures)}


async def main_async(tmp: Path, duration: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    floor_port, direct_port = free_port(), free_port()
    with processes((server([PY, "-m", "benchmarks.floor_app", "--port", str(floor_port)]),
                    {})) as procs:
        wait_for_port(floor_port)
        results["floor"] = await throughput_and_latency(f"http://127.0.0.1:{floor_port}",
                                                        duration=duration, pid=procs[0].pid)
    with processes((server([PY, "-m", "provider_sim", "http", "--port", str(direct_port),
                            "--tokens", "14"]), {})) as procs:
        wait_for_port(direct_port)
        results["direct"] = await throughput_and_latency(f"http://127.0.0.1:{direct_port}",
                                                         duration=duration, pid=procs[0].pid)
    # One event per provider frame (a provider forwarding each event as it comes), then
    # every event a provider has at once in one frame (SSE-framed chunks, docs/protocol.md);
    # each time the minimal relay first, then the coordinator.
    for suffix, per_frame in (("", 1), ("_batched", 16)):
        results["relay" + suffix] = await minimal_relay(per_frame, duration)
        name = "coordinator" + suffix
        port, pport = free_port(), free_port()
        fleet = fleet_file(tmp, name, [{"id": "sim", "count": 4, "max_concurrency": 64,
                                        "events_per_frame": per_frame}])
        with processes((server([PY, "-m", "coordinator", "serve", "--log-level", "WARNING"]),
                        coordinator_env(port, pport)),
                       ([PY, "-m", "provider_sim", "fleet", "--ephemeral-keys",
                         "--file", str(fleet), "--coordinator",
                         f"ws://127.0.0.1:{pport}/"], {})) as procs:
            wait_for_port(port)
            await wait_ready(port, 4)
            results[name] = await throughput_and_latency(f"http://127.0.0.1:{port}",
                                                         duration=duration, pid=procs[0].pid)
    # Failover: "bad" (fast, preferred) sends a role delta then fails; "good" serves.
    # "good" is paced: routing learns observed speeds, and an unpaced "good" would soon
    # look faster than "bad" declares — then nothing would fail over.
    port, pport = free_port(), free_port()
    fleet = fleet_file(tmp, "failover", [
        {"id": "bad", "decode_tps": 10000.0, "prefill_tps": 1e6,
         "behaviour": "role_then_error:status=500"},
        {"id": "good", "decode_tps": 1000.0, "prefill_tps": 1e6, "pace": True}])
    with processes((server([PY, "-m", "coordinator", "serve", "--log-level", "ERROR"]),
                    coordinator_env(port, pport, COORDINATOR_BREAKER_STRIKES="1000000000")),
                   ([PY, "-m", "provider_sim", "fleet", "--ephemeral-keys",
                     "--file", str(fleet), "--coordinator",
                     f"ws://127.0.0.1:{pport}/"], {})):
        wait_for_port(port)
        await wait_ready(port, 2)
        url = f"http://127.0.0.1:{port}"
        mix = Mix(stream=1.0, tools=0.0, images=0.0)
        own = await run_load(url, key=KEY, model="sim-chat-small", concurrency=1, duration=60,
                             requests=FAILOVER_REQUESTS, mix=mix, tokens=14,
                             show_progress=False, extra={"provider_ids": ["good"]})
        failover = await run_load(url, key=KEY, model="sim-chat-small", concurrency=1,
                                  duration=60, requests=FAILOVER_REQUESTS, mix=mix, tokens=14,
                                  show_progress=False)
        results["failover"] = {
            "backup_own_ttfb_p50_ms": own["first_byte_ms"]["p50"],
            "failover_ttfb_p50_ms": failover["first_byte_ms"]["p50"],
            "backup_own_ttfb_p99_ms": own["first_byte_ms"]["p99"],
            "failover_ttfb_p99_ms": failover["first_byte_ms"]["p99"],
            "failover_errors": failover["errors"],
            "retries_seen": failover["coordinator"].get(
                'coordinator_dispatch_total{result="retry_precontent"}', 0.0),
        }
    # Memory per idle in-flight stream.
    port, pport = free_port(), free_port()
    fleet = fleet_file(tmp, "idle", [{"id": "idle", "count": 4, "max_concurrency": 600,
                                      "behaviour": "healthy:token_interval=3600,tokens=3"}])
    with processes(([PY, "-m", "coordinator", "serve", "--log-level", "ERROR"],
                    coordinator_env(port, pport, COORDINATOR_QUEUE_MAX="4000",
                                    COORDINATOR_MAX_CONNECTIONS="4000")),
                   ([PY, "-m", "provider_sim", "fleet", "--ephemeral-keys",
                     "--file", str(fleet), "--coordinator",
                     f"ws://127.0.0.1:{pport}/"], {})) as procs:
        wait_for_port(port)
        await wait_ready(port, 4)
        results["idle_streams"] = await idle_streams(port, procs[0].pid, IDLE_STREAMS)
    return results


async def minimal_relay(per_frame: int, duration: float) -> dict[str, Any]:
    """The minimal relay (pinned as a server) and its upstream (with the load), measured."""
    port, upstream_port = free_port(), free_port()
    with processes(([PY, "-m", "benchmarks.relay_app", "upstream", "--port", str(upstream_port),
                     "--events-per-frame", str(per_frame)], {})):
        wait_for_port(upstream_port)
        with processes((server([PY, "-m", "benchmarks.relay_app", "relay", "--port", str(port),
                                "--upstream", f"ws://127.0.0.1:{upstream_port}/"]),
                        {})) as procs:
            wait_for_port(port)
            return await throughput_and_latency(f"http://127.0.0.1:{port}", duration=duration,
                                                pid=procs[0].pid)


def report(results: dict[str, Any]) -> str:
    floor, direct, coord = results["floor"], results["direct"], results["coordinator"]
    batched = results["coordinator_batched"]
    relay, relay_batched = results["relay"], results["relay_batched"]
    fo, idle = results["failover"], results["idle_streams"]
    rows = [
        f"server CPU per request (ms, c=64): floor {floor['cpu_ms_per_request']:.2f}, direct "
        f"{direct['cpu_ms_per_request']:.2f}, coordinator {coord['cpu_ms_per_request']:.2f} "
        f"({coord['cpu_ms_per_request'] / floor['cpu_ms_per_request']:.2f}x floor; target <= 1.5x), "
        f"batched frames {batched['cpu_ms_per_request']:.2f} "
        f"({batched['cpu_ms_per_request'] / floor['cpu_ms_per_request']:.2f}x)",
        f"minimal relay in the same stack, CPU per request (ms, c=64): one event per frame "
        f"{relay['cpu_ms_per_request']:.2f} -> coordinator "
        f"{coord['cpu_ms_per_request'] / relay['cpu_ms_per_request']:.2f}x; 16 per frame "
        f"{relay_batched['cpu_ms_per_request']:.2f} -> coordinator "
        f"{batched['cpu_ms_per_request'] / relay_batched['cpu_ms_per_request']:.2f}x",
        f"minimal relay throughput at c=64 (req/s): one event per frame {relay['rps_c64']:.0f} "
        f"-> coordinator {coord['rps_c64'] / relay['rps_c64'] * 100:.0f}% of it; 16 per frame "
        f"{relay_batched['rps_c64']:.0f} -> coordinator "
        f"{batched['rps_c64'] / relay_batched['rps_c64'] * 100:.0f}%; TTFB c=1 p50 "
        f"{relay['ttfb_c1_p50_ms']:.2f} ms -> coordinator "
        f"+{coord['ttfb_c1_p50_ms'] - relay['ttfb_c1_p50_ms']:.2f} ms",
        f"throughput with batched provider frames: {batched['rps_c64']:.0f} req/s -> "
        f"{batched['rps_c64'] / floor['rps_c64'] * 100:.0f}% of floor",
        f"throughput at c=64 (req/s): floor {floor['rps_c64']:.0f}, direct {direct['rps_c64']:.0f}, "
        f"coordinator {coord['rps_c64']:.0f}  -> coordinator/floor "
        f"{coord['rps_c64'] / floor['rps_c64'] * 100:.0f}% (target >= 60%)",
        f"TTFB at c=1 p50 (ms): floor {floor['ttfb_c1_p50_ms']:.2f}, direct "
        f"{direct['ttfb_c1_p50_ms']:.2f}, coordinator {coord['ttfb_c1_p50_ms']:.2f} -> added over "
        f"direct {coord['ttfb_c1_p50_ms'] - direct['ttfb_c1_p50_ms']:.2f} ms (target <= 2)",
        f"TTFB at c=1 p99 (ms): direct {direct['ttfb_c1_p99_ms']:.2f}, coordinator "
        f"{coord['ttfb_c1_p99_ms']:.2f} -> added {coord['ttfb_c1_p99_ms'] - direct['ttfb_c1_p99_ms']:.2f}"
        " ms (target <= 10)",
        f"failover TTFB p50 (ms): backup alone {fo['backup_own_ttfb_p50_ms']:.2f}, with a failed "
        f"primary first {fo['failover_ttfb_p50_ms']:.2f} -> cost "
        f"{fo['failover_ttfb_p50_ms'] - fo['backup_own_ttfb_p50_ms']:.2f} ms (target <= 5); "
        f"retries seen {fo['retries_seen']:.0f}",
        f"idle streams: {idle['streams'] - idle['failed']} held, RSS {idle['rss_before_kib']} -> "
        f"{idle['rss_during_kib']} KiB -> {idle['kib_per_stream']:.1f} KiB per stream (target <= 64)",
    ]
    return "\n".join(rows)


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    duration = float(os.environ.get("BENCH_SECONDS", "10"))
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    pin_load_elsewhere()
    results = trio.run(main_async, out, duration)
    (out / "stack.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()

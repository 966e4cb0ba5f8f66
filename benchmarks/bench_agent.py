"""A real engine direct vs through coordinator + provider-agent, measured in one run.

llama.cpp's server on a tiny model made at run time (``provider-agent tiny-engine``),
``coordinator serve`` and ``provider-agent`` each run in their own process; the
consumers (httpx, streaming chat, greedy, 64 tokens) run here. Rounds alternate —
direct, through, direct, through … — at concurrency 1 and 8, so drift hits both sides
alike. Reported: time to first token p50/p99 each way and what the coordinator adds,
the throughput ratio (requests/s through ÷ direct), and the agent's own CPU time per
streamed token (from /proc). ``BENCH_SERVER_CPUS=0`` pins the engine, coordinator and
agent to CPU 0 and the consumers elsewhere.

Run: ``python -m benchmarks.bench_agent`` (needs the ``[engine]`` extra) or ``nox -s
bench``. Writes ``bench-results/agent.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from benchmarks.bench_stack import PY, ROOT, free_port, pin_load_elsewhere, server
from coordinator.loadgen.load import percentile

KEY, TOKEN = "bench-key", "bench-token"
MODEL = "tiny-chatml"
BODY = {"model": MODEL, "stream": True, "max_tokens": 64, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a story about the sea."}]}
ROUNDS = int(os.environ.get("BENCH_AGENT_ROUNDS", "4"))
REQUESTS = {1: 40, 8: 160}  # per round and side
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_http(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


async def one(client: httpx.AsyncClient, url: str, headers: dict[str, str],
              out: list[tuple[float, float, int]]) -> None:
    """One streamed chat: (time to first token, whole time, content chunks)."""
    start = trio.current_time()
    first, tokens = 0.0, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=BODY,
                             headers=headers) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line:
                tokens += 1
                first = first or trio.current_time() - start
    out.append((first, trio.current_time() - start, tokens))


async def side(url: str, headers: dict[str, str], concurrency: int,
               requests: int) -> tuple[list[tuple[float, float, int]], float]:
    results: list[tuple[float, float, int]] = []
    left = requests

    async def consumer(client: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one(client, url, headers, results)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(consumer, client)
        return results, trio.current_time() - start


async def measure(engine: str, coordinator: str, agent_pid: int) -> dict[str, Any]:
    auth = {"authorization": f"Bearer {KEY}"}
    report: dict[str, Any] = {}
    for concurrency, requests in REQUESTS.items():
        await side(engine, {}, concurrency, 8)  # warm both paths
        await side(coordinator, auth, concurrency, 8)
        ways: dict[str, dict[str, list[float]]] = {
            w: {"ttft": [], "rate": [], "tokens": []} for w in ("direct", "through")}
        agent_cpu = 0.0
        for _ in range(ROUNDS):
            for way, url, headers in (("direct", engine, {}), ("through", coordinator, auth)):
                before = cpu_seconds(agent_pid)
                results, elapsed = await side(url, headers, concurrency, requests)
                if way == "through":
                    agent_cpu += cpu_seconds(agent_pid) - before
                ways[way]["ttft"] += [r[0] for r in results]
                ways[way]["rate"].append(len(results) / elapsed)
                ways[way]["tokens"].append(sum(r[2] for r in results))
        direct, through = ways["direct"], ways["through"]
        row = {
            "ttft_p50_ms": {w: round(percentile(ways[w]["ttft"], 50) * 1000, 2) for w in ways},
            "ttft_p99_ms": {w: round(percentile(ways[w]["ttft"], 99) * 1000, 2) for w in ways},
            "requests_per_s": {w: round(sum(ways[w]["rate"]) / ROUNDS, 1) for w in ways},
            "throughput_ratio": round(sum(through["rate"]) / sum(direct["rate"]), 3),
            "agent_cpu_us_per_token": round(agent_cpu / max(sum(through["tokens"]), 1) * 1e6, 1),
        }
        row["added_ttft_ms"] = {
            q: round(row[f"ttft_{q}_ms"]["through"] - row[f"ttft_{q}_ms"]["direct"], 2)
            for q in ("p50", "p99")}
        report[f"c={concurrency}"] = row
        print(f"c={concurrency}: {json.dumps(row)}", flush=True)
    return report


def main() -> None:
    pin_load_elsewhere()
    engine_port, http_port, provider_port = free_port(), free_port(), free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    coordinator_url = f"http://127.0.0.1:{http_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "agent.json"
        subprocess.run([PY, "-m", "provider_agent", "init", "--keys", str(keys)], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            procs.append(subprocess.Popen(
                server([PY, "-m", "provider_agent", "tiny-engine", "--port", str(engine_port),
                        "--model-name", MODEL, "--slots", "8"]), cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen(
                server([PY, "-m", "coordinator", "serve", "--port", str(http_port),
                        "--provider-port", str(provider_port), "--log-level", "WARNING"]),
                cwd=ROOT, env={**env, "COORDINATOR_API_KEYS": KEY,
                               "COORDINATOR_PROVIDER_TOKENS": TOKEN},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_http(engine_url + "/health")
            wait_http(coordinator_url + "/healthz")
            agent = subprocess.Popen(
                server([PY, "-m", "provider_agent", "--engine", engine_url, "--coordinator",
                        f"ws://127.0.0.1:{provider_port}/", "--keys", str(keys), "--log-level",
                        "WARNING"]), cwd=ROOT, env={**env, "PROVIDER_AGENT_TOKEN": TOKEN},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(agent)
            deadline = time.monotonic() + 60
            while httpx.get(coordinator_url + "/healthz").json()["providers"] < 1:
                if time.monotonic() > deadline:
                    raise SystemExit("the agent did not register")
                time.sleep(0.1)
            report = trio.run(measure, engine_url, coordinator_url, agent.pid)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "agent.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'agent.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()

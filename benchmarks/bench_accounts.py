"""Limits and the ledger on vs off: CPU per request and added time to first byte.

One coordinator build, two settings, alternating rounds (off, on; again) so the
machine's drift hits both alike:

* **off** — ``COORDINATOR_ACCOUNTS=false``: a static key, nothing counted;
* **on** — a named key with every limit set (requests and tokens per minute,
  concurrency, a budget; all far above the load, so nothing is refused) and the
  ledger written to the embedded store, a SQLite file (``keys_db``).

Load as in bench_stack: sim-chat-small, 14 tokens, 4 simulated providers; c=64 for
throughput and the server's CPU per request, c=1 for TTFB. ``BENCH_SERVER_CPUS=0``
pins the coordinator to CPU 0 and the rest elsewhere. Run:
``python -m benchmarks.bench_accounts [--rounds 3]``; BENCH_SECONDS (default 10).
Writes ``bench-results/accounts.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import trio

from benchmarks.bench_stack import (
    KEY,
    PY,
    ROOT,
    SERIAL_REQUESTS,
    coordinator_env,
    cpu_seconds,
    fleet_file,
    free_port,
    pin_load_elsewhere,
    processes,
    server,
    wait_for_port,
    wait_ready,
)
from coordinator.loadgen.load import Mix, percentile, run_load

MIX = Mix(stream=1.0, tools=0.0, images=0.0)
LIMITS = ("--rpm", "1000000000", "--tpm", "1000000000", "--concurrent", "100000",
          "--budget", "1000000000000000")


def named_key(keys_db: Path) -> str:
    made = subprocess.run([PY, "-m", "coordinator", "keys", "--keys-db", str(keys_db), "add",
                           "bench", *LIMITS, "--json"], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return str(json.loads(made.stdout)["secret"])


async def one_run(tmp: Path, on: bool, duration: float) -> dict[str, Any]:
    port, pport = free_port(), free_port()
    fleet = fleet_file(tmp, "fleet", [{"id": "sim", "count": 4, "max_concurrency": 64}])
    if on:
        keys_db = tmp / f"keys-{port}.db"
        key, env = named_key(keys_db), {"COORDINATOR_KEYS_DB": str(keys_db)}
    else:
        key, env = KEY, {"COORDINATOR_ACCOUNTS": "false"}
    with processes((server([PY, "-m", "coordinator", "serve", "--log-level", "WARNING"]),
                    coordinator_env(port, pport, **env)),
                   ([PY, "-m", "provider_sim", "fleet", "--ephemeral-keys", "--file",
                     str(fleet), "--coordinator", f"ws://127.0.0.1:{pport}/"], {})) as procs:
        wait_for_port(port)
        await wait_ready(port, 4)
        url = f"http://127.0.0.1:{port}"
        await run_load(url, key=key, model="sim-chat-small", concurrency=8, duration=1.0,
                       requests=None, mix=MIX, tokens=14, show_progress=False)
        before = cpu_seconds(procs[0].pid)
        hot = await run_load(url, key=key, model="sim-chat-small", concurrency=64,
                             duration=duration, requests=None, mix=MIX, tokens=14,
                             show_progress=False)
        cpu_ms = (cpu_seconds(procs[0].pid) - before) * 1000 / max(1, hot["ok"])
        serial = await run_load(url, key=key, model="sim-chat-small", concurrency=1,
                                duration=60.0, requests=SERIAL_REQUESTS, mix=MIX, tokens=14,
                                show_progress=False)
    first_byte = serial["_samples"]["first_byte"]
    return {"rps_c64": hot["requests_per_s"], "errors": sum(hot["errors"].values()) + sum(
                serial["errors"].values()),
            "cpu_ms_per_request": cpu_ms,
            "ttfb_c1_p50_ms": percentile(first_byte, 50) * 1000,
            "ttfb_c1_p99_ms": percentile(first_byte, 99) * 1000}


def report(rounds: list[dict[str, dict[str, Any]]]) -> str:
    lines = ["round  setting  rps(c=64)  cpu ms/req  ttfb p50  ttfb p99  errors"]
    for i, pair in enumerate(rounds, 1):
        for name in ("off", "on"):
            r = pair[name]
            lines.append(f"{i:5}  {name:7}  {r['rps_c64']:9.0f}  {r['cpu_ms_per_request']:10.3f}"
                         f"  {r['ttfb_c1_p50_ms']:7.2f}  {r['ttfb_c1_p99_ms']:8.2f}  {r['errors']:6}")
        on, off = pair["on"], pair["off"]
        lines.append(f"       on/off   cpu x{on['cpu_ms_per_request'] / off['cpu_ms_per_request']:.3f}"
                     f", ttfb p50 {on['ttfb_c1_p50_ms'] - off['ttfb_c1_p50_ms']:+.2f} ms"
                     f", p99 {on['ttfb_c1_p99_ms'] - off['ttfb_c1_p99_ms']:+.2f} ms")
    cpu = statistics.median(p["on"]["cpu_ms_per_request"] / p["off"]["cpu_ms_per_request"]
                            for p in rounds)
    ttfb = statistics.median(p["on"]["ttfb_c1_p50_ms"] - p["off"]["ttfb_c1_p50_ms"]
                             for p in rounds)
    lines.append(f"median of rounds: CPU per request on/off x{cpu:.3f} ({(cpu - 1) * 100:+.1f} %),"
                 f" TTFB p50 {ttfb:+.2f} ms")
    return "\n".join(lines)


async def main_async(rounds: int, duration: float) -> list[dict[str, dict[str, Any]]]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            pair = {"off": await one_run(Path(tmp), False, duration),
                    "on": await one_run(Path(tmp), True, duration)}
            out.append(pair)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pin_load_elsewhere()
    duration = float(os.environ.get("BENCH_SECONDS", "10"))
    rounds = trio.run(main_async, args.rounds, duration)
    text = report(rounds)
    print(text)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "accounts.json").write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()

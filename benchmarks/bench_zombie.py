"""A zombie in the fleet: fixed hedge vs adaptive hedging vs a healthy-only fleet, in one run.

Fleet: 4 healthy providers (50 ms to first token, 10 ms per token), 1 slow one (1 s to first
token) and 1 zombie (sends the role delta, then nothing, ever; it declares 10,000 tok/s so a
naive router prefers it), all serving sim-chat-small. Three ways, each its own coordinator and
fleet: ``fixed`` (COORDINATOR_ADAPTIVE_HEDGING=false: backup at backup_fraction of the TTFT
budget), ``adaptive`` (defaults) and ``healthy-only`` (the 4 healthy providers, the reference).
All are started and warmed (no inference, which would teach the router) before any is
measured, then each gets the same load in turn: streamed chat, concurrency 12, max_tokens 16,
BENCH_SECONDS (default 20) each. The learning period comes from the coordinator's per-request
log: requests in start order, and the last one whose first primary was the zombie (or the slow
provider). ``python -m benchmarks.bench_zombie``; writes ``bench-results/zombie.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from benchmarks.bench_stack import (
    KEY,
    PY,
    ROOT,
    coordinator_env,
    fleet_file,
    free_port,
    processes,
    wait_for_port,
    wait_ready,
)
from coordinator.loadgen.client import HttpConnection
from coordinator.loadgen.load import Mix, percentile, run_load

ADMIN, MODEL, CONCURRENCY, TOKENS, WINDOW = "bench-admin", "sim-chat-small", 12, 16, 50
HEALTHY = [{"id": "healthy", "count": 4,
            "behaviour": "healthy:first_token_delay=0.05,token_interval=0.01,tokens=16"}]
MIXED = [
    *HEALTHY,
    {"id": "slow", "behaviour": "healthy:first_token_delay=1.0,token_interval=0.01,tokens=16"},
    {"id": "zombie", "decode_tps": 10000.0, "behaviour": "stall_after_role"}]
WAYS = {"fixed": (MIXED, {"COORDINATOR_ADAPTIVE_HEDGING": "false"}),
        "adaptive": (MIXED, {}), "healthy-only": (HEALTHY, {})}
OUTCOME = re.compile(r"^(\S+ \S+) INFO coordinator\.requests (\{.*\})$")


async def get(port: int, path: str, key: str) -> bytes:
    conn = HttpConnection("127.0.0.1", port)
    try:
        return (await conn.request("GET", path, [("authorization", f"Bearer {key}")])).body
    finally:
        await conn.aclose()


def learning(log: Path) -> dict[str, Any]:
    """Requests in start order; for zombie and slow, the last one they were first primary for."""
    rows = []
    for line in log.read_text().splitlines():
        if m := OUTCOME.match(line):
            rec = json.loads(m[2])
            end = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rows.append((end - rec["latency_ms"] / 1000, (rec.get("providers_tried") or [""])[0]))
    firsts = [first for _, first in sorted(rows)]
    out: dict[str, Any] = {"requests_logged": len(firsts)}
    for pid in ("zombie", "slow"):
        hits = [i + 1 for i, first in enumerate(firsts) if first == pid]
        per_window = [0] * math.ceil(len(firsts) / WINDOW)
        for i in hits:
            per_window[(i - 1) // WINDOW] += 1
        out[pid] = {"primary": len(hits), "last_primary_request": hits[-1] if hits else 0,
                    "last_primary_window": math.ceil(hits[-1] / WINDOW) if hits else 0,
                    "primary_per_window": per_window}
    return out


async def measure(port: int, log: Path, seconds: float) -> dict[str, Any]:
    late: dict[str, Any] = {}

    async def look_late() -> None:  # the fleet as the router sees it, 90 % into the run
        await trio.sleep(seconds * 0.9)
        late.update(json.loads(await get(port, "/v1/admin/providers", ADMIN)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look_late)
        load = await run_load(f"http://127.0.0.1:{port}", key=KEY, model=MODEL,
                              concurrency=CONCURRENCY, duration=seconds, requests=None,
                              mix=Mix(stream=1.0, tools=0.0, images=0.0), tokens=TOKENS,
                              show_progress=False)
    await trio.sleep(0.5)  # let the last streams' outcome lines reach the log
    counters = load["coordinator"]
    dispatches = sum(v for k, v in counters.items() if k.startswith("coordinator_dispatch_total"))
    backups = counters.get("coordinator_speculative_dispatch_total", 0.0)
    n, fb = load["requests"], load["_samples"]["first_byte"]
    metrics = (await get(port, "/metrics", KEY)).decode()
    return {
        "requests": n, "ok": load["ok"], "success_rate": load["success_rate"],
        "errors": load["errors"], "requests_per_s": load["requests_per_s"],
        "ttfc_p50_ms": percentile(fb, 50) * 1000, "ttfc_p99_ms": percentile(fb, 99) * 1000,
        # The same, counting every request that got no content (error, cut off) as infinite.
        "ttfc_p99_all_ms": percentile(fb + [math.inf] * (n - load["ok"]), 99) * 1000,
        "ttfc_max_ms": max(fb, default=math.nan) * 1000,
        "backups": backups, "backup_fraction": backups / n if n else math.nan,
        "sends_per_request": (dispatches + backups) / n if n else math.nan,
        "counters": counters,
        "totals": {k: float(v) for k, v in re.findall(
            r"^(coordinator_(?:outpaced|hedge_budget_exhausted|cooldown_entered)_total) (\S+)$",
            metrics, re.M)},
        "learning": learning(log),
        "providers_late": late["providers"],
    }


async def main_async(tmp: Path, seconds: float) -> dict[str, Any]:
    stacks, commands = {}, []
    for name, (fleet, extra) in WAYS.items():
        port, pport, log = free_port(), free_port(), tmp / f"zombie-{name}.log"
        env = coordinator_env(port, pport, COORDINATOR_ADMIN_KEYS=ADMIN, **extra)
        commands += [(["sh", "-c", 'exec "$0" -m coordinator serve --log-level INFO 2>"$1"',
                       PY, str(log)], env),
                     ([PY, "-m", "provider_sim", "fleet", "--ephemeral-keys", "--file",
                       str(fleet_file(tmp, f"zombie-{name}", fleet)),
                       "--coordinator", f"ws://127.0.0.1:{pport}/"], {})]
        stacks[name] = (port, log, sum(p.get("count", 1) for p in fleet))
    with processes(*commands):
        for port, _, size in stacks.values():  # all up and warm before any is measured
            wait_for_port(port)
            await wait_ready(port, size)
            for _ in range(20):
                await get(port, "/v1/models", KEY)
        await trio.sleep(1.0)
        return {name: await measure(port, log, seconds) for name, (port, log, _) in stacks.items()}


def report(results: dict[str, Any]) -> str:
    rows = [f"{'way':<13}{'req':>6}{'req/s':>7}{'ok %':>8}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'p99* ms':>9}{'max ms':>9}{'backup %':>10}{'sends/req':>11}  errors   (* failed = inf)"]
    for name, r in results.items():
        rows.append(f"{name:<13}{r['requests']:>6}{r['requests_per_s']:>7.1f}"
                    f"{r['success_rate'] * 100:>8.2f}{r['ttfc_p50_ms']:>9.1f}"
                    f"{r['ttfc_p99_ms']:>9.1f}{r['ttfc_p99_all_ms']:>9.1f}{r['ttfc_max_ms']:>9.1f}"
                    f"{r['backup_fraction'] * 100:>10.2f}{r['sends_per_request']:>11.3f}  "
                    + (", ".join(f"{k} x{v}" for k, v in sorted(r["errors"].items())) or "-"))
    for name in ("fixed", "adaptive"):
        r = results[name]
        for pid in ("zombie", "slow"):
            seen = r["learning"][pid]
            windows = seen["primary_per_window"][:seen["last_primary_window"] + 1]
            rows.append(f"{name}: {pid} was first primary of {seen['primary']} requests, the "
                        f"last #{seen['last_primary_request']} of {r['learning']['requests_logged']}"
                        f" (window {seen['last_primary_window']}; per {WINDOW}: {windows})")
        zombie = next(p for p in r["providers_late"] if p["id"] == "zombie")
        speed = next(m["speed"] for m in zombie["models"] if m["id"] == MODEL)
        rows.append(f"{name}: zombie 90% into the run: slots {zombie['slots']['in_use']}/"
                    f"{zombie['slots']['max']} in use, {speed['source']} speed, outpaced penalty "
                    f"{speed['outpaced_penalty_s']} s, cooldowns {len(zombie['cooldowns'])}; "
                    + ", ".join(f"{k.removeprefix('coordinator_').removesuffix('_total')} {v:g}"
                                for k, v in r["totals"].items()))
    ratio = results["adaptive"]["ttfc_p99_ms"] / results["healthy-only"]["ttfc_p99_ms"]
    share = results["adaptive"]["backup_fraction"]
    rows += [f"p99 adaptive / healthy-only = {ratio:.2f} (goal <= 1.2: "
             f"{'met' if ratio <= 1.2 else 'MISSED'})",
             f"backup fraction adaptive = {share * 100:.2f}% (goal <= 5%: "
             f"{'met' if share <= 0.05 else 'MISSED'})"]
    return "\n".join(rows)


def main() -> None:
    seconds = float(os.environ.get("BENCH_SECONDS", "20"))
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    results = trio.run(main_async, out, seconds)
    (out / "zombie.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()

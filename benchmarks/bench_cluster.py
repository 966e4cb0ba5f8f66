"""Scale-out: one coordinator instance vs two sharing a redis-server, measured in one run.

(a) Streamed-chat throughput at total concurrency 64: one instance (no Redis) serving
    the whole simulated fleet, vs two instances sharing a fresh redis-server, half the
    fleet connected to each and the consumers split between them (c=32 on each, run
    together, summed). Both set-ups run side by side and are measured in alternating
    windows, so drift on a busy machine hits both. Also: how many of the two-instance
    requests crossed to the other instance (from each instance's per-provider
    ``served`` counts on /v1/admin/providers).
(b) Added time to first content of a cross-instance dispatch: instances A and B,
    provider "local" on A and an identical "remote" on B; serial requests to A pinned
    with ``provider_ids``, strictly interleaved (order random per pair). Speculative
    backups are off there (a pinned request has no second provider anyway).

Everything shares this machine's cores (the load generator runs here): read the
ratios, not the absolute numbers. Run: ``python -m benchmarks.bench_cluster``.
BENCH_SECONDS (default 10) per set-up in (a), BENCH_SERIAL (default 300) pairs in (b).
Writes ``bench-results/cluster.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
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
)
from coordinator.loadgen.client import ConnectionLost, HttpConnection
from coordinator.loadgen.load import Mix, classify_reply, make_body, percentile, run_load

REDIS = shutil.which("redis-server")
ADMIN, CLUSTER = "bench-admin", "bench-cluster"
MIX = Mix(stream=1.0, tools=0.0, images=0.0)
MODEL, TOKENS, CONCURRENCY, ROUNDS = "sim-chat-small", 14, 64, 2
Command = tuple[list[str], dict[str, str]]


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    assert REDIS is not None
    port = free_port()
    with processes(([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no"], {})):
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}"


def instance(name: str, redis_url: str | None, **extra: str) -> tuple[Command, int, str]:
    """A `coordinator serve` command, its HTTP port and its provider URL."""
    port, pport = free_port(), free_port()
    env = coordinator_env(port, pport, COORDINATOR_ADMIN_KEYS=ADMIN, **extra)
    if redis_url:
        env.update(COORDINATOR_REDIS_URL=redis_url, COORDINATOR_INSTANCE_ID=name,
                   COORDINATOR_CLUSTER_TOKEN=CLUSTER, COORDINATOR_CLUSTER_PORT=str(free_port()))
    command = [PY, "-m", "coordinator", "serve", "--log-level", "WARNING"]
    return (command, env), port, f"ws://127.0.0.1:{pport}/"


def fleet(tmp: Path, name: str, ws: str, providers: list[dict[str, Any]]) -> Command:
    path = fleet_file(tmp, name, providers)
    return [PY, "-m", "provider_sim", "fleet", "--ephemeral-keys", "--file", str(path),
            "--coordinator", ws], {}


def half(prefix: str) -> list[dict[str, Any]]:
    return [{"id": prefix, "count": 2, "max_concurrency": 64}]  # ids prefix-0, prefix-1


async def served(port: int) -> dict[str, int]:
    """Per provider id: successes this instance dispatched to it (its own or remote)."""
    conn = HttpConnection("127.0.0.1", port)
    try:
        reply = await conn.request("GET", "/v1/admin/providers",
                                   [("authorization", f"Bearer {ADMIN}")])
    finally:
        await conn.aclose()
    return {p["id"]: p["served"] for p in json.loads(reply.body)["providers"]}


async def wait_sees(port: int, ids: set[str]) -> None:
    with trio.move_on_after(30):
        while True:
            with contextlib.suppress(OSError, ConnectionLost, ValueError, KeyError):
                if ids <= set(await served(port)):
                    return
            await trio.sleep(0.1)
    raise RuntimeError(f"instance on port {port} never saw providers {sorted(ids)}")


async def crossing(pair: list[int]) -> tuple[int, int]:
    """(crossed, served) so far on instances a and b: successes sent to the other's providers."""
    if not pair:
        return 0, 0
    a, b = [await served(port) for port in pair]
    crossed = sum(n for pid, n in a.items() if pid.startswith("b-")) + \
        sum(n for pid, n in b.items() if pid.startswith("a-"))
    return crossed, sum(a.values()) + sum(b.values())


def merged(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    return dict(sum((Counter(c) for c in counts), Counter()))


async def load(ports: list[int], duration: float) -> dict[str, Any]:
    """CONCURRENCY consumers split evenly over ``ports``, run together, summed."""
    runs: list[dict[str, Any]] = []

    async def one(port: int) -> None:
        runs.append(await run_load(
            f"http://127.0.0.1:{port}", key=KEY, model=MODEL, concurrency=CONCURRENCY // len(ports),
            duration=duration, requests=None, mix=MIX, tokens=TOKENS, show_progress=False))

    async with trio.open_nursery() as nursery:
        for port in ports:
            nursery.start_soon(one, port)
    return {"rps": sum(r["requests_per_s"] for r in runs), "ok": sum(r["ok"] for r in runs),
            "errors": merged(r["errors"] for r in runs)}


async def throughput(tmp: Path, duration: float) -> dict[str, Any]:
    solo_cmd, solo, solo_ws = instance("solo", None)
    commands = [solo_cmd, fleet(tmp, "solo-a", solo_ws, half("sa")),
                fleet(tmp, "solo-b", solo_ws, half("sb"))]
    pair: list[int] = []
    with contextlib.ExitStack() as stack:
        if REDIS is not None:
            url = stack.enter_context(redis_server())
            for name in ("a", "b"):
                cmd, port, ws = instance(name, url)
                commands += [cmd, fleet(tmp, f"pair-{name}", ws, half(name))]
                pair.append(port)
        stack.enter_context(processes(*commands))
        fleet_ids = {f"{p}-{i}" for p in "ab" for i in (0, 1)}
        await wait_sees(solo, {f"s{p}" for p in fleet_ids})
        for port in pair:
            await wait_sees(port, fleet_ids)
        setups = {"one_instance": [solo], "two_instances": pair} if pair else {"one_instance": [solo]}
        for ports in setups.values():
            await load(ports, 1.0)  # warm-up
        windows: dict[str, list[dict[str, Any]]] = {name: [] for name in setups}
        for _ in range(ROUNDS):
            for name, ports in setups.items():
                before = await crossing(pair)
                run = await load(ports, duration / ROUNDS)
                if name == "two_instances":
                    after = await crossing(pair)
                    run.update(crossed=after[0] - before[0], served=after[1] - before[1])
                windows[name].append(run)
    results: dict[str, Any] = {}
    for name, runs in windows.items():
        results[name] = {"rps_c64": sum(r["rps"] for r in runs) / len(runs),
                         "rps_per_window": [r["rps"] for r in runs],
                         "ok": sum(r["ok"] for r in runs),
                         "errors": merged(r["errors"] for r in runs)}
    if pair:
        runs = windows["two_instances"]
        crossed, total = sum(r["crossed"] for r in runs), sum(r["served"] for r in runs)
        results["two_instances"].update(
            crossed=crossed, served=total, crossed_fraction=crossed / total if total else 0.0,
            crossed_per_window=[f"{r['crossed']}/{r['served']}" for r in runs])
        results["ratio_two_over_one"] = (results["two_instances"]["rps_c64"]
                                         / results["one_instance"]["rps_c64"])
    return results


async def first_content(port: int, pairs: int) -> dict[str, Any]:
    """Serial pinned requests to one instance, local and remote strictly interleaved."""
    conn = HttpConnection("127.0.0.1", port)
    headers = [("authorization", f"Bearer {KEY}"), ("content-type", "application/json")]
    samples: dict[str, list[float]] = {"local": [], "remote": []}
    errors: dict[str, int] = {}
    rng = random.Random(0)
    try:
        for i in range(pairs + 20):  # the first 20 pairs warm up (and open the peer link)
            for target in rng.sample(["local", "remote"], 2):
                body = make_body(MODEL, MIX, rng, TOKENS, {"provider_ids": [target]})
                kind: str | None
                try:
                    with trio.fail_after(30):
                        reply = await conn.request("POST", "/v1/chat/completions", headers,
                                                   json.dumps(body).encode())
                    kind = classify_reply(reply.status, reply.body, True)
                except (OSError, ConnectionLost, trio.BrokenResourceError, trio.TooSlowError) as exc:
                    kind = f"transport:{type(exc).__name__}"
                if kind is not None:
                    errors[f"{target}:{kind}"] = errors.get(f"{target}:{kind}", 0) + 1
                elif i >= 20:
                    samples[target].append(reply.first_byte * 1000)
    finally:
        await conn.aclose()
    out: dict[str, Any] = {"pairs": pairs, "errors": errors}
    for q in (50, 99):
        local, remote = percentile(samples["local"], q), percentile(samples["remote"], q)
        out[f"p{q}_ms"] = {"local": local, "remote": remote, "added": remote - local}
    return out


async def cross_ttfc(tmp: Path, pairs: int) -> dict[str, Any]:
    with redis_server() as url:
        (a_cmd, a, a_ws), (b_cmd, _, b_ws) = (
            instance(name, url, COORDINATOR_SPECULATIVE_BACKUP="false") for name in ("a", "b"))
        with processes(a_cmd, b_cmd, fleet(tmp, "local", a_ws, [{"id": "local"}]),
                       fleet(tmp, "remote", b_ws, [{"id": "remote"}])):
            await wait_sees(a, {"local", "remote"})
            return await first_content(a, pairs)


async def main_async(duration: float, pairs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        results = {"throughput": await throughput(Path(tmp), duration)}
        if REDIS is not None:
            results["cross_instance_ttfc"] = await cross_ttfc(Path(tmp), pairs)
    return results


def report(results: dict[str, Any]) -> str:
    tp = results["throughput"]
    one = tp["one_instance"]
    rows = [f"throughput at c={CONCURRENCY}, streamed chat, {TOKENS} tokens (req/s): one instance "
            f"{one['rps_c64']:.0f}, errors {one['errors'] or 'none'}"]
    if "two_instances" not in tp:
        return "\n".join([*rows, "redis-server is not installed: the two-instance throughput "
                          "and the cross-instance TTFC were skipped (apt-get install redis-server)"])
    two, ttfc = tp["two_instances"], results["cross_instance_ttfc"]
    rows += [
        f"  two instances sharing Redis (c={CONCURRENCY // 2} on each) {two['rps_c64']:.0f}, "
        f"errors {two['errors'] or 'none'} -> two/one {tp['ratio_two_over_one']:.2f}",
        f"  crossed to the other instance: {two['crossed']} of {two['served']} "
        f"({two['crossed_fraction'] * 100:.0f}%; per window {', '.join(two['crossed_per_window'])})",
        f"cross-instance time to first content, {ttfc['pairs']} interleaved pairs at c=1 via A "
        "(speculative backup off):",
    ]
    for q in ("p50", "p99"):
        v = ttfc[f"{q}_ms"]
        rows.append(f"  {q} (ms): local {v['local']:.2f}, remote (via B) {v['remote']:.2f} "
                    f"-> added {v['added']:.2f}")
    rows.append(f"  errors: {ttfc['errors'] or 'none'}")
    return "\n".join(rows)


def main() -> None:
    duration = float(os.environ.get("BENCH_SECONDS", "10"))
    pairs = int(os.environ.get("BENCH_SERIAL", "300"))
    if REDIS is None:
        print("redis-server is not installed: measuring one instance only")
    results = trio.run(main_async, duration, pairs)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "cluster.json").write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()

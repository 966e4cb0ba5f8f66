"""The coordinator before (a base commit) and after (this tree), measured in one run.

The base commit is checked out into a temporary ``git worktree``; each tree's
coordinator and simulated fleet run from that tree (cwd and PYTHONPATH), while
the load generator is always this tree's (coordinator.loadgen). Measurements
alternate (direct, before, after; again) so machine noise hits both alike; each
round is reported, then the medians. Load as in bench_stack: sim-chat-small,
14 tokens, 4 simulated providers; c=64 for throughput, c=1 for TTFB, plus the
failover cost. Run: ``python -m benchmarks.bench_before_after [--base 0252e9c]
[--rounds 3]``; BENCH_SECONDS (default 10). Writes
``bench-results/before_after.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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
    pin_load_elsewhere,
    processes,
    server,
    stop,
    throughput_and_latency,
    wait_for_port,
    wait_ready,
)
from coordinator.loadgen.load import Mix, run_load


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


@contextlib.contextmanager
def base_worktree(base: str) -> Iterator[tuple[Path, Path]]:
    """(the base commit's tree, a scratch dir), both removed afterwards, also on error."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-before-after-"))
    tree = tmp / "tree"
    try:
        git("worktree", "add", "--detach", "--quiet", str(tree), base)
        yield tree, tmp
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                       capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def stack(tree: Path, tmp: Path, fleet: Path, log_level: str,
          **env: str) -> Iterator[tuple[int, int]]:
    """Coordinator and simulated fleet, both from ``tree``; yields the HTTP port and the
    coordinator's pid (pinned to BENCH_SERVER_CPUS, as in bench_stack)."""
    port, pport = free_port(), free_port()
    commands = [(server([PY, "-m", "coordinator", "serve", "--log-level", log_level]),
                 coordinator_env(port, pport, **env)),
                # Its own key directory (trees that keep keys), new each run.
                ([PY, "-m", "provider_sim", "fleet", "--file", str(fleet), "--coordinator",
                  f"ws://127.0.0.1:{pport}/"], {"XDG_STATE_HOME": str(tmp / f"state-{port}")})]
    procs, logs = [], [tmp / f"{argv[argv.index('-m') + 1]}.log" for argv, _ in commands]
    try:
        for (argv, extra), log in zip(commands, logs, strict=True):
            with log.open("wb") as err:
                procs.append(subprocess.Popen(
                    argv, cwd=tree, stdout=subprocess.DEVNULL, stderr=err,
                    env={**os.environ, **extra, "PYTHONPATH": str(tree)}))
        wait_for_port(port)
        yield port, procs[0].pid
    except Exception:
        for log in logs:  # why a tree's servers did not come up
            print(f"--- {tree}: {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
        raise
    finally:
        stop(procs)


FAILOVER_REQUESTS = 300


async def failover_ttfb(port: int) -> dict[str, Any]:
    """TTFB of "good" pinned alone vs with a fast "bad" one failing first (as bench_stack)."""
    url = f"http://127.0.0.1:{port}"
    mix = Mix(stream=1.0, tools=0.0, images=0.0)
    runs = [await run_load(url, key=KEY, model="sim-chat-small", concurrency=1, duration=60,
                           requests=FAILOVER_REQUESTS, mix=mix, tokens=14,
                           show_progress=False, extra=extra)
            for extra in ({"provider_ids": ["good"]}, None)]
    own, failover = (r["first_byte_ms"] for r in runs)
    return {"backup_own_ttfb_p50_ms": own["p50"], "failover_ttfb_p50_ms": failover["p50"],
            "failover_cost_p50_ms": failover["p50"] - own["p50"],
            "failover_cost_p99_ms": failover["p99"] - own["p99"],
            "failover_errors": runs[1]["errors"],
            "retries_seen": runs[1]["coordinator"].get(
                'coordinator_dispatch_total{result="retry_precontent"}', 0.0)}


async def measure(tree: Path, tmp: Path, duration: float, direct_rps: float) -> dict[str, Any]:
    plain = fleet_file(tmp, "plain", [{"id": "sim", "count": 4, "max_concurrency": 64}])
    with stack(tree, tmp, plain, "WARNING") as (port, pid):
        await wait_ready(port, 4)
        result = await throughput_and_latency(f"http://127.0.0.1:{port}", duration=duration,
                                              pid=pid)
    result["vs_direct"] = result["rps_c64"] / direct_rps
    # As bench_stack, but "good" is paced: HEAD ranks providers by observed speed, and an
    # unpaced "good" soon looks faster than "bad" declares, so nothing would fail over.
    failover = fleet_file(tmp, "failover", [
        {"id": "bad", "decode_tps": 10000.0, "prefill_tps": 1e6,
         "behaviour": "role_then_error:status=500"},
        {"id": "good", "decode_tps": 1000.0, "prefill_tps": 1e6, "pace": True}])
    with stack(tree, tmp, failover, "ERROR",
               COORDINATOR_BREAKER_STRIKES="1000000000") as (port, _):
        await wait_ready(port, 2)
        result.update(await failover_ttfb(port))
    return result


async def main_async(base_tree: Path, tmp: Path, duration: float, rounds: int) -> list[Any]:
    results = []
    # SIGINT/SIGTERM cancel the rounds, so servers stop and the worktree goes.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt_on, signals)
            for i in range(rounds):
                port = free_port()
                with processes((server([PY, "-m", "provider_sim", "http", "--port", str(port),
                                        "--tokens", "14"]), {})) as (sim,):
                    wait_for_port(port)
                    direct = await throughput_and_latency(f"http://127.0.0.1:{port}",
                                                          duration=duration, pid=sim.pid)
                row = {"direct": direct}
                for side, tree in (("before", base_tree), ("after", ROOT)):
                    row[side] = await measure(tree, tmp, duration, direct["rps_c64"])
                results.append(row)
                print(f"round {i + 1}/{rounds}: {line(row)}", file=sys.stderr, flush=True)
            nursery.cancel_scope.cancel(reason="rounds done")
    return results


async def interrupt_on(signals: Any) -> None:
    async for signum in signals:
        raise KeyboardInterrupt(signal.Signals(signum).name)


MEDIANS = ("rps_c64", "vs_direct", "cpu_ms_per_request", "ttfb_c1_p50_ms", "ttfb_c1_p99_ms",
           "failover_cost_p50_ms")


def line(row: dict[str, Any]) -> str:
    def side(r: dict[str, Any]) -> str:
        return (f"{r['rps_c64']:.0f} req/s ({r['vs_direct']:.0%} of direct), "
                f"{r['cpu_ms_per_request']:.2f} ms CPU/req, TTFB p50 "
                f"{r['ttfb_c1_p50_ms']:.2f} p99 {r['ttfb_c1_p99_ms']:.2f} ms, failover "
                f"+{r['failover_cost_p50_ms']:.2f} ms")
    return (f"direct {row['direct']['rps_c64']:.0f} req/s | before {side(row['before'])} | "
            f"after {side(row['after'])}")


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"direct_rps_c64": statistics.median(
        r["direct"]["rps_c64"] for r in rounds)}
    for side in ("before", "after"):
        out[side] = {k: statistics.median(r[side][k] for r in rounds) for k in MEDIANS}
    out["after_over_before_rps"] = out["after"]["rps_c64"] / out["before"]["rps_c64"]
    return out


def report(doc: dict[str, Any]) -> str:
    med, b, a = doc["median"], doc["median"]["before"], doc["median"]["after"]
    rows = [f"before = {doc['base']} ({doc['base_sha'][:9]}), after = HEAD "
            f"({doc['head_sha'][:9]}{', with uncommitted changes' if doc['dirty'] else ''}); "
            f"{len(doc['rounds'])} round(s) of {doc['seconds']:g} s; the load generator is HEAD's",
            *(f"round {i}: {line(r)}" for i, r in enumerate(doc["rounds"], 1)),
            f"median of {len(doc['rounds'])}:",
            f"  throughput c=64 (req/s):  before {b['rps_c64']:.0f}, after {a['rps_c64']:.0f} -> "
            f"after/before {med['after_over_before_rps']:.2f}x (direct {med['direct_rps_c64']:.0f})",
            f"  coordinator/direct:       before {b['vs_direct']:.0%}, after {a['vs_direct']:.0%}",
            f"  server CPU per request:   before {b['cpu_ms_per_request']:.2f} ms, after "
            f"{a['cpu_ms_per_request']:.2f} ms -> after/before "
            f"{a['cpu_ms_per_request'] / b['cpu_ms_per_request']:.2f}x",
            f"  TTFB c=1 p50 (ms):        before {b['ttfb_c1_p50_ms']:.2f}, after "
            f"{a['ttfb_c1_p50_ms']:.2f}",
            f"  TTFB c=1 p99 (ms):        before {b['ttfb_c1_p99_ms']:.2f}, after "
            f"{a['ttfb_c1_p99_ms']:.2f}",
            f"  failover cost p50 (ms):   before {b['failover_cost_p50_ms']:.2f}, after "
            f"{a['failover_cost_p50_ms']:.2f}"]
    errors = [f"round {i} {side}: {k} {r[side][k]}" for i, r in enumerate(doc["rounds"], 1)
              for side in ("before", "after")
              for k in ("errors_c64", "errors_c1", "failover_errors") if r[side][k]]
    errors += [f"round {i} {side}: only {r[side]['retries_seen']:.0f} of {FAILOVER_REQUESTS} "
               "requests failed over" for i, r in enumerate(doc["rounds"], 1)
               for side in ("before", "after") if r[side]["retries_seen"] < FAILOVER_REQUESTS]
    return "\n".join(rows + (["warnings: " + "; ".join(errors)] if errors else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="0252e9c", help="the 'before' commit (0252e9c)")
    parser.add_argument("--rounds", type=int, default=3, help="before/after pairs (3; >= 2)")
    args = parser.parse_args()
    duration = float(os.environ.get("BENCH_SECONDS", "10"))
    pin_load_elsewhere()
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    doc: dict[str, Any] = {
        "base": args.base, "base_sha": git("rev-parse", "--verify", f"{args.base}^{{commit}}"),
        "head_sha": git("rev-parse", "HEAD"), "seconds": duration,
        "dirty": bool(git("status", "--porcelain", "--", "coordinator", "provider_sim"))}
    try:
        with base_worktree(doc["base_sha"]) as (base_tree, tmp):
            rounds = trio.run(main_async, base_tree, tmp, duration, args.rounds)
    except* KeyboardInterrupt as group:
        sys.exit(f"stopped by {group.exceptions[0]}; servers stopped, worktree removed")
    doc.update(rounds=rounds, median=medians(rounds))
    (out / "before_after.json").write_text(json.dumps(doc, indent=2))
    print(report(doc))


if __name__ == "__main__":
    main()

"""Two coordinators measured at the same time: a base commit and this tree, side by side.

For differences of a few per cent, which ``bench_before_after`` (one tree after the
other) cannot separate from this machine's drift: both coordinators run at once,
each with its own simulated fleet (4 providers), both pinned to BENCH_SERVER_CPUS,
and one load generator drives both with the same load over the same seconds, so
whatever the machine does in that window it does to both. Reported per round: each
side's server CPU per request (from /proc), the ratio this tree / base, and at c=1
the difference in time to first byte; at c>1 also system calls per request
(``perf stat`` on each server, when perf is installed).

Run: ``python -m benchmarks.bench_side_by_side [--base b3d393c] [--rounds 3]
[--per-frame 1,16] [--concurrency 32,1]``; BENCH_SECONDS (default 6) per phase.
``--base HEAD`` with a clean tree measures the method itself (an A/A run: the ratio
it gives for two identical trees). Writes ``bench-results/side_by_side.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from benchmarks.bench_before_after import base_worktree, git, stack
from benchmarks.bench_stack import (
    KEY,
    ROOT,
    cpu_seconds,
    fleet_file,
    pin_load_elsewhere,
    wait_ready,
)
from coordinator.loadgen.load import Mix, percentile, run_load

MIX = Mix(stream=1.0, tools=0.0, images=0.0)
SERIAL_REQUESTS = 300
SYSCALLS = ("sendto", "recvfrom", "epoll_wait")


def _perf(pid: int) -> subprocess.Popen[str] | None:
    """System-call counters on ``pid`` until interrupted (None without perf)."""
    if shutil.which("perf") is None:
        return None
    events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
    return subprocess.Popen(["perf", "stat", "-x,", "-e", events, "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _counts(perf: subprocess.Popen[str] | None) -> dict[str, int]:
    if perf is None:
        return {}
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate()
    counts = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2].rsplit("sys_enter_", 1)[-1]] = int(fields[0])
    return counts


async def _side(port: int, pid: int, concurrency: int, duration: float) -> dict[str, Any]:
    """One side's share of a phase: its requests, CPU per request, TTFB, system calls."""
    cpu_before = cpu_seconds(pid)
    perf = _perf(pid) if concurrency > 1 else None
    try:
        run = await run_load(f"http://127.0.0.1:{port}", key=KEY, model="sim-chat-small",
                             concurrency=concurrency, duration=duration,
                             requests=None if concurrency > 1 else SERIAL_REQUESTS, mix=MIX,
                             tokens=14, show_progress=False)
    finally:
        counts = _counts(perf)
    ok = max(1, run["ok"])
    return {"ok": run["ok"], "errors": run["errors"],
            "cpu_ms_per_request": (cpu_seconds(pid) - cpu_before) * 1000 / ok,
            "ttfb_p50_ms": percentile(run["_samples"]["first_byte"], 50) * 1000,
            "syscalls_per_request": {k: v / ok for k, v in counts.items()}}


async def _phase(sides: dict[str, tuple[int, int]], concurrency: int,
                 duration: float) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def measure(name: str, port: int, pid: int) -> None:
        out[name] = await _side(port, pid, concurrency, duration)

    async with trio.open_nursery() as nursery:
        for name, (port, pid) in sides.items():
            nursery.start_soon(measure, name, port, pid)
    out["cpu_ratio"] = out["tree"]["cpu_ms_per_request"] / out["base"]["cpu_ms_per_request"]
    out["ttfb_diff_ms"] = out["tree"]["ttfb_p50_ms"] - out["base"]["ttfb_p50_ms"]
    return out


def _line(per_frame: int, concurrency: int, i: int, phase: dict[str, Any]) -> str:
    def side(r: dict[str, Any]) -> str:
        calls = " ".join(f"{k} {v:.1f}" for k, v in r["syscalls_per_request"].items())
        return (f"{r['ok']} ok, {r['cpu_ms_per_request']:.2f} ms CPU/req, TTFB p50 "
                f"{r['ttfb_p50_ms']:.2f} ms{', ' + calls if calls else ''}")
    return (f"per_frame={per_frame} c={concurrency} round {i}: base {side(phase['base'])} | "
            f"tree {side(phase['tree'])} | tree/base CPU {phase['cpu_ratio']:.3f}")


async def main_async(base_tree: Path, tmp: Path, *, rounds: int, per_frame: list[int],
                     concurrency: list[int], duration: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for frames in per_frame:
        fleet = fleet_file(tmp, f"side-{frames}", [
            {"id": "sim", "count": 4, "max_concurrency": 64, "events_per_frame": frames}])
        with stack(base_tree, tmp, fleet, "WARNING") as base, \
                stack(ROOT, tmp, fleet, "WARNING") as tree:
            await wait_ready(base[0], 4)
            await wait_ready(tree[0], 4)
            for i in range(1, rounds + 1):
                for c in concurrency:
                    phase = await _phase({"base": base, "tree": tree}, c, duration)
                    results.setdefault(f"per_frame={frames} c={c}", []).append(phase)
                    print(_line(frames, c, i, phase), file=sys.stderr, flush=True)
    return results


def summary(results: dict[str, Any]) -> list[str]:
    rows = []
    for key, phases in results.items():
        ratios = [p["cpu_ratio"] for p in phases]
        diffs = [p["ttfb_diff_ms"] for p in phases]
        rows.append(f"{key}: tree/base CPU per request {', '.join(f'{r:.3f}' for r in ratios)} "
                    f"(median {statistics.median(ratios):.3f}); TTFB p50 tree - base "
                    f"{', '.join(f'{d:+.2f}' for d in diffs)} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="b3d393c", help="the base commit (b3d393c)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-frame", default="1,16", help="events per provider frame")
    parser.add_argument("--concurrency", default="32,1", help="concurrency of each phase")
    args = parser.parse_args()
    pin_load_elsewhere()
    doc: dict[str, Any] = {
        "base": args.base, "base_sha": git("rev-parse", "--verify", f"{args.base}^{{commit}}"),
        "head_sha": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", "coordinator", "provider_sim")),
        "seconds": float(os.environ.get("BENCH_SECONDS", "6"))}
    with base_worktree(doc["base_sha"]) as (base_tree, tmp):
        try:
            doc["results"] = trio.run(partial(
                main_async, base_tree, tmp, rounds=args.rounds,
                per_frame=[int(x) for x in args.per_frame.split(",")],
                concurrency=[int(x) for x in args.concurrency.split(",")],
                duration=doc["seconds"]))
        except KeyboardInterrupt:
            sys.exit("stopped; servers stopped, worktree removed")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "side_by_side.json").write_text(json.dumps(doc, indent=2))
    print(f"base = {args.base} ({doc['base_sha'][:9]}), tree = HEAD ({doc['head_sha'][:9]}"
          f"{', with uncommitted changes' if doc['dirty'] else ''}); both at once, "
          f"{doc['seconds']:g} s per phase")
    print("\n".join(summary(doc["results"])))


if __name__ == "__main__":
    main()

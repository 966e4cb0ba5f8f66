"""SIGTERM during a load run on loopback: the coordinator (a subprocess, drain_timeout 10 s), a 4-provider
fleet, 32 looping streaming consumers; SIGTERM after 3 s; consumers go on until the coordinator exits.
``short``: every stream ~3 s; ``long``: half the fleet streams ~20 s, so the drain deadline cuts them.
Each request is classified (docs/operations.md, "Shutting down"): a completed; b in-band ``shutdown``
error + one [DONE]; c 503 ``shutting_down`` + Retry-After; d connection refused (never accepted);
e LOST, anything else. ``python -m benchmarks.bench_drain [--json] [--keep-alive]``, ~45 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import h11
import trio

from benchmarks.bench_stack import ROOT, free_port, wait_ready

KEY, TOKEN, HOST, PY = "k", "t", "127.0.0.1", sys.executable
CHAT = b'{"model":"sim-chat-small","stream":true,"messages":[{"role":"user","content":"hi"}]}'
FAILS = (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError, EOFError)
SHORT, LONG = "healthy:token_interval=0.05,tokens=60", "healthy:token_interval=0.05,tokens=400"
VARIANTS = {"short": [("short", 4, SHORT)], "long": [("short", 2, SHORT), ("long", 2, LONG)]}
LOAD_S, PAUSE_S = 3.0, 0.1  # load before SIGTERM; a consumer's pause after a refusal or failure
HEAD = [("host", HOST), ("authorization", f"Bearer {KEY}"), ("content-type", "application/json"),
        ("content-length", str(len(CHAT)))]
DETAIL = ("t0", "t1", "status", "done", "codes", "error", "body_bytes", "reused")  # of a lost request
Rec = dict[str, Any]


def refused(exc: BaseException) -> bool:  # trio wraps the refusal in "all attempts ... failed"
    inner = exc.__cause__.exceptions if isinstance(exc.__cause__, BaseExceptionGroup) else [exc]
    return all(isinstance(x, ConnectionRefusedError) for x in inner)


async def exchange(stream: trio.SocketStream, conn: h11.Connection, rec: Rec) -> None:
    """One streaming chat request: status, Retry-After, the body's [DONE]s and error codes."""
    parts = (h11.Request(method="POST", target="/v1/chat/completions", headers=HEAD), h11.Data(CHAT))
    await stream.send_all(b"".join(conn.send(e) or b"" for e in (*parts, h11.EndOfMessage())))
    body = bytearray()
    try:
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))  # b"" at EOF
            elif isinstance(event, h11.Response):
                headers = {k.decode(): v.decode() for k, v in event.headers}
                rec.update(status=event.status_code, retry_after=headers.get("retry-after"))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("connection closed before a response")
    finally:
        events = [e.removeprefix("data: ") for e in bytes(body).decode(errors="replace").split("\n\n")]
        codes = []
        for data in events:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                codes += [json.loads(data)["error"]["code"]] if '"error"' in data else []
        rec.update(body_bytes=len(body), done=events.count("[DONE]"), codes=codes)


async def consumer(port: int, recs: list[Rec], keep_alive: bool) -> None:
    """Loop: one request after another, a fresh connection each (or reused, with --keep-alive)."""
    stream: trio.SocketStream | None = None
    conn = h11.Connection(h11.CLIENT)
    while True:
        rec: Rec = {"t0": trio.current_time(), "reused": stream is not None, "connected": True}
        recs.append(rec)
        try:
            if stream is None:
                rec["connected"] = False
                stream, conn = await trio.open_tcp_stream(HOST, port), h11.Connection(h11.CLIENT)
                rec["connected"] = True
            with trio.fail_after(120):
                await exchange(stream, conn, rec)
        except FAILS as exc:  # (cancelled at the end of the run: no "t1", not a result)
            rec.update(error=f"{type(exc).__name__}: {exc}"[:120], refused=refused(exc))
        rec["t1"] = trio.current_time()
        if keep_alive and "error" not in rec and conn.our_state is conn.their_state is h11.DONE:
            conn.start_next_cycle()
        elif stream is not None:
            await stream.aclose()
            stream = None
        if "error" in rec or rec.get("status") != 200:
            await trio.sleep(PAUSE_S)


def classify(r: Rec) -> str:
    if not r["connected"]:
        return "d_refused" if r.get("refused") else "e_lost"
    if "error" in r:
        return "e_lost"
    if r.get("status") == 200 and r["done"] == 1:
        return {(): "a_completed", ("shutdown",): "b_inband_shutdown"}.get(tuple(r["codes"]), "e_lost")
    ok_503 = r.get("status") == 503 and r["codes"] == ["shutting_down"] and r.get("retry_after")
    return "c_503_shutting_down" if ok_503 else "e_lost"


async def died(proc: subprocess.Popen[bytes]) -> None:
    await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
    raise RuntimeError(f"the coordinator exited ({proc.returncode}) before it was ready")


async def drive(proc: subprocess.Popen[bytes], port: int, args: argparse.Namespace) -> Rec:
    async with trio.open_nursery() as nursery:  # fail fast if the coordinator dies first
        nursery.start_soon(died, proc)
        await wait_ready(port, 4)
        nursery.cancel_scope.cancel()
    recs: list[Rec] = []
    async with trio.open_nursery() as nursery:
        for _ in range(args.consumers):
            nursery.start_soon(consumer, port, recs, args.keep_alive)
        await trio.sleep(LOAD_S)
        sig = trio.current_time()
        in_flight = sum("t1" not in r and r["connected"] for r in recs)
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await trio.to_thread.run_sync(proc.wait, args.drain_timeout + 20)
        exit_s = round(trio.current_time() - sig, 3) if proc.poll() is not None else None  # None: hung
        await trio.sleep(0.5)  # consumers see the closed streams and refused connections
        nursery.cancel_scope.cancel()
    for r in recs:
        r.update(t0=round(r["t0"] - sig, 3), t1=round(r["t1"] - sig, 3) if "t1" in r else None)
    done = [r | {"kind": classify(r)} for r in recs if r["t1"] is not None]
    ended = [r["t1"] for r in done if r["kind"][0] in "ab"]
    starts = {k: sorted(r["t0"] for r in done if r["kind"] == k) for k in sorted({r["kind"] for r in done})}
    return {"counts": {k: len(v) for k, v in starts.items()}, "lost": len(starts.get("e_lost", [])),
            "requests": len(done),
            "in_flight_at_sig": in_flight, "cut": sum(r["t1"] is None for r in recs),  # by our stop
            "cut_connected": [{k: r.get(k) for k in DETAIL}
                              for r in recs if r["t1"] is None and r["connected"]],
            "ab_started_after_sigterm": sum(r["t0"] > 0 for r in done if r["kind"][0] in "ab"),
            "c_started_before_sigterm": sum(r["t0"] < 0 for r in done if r["kind"][0] == "c"),
            "start_span_s": {k: (v[0], v[-1]) for k, v in starts.items()},
            "last_stream_end_s": max(ended, default=None), "sigterm_to_exit_s": exit_s,
            "lost_detail": [{k: r.get(k) for k in DETAIL} for r in done if r["kind"] == "e_lost"][:20]}


def run_variant(name: str, args: argparse.Namespace, tmp: Path) -> Rec:
    port, pport = free_port(), free_port()
    fleet = tmp / f"{name}.toml"
    fleet.write_text(f'token = "{TOKEN}"\n' + "".join(
        f'[[provider]]\nid = "{pid}"\ncount = {n}\nbehaviour = "{spec}"\n'
        for pid, n, spec in VARIANTS[name]))
    env = {**os.environ, "COORDINATOR_API_KEYS": KEY, "COORDINATOR_PROVIDER_TOKENS": TOKEN,
           "COORDINATOR_DRAIN_TIMEOUT": str(args.drain_timeout)}
    logs = {k: tmp / f"{name}.{k}" for k in ("out", "err", "fleet")}
    with logs["out"].open("w") as out, logs["err"].open("w") as err, logs["fleet"].open("w") as flog:
        coordinator = subprocess.Popen(
            [PY, "-m", "coordinator", "serve", "--port", str(port), "--provider-port", str(pport)],
            cwd=ROOT, env=env, stdout=out, stderr=err)
        fleet_proc = subprocess.Popen([PY, "-m", "provider_sim", "fleet", "--ephemeral-keys",
                                       "--file", str(fleet),
                                       "--coordinator", f"ws://{HOST}:{pport}/"],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=flog)
    failure: BaseException | None = None
    try:
        result = trio.run(drive, coordinator, port, args)
    except Exception as exc:  # most often: never ready; the stderr below says why
        failure = exc
    finally:
        for proc in (fleet_proc, coordinator):
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            proc.kill()
            proc.wait()
    out_text, err_text, fleet_text = (path.read_text() for path in logs.values())
    if failure is not None:
        raise SystemExit(f"variant {name}: {failure!r}\ncoordinator stderr:\n{err_text[-3000:]}")
    result.update(exit_code=coordinator.returncode, stopped_line="coordinator stopped" in out_text,
                  traceback="Traceback" in err_text, fleet_traceback="Traceback" in fleet_text,
                  error_lines=[x[:200] for x in err_text.splitlines() if " ERROR " in x][:5])
    return {"variant": name, "fleet": VARIANTS[name], "consumers": args.consumers,
            "drain_timeout_s": args.drain_timeout, "keep_alive": args.keep_alive, **result}


def report(r: Rec) -> str:
    fleet = ", ".join(f"{n}x {spec.partition(',')[2]}" for _, n, spec in r["fleet"])
    lines = [f"variant {r['variant']} ({fleet}; {r['consumers']} consumers, drain_timeout "
             f"{r['drain_timeout_s']}s, keep-alive {r['keep_alive']}): {r['requests']} requests "
             f"(+{r['cut']} cut by the bench's stop), {r['in_flight_at_sig']} in "
             "flight at SIGTERM",
             f"  {r['counts']}",
             f"  a/b started after SIGTERM {r['ab_started_after_sigterm']}; c started before SIGTERM "
             f"{r['c_started_before_sigterm']}; last a/b stream ended {r['last_stream_end_s']} s "
             "after SIGTERM",
             f"  start times per class (first, last; s from SIGTERM): {r['start_span_s']}",
             f"  coordinator: exit {r['exit_code']} {r['sigterm_to_exit_s']} s after SIGTERM; "
             f"'coordinator stopped' {r['stopped_line']}; Traceback {r['traceback']}; ERROR lines "
             f"{len(r['error_lines'])}; fleet Traceback {r['fleet_traceback']}",
             f"  LOST: {r['lost']}" + (" -> goal met" if r["lost"] == 0 else " -> GOAL VIOLATED")]
    return "\n".join(lines + [f"    {tag}{d}" for tag, ds in (("", r["lost_detail"]), (
        "cut, connected: ", r["cut_connected"]), ("log: ", r["error_lines"])) for d in ds])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_drain", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the report")
    parser.add_argument("--keep-alive", action="store_true", help="consumers reuse connections")
    parser.add_argument("--consumers", type=int, default=32)
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    args = parser.parse_args()
    names = list(VARIANTS) if args.variant == "both" else [args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_variant(name, args, Path(tmp)) for name in names]
    print(json.dumps(results, indent=2) if args.json else "\n".join(map(report, results)))
    sys.exit(1 if any(r["lost"] or r["exit_code"] or r["sigterm_to_exit_s"] is None for r in results) else 0)


if __name__ == "__main__":
    main()

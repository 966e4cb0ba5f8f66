"""``coordinator load`` on the command line: flags, exit status, interruption, the progress bar."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import signal
import socket
import sys
from pathlib import Path

import pytest
import trio

from coordinator.__main__ import _parser, main
from coordinator.loadgen.cli import failure_reason
from coordinator.loadgen.load import Mix, classify_reply, run_load
from coordinator.loadgen.progress import WIPE, BarAwareHandler, ProgressBar

from .harness import API_KEY
from .live import live_coordinator

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def refused_url():
    """A loopback port that refuses connections: bound, never listening, held meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def run_main(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


# Each also names a URL that refuses and a short duration, so that a flag that is
# wrongly accepted makes a short run (exit 0) rather than a long one.
@pytest.mark.parametrize(("flags", "says"), [
    (["--fault-mix", "bogus=0.1"], "'bogus=0.1': unknown behaviour 'bogus' (known: healthy, "),
    (["--fault-mix", "role_then_error=abc"],
     "'role_then_error=abc': the probability must be a fraction from 0 to 1, not 'abc'"),
    (["--fault-mix", "role_then_error"], "expected BEHAVIOUR=PROBABILITY"),
    (["--fault-mix", "role_then_error=0.7,stall=0.5"], "add up to 1.2, more than 1"),
    (["--fault-mix", "role_then_error:status=x=0.1"], "status='x': expected int"),
    (["--concurrency", "0"], "--concurrency: must be a whole number from 1 to"),
    (["--concurrency", "-4"], "--concurrency: must be a whole number from 1 to"),
    (["--requests", "-3"], "--requests: must be a whole number from 1 to"),
    (["--requests", "0"], "--requests: must be a whole number from 1 to"),
    (["--tokens", "0"], "--tokens: must be a whole number from 1 to"),
    (["--embedded", "-1"], "--embedded: must be a whole number from 1 to"),
    (["--stream", "1.5"], "--stream: must be a fraction from 0 to 1, not '1.5'"),
    (["--tools", "-0.1"], "--tools: must be a fraction from 0 to 1"),
    (["--images", "nan"], "--images: must be a fraction from 0 to 1"),
    (["--max-error-rate", "2"], "--max-error-rate: must be a fraction from 0 to 1"),
    (["--duration", "0"], "--duration: must be more than 0 and at most 600 seconds"),
    (["--duration", "601"], "--duration: must be more than 0 and at most 600 seconds"),
])
def test_a_flag_out_of_range_is_one_line_and_exit_2(capsys, refused_url, flags, says):
    # A bad --fault-mix was a 38-line traceback; --concurrency 0, negative counts and
    # --stream 1.5 were accepted.
    status = run_main(["load", "--url", refused_url, "--duration", "0.2", *flags])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and says in err, err


def test_a_bad_url_is_one_line_and_exit_2(capsys):
    assert run_main(["load", "--url", "http://192.0.2.1:80"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loopback only" in err


def test_every_flag_has_help():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    load = sub.choices["load"]
    flags = [a for a in load._actions if a.option_strings and "--help" not in a.option_strings]
    assert {"--max-error-rate", "--fault-mix", "--concurrency"} <= {
        a.option_strings[0] for a in flags}
    for action in flags:
        assert action.help and len(action.help) > 10, action.option_strings


@pytest.mark.slow  # load runs in real time
def test_a_run_that_mostly_fails_exits_1_and_says_why(capsys, refused_url):
    # Nothing listening: 0 % success exited 0.
    argv = ["load", "--url", refused_url, "--duration", "0.3", "--concurrency", "2"]
    assert run_main(argv) == 1
    captured = capsys.readouterr()
    assert "success 0.00%" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert re.fullmatch(r"coordinator load: failed: 100\.0% of \d+ requests failed "
                        r"\(transport:OSError x\d+\), more than --max-error-rate 0\.5", last)
    # The threshold is the caller's: at 1, every error rate passes.
    assert run_main([*argv, "--max-error-rate", "1"]) == 0


def test_failure_reason_is_strictly_past_the_threshold():
    def report(requests, ok, **errors):
        return {"requests": requests, "ok": ok, "errors": errors}

    assert failure_reason(report(10, 5, http_401=5), 0.5) is None
    assert failure_reason(report(10, 4, http_401=6), 0.5) == (
        "60.0% of 10 requests failed (http_401 x6), more than --max-error-rate 0.5")
    assert failure_reason(report(10, 10), 0.0) is None
    assert "1 requests failed" in (failure_reason(report(1, 0, x=1), 0.0) or "")
    assert failure_reason(report(0, 0), 1.0) == "no request completed"


@pytest.mark.slow  # load runs in real time
async def test_a_stopped_run_reports_what_completed_as_partial():
    async with live_coordinator(providers=1) as (running, fleet):
        stop = trio.Event()
        report: dict = {}

        async def drive():
            report.update(await run_load(
                running.http_url, key=API_KEY, model="sim-chat-small", concurrency=4,
                duration=60.0, requests=None, mix=Mix(stream=0.5), show_progress=False,
                stop=stop))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drive)
                while len(fleet[0].received) < 8:
                    await fleet[0].activity.wait()
                stop.set()
    assert report["partial"] is True
    assert report["elapsed_s"] < 30
    assert report["requests"] >= 4 and report["ok"] == report["requests"]
    # What was in flight was abandoned by us, not failed by the target.
    assert report["errors"] == {} and report["success_rate"] == 1.0
    assert 0 <= report["abandoned_in_flight"] <= 4


@pytest.mark.slow  # a load process in real time
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_writes_the_partial_report_and_exits_128_plus_it(tmp_path, signum):
    # It printed "interrupted: no report" and exited 0.
    out, err = tmp_path / "out", tmp_path / "err"
    report_path = tmp_path / "report.json"
    async with live_coordinator(providers=1) as (running, fleet):
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "coordinator", "load", "--url", running.http_url,
                 "--key", API_KEY, "--duration", "120", "--concurrency", "2",
                 "--json", str(report_path)],
                stdout=stdout, stderr=stderr, cwd=REPO)
            try:
                with trio.fail_after(60):
                    while len(fleet[0].received) < 6:
                        await fleet[0].activity.wait()
                    process.send_signal(signum)
                    await process.wait()
            finally:
                process.kill()
    assert process.returncode == 128 + signum, err.read_text()
    assert f"{signum.name}: stopping; the partial report follows" in err.read_text()
    text = out.read_text()
    assert text.startswith(f"PARTIAL REPORT: stopped early ({signum.name});")
    report = json.loads(report_path.read_text())
    assert report["partial"] is True and report["interrupted_by"] == signum.name
    assert report["requests"] >= 4 and report["ok"] == report["requests"]


@pytest.mark.slow  # load runs in real time
def test_log_records_do_not_cut_through_the_progress_bar(monkeypatch):
    # WARNING lines from the embedded coordinator landed after the bar's text.
    terminal = io.StringIO()
    monkeypatch.setattr(terminal, "isatty", lambda: True)
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh process
    run_main(["load", "--embedded", "2", "--duration", "1.5", "--concurrency", "4",
              "--fault-mix", "role_then_disconnect=0.2"])
    text = terminal.getvalue()
    bars = list(re.finditer(r"\] \d+ done, \d+ errors, \d+ req/s", text))
    records = [m.start() for m in re.finditer(r"(INFO|WARNING)[: ]", text)]
    assert bars and any(at > bars[0].end() for at in records), "no record while the bar was drawn"
    # What follows the bar's text on its line: only the bar's own next redraw or its end.
    for bar in bars:
        assert text.startswith(("\r", "\n"), bar.end()), repr(text[bar.start():bar.end() + 60])
    for at in records:
        assert text[:at].endswith((WIPE, "\n")), repr(text[max(0, at - 80):at + 40])
    assert text.endswith("\n")


def test_the_bar_steps_aside_for_a_record_and_comes_back():
    terminal = io.StringIO()
    bar = ProgressBar(terminal)
    handler = BarAwareHandler(terminal, bar)
    handler.setFormatter(logging.Formatter("%(message)s"))
    bar.draw("[###   ] 3 done")
    handler.emit(logging.makeLogRecord({"msg": "a record"}))
    assert terminal.getvalue() == f"{WIPE}[###   ] 3 done{WIPE}a record\n[###   ] 3 done"
    bar.finish()
    handler.emit(logging.makeLogRecord({"msg": "after"}))
    assert terminal.getvalue().endswith("3 done\nafter\n")


@pytest.mark.slow  # load runs in real time
def test_a_default_run_shows_failover_at_work_but_almost_no_errors(tmp_path, capsys):
    # The README promised "a few per cent" visible errors; the default mix dropped
    # sockets mid-stream and runs showed 8-18 %, 502s and 503s among them.
    path = tmp_path / "report.json"
    assert run_main(["load", "--duration", "2", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["requests"] >= 50
    assert report["success_rate"] >= 0.98, report["errors"]
    # The fleet did fail requests: the coordinator retried them before content.
    assert report["coordinator"]['coordinator_dispatch_total{result="retry_precontent"}'] > 0


def test_an_error_kind_the_server_sends_is_reported_on_one_short_line():
    assert classify_reply(429, b'{"error": {"code": "capacity"}}', False) == "http_429:capacity"
    hostile = json.dumps({"error": {"code": "x\n" + "y" * 10_000}}).encode()
    kind = classify_reply(503, hostile, False)
    assert kind is not None and "\n" not in kind and len(kind) < 80
    assert classify_reply(500, b'{"error": {"code": {"nested": 1}}}', False) == "http_500:<dict>"

"""``provider-sim fleet`` as a new user meets it (issue 22, item 11): keys that survive a
restart, a collision said once, configuration errors that stop at once.

Real processes on loopback, bounded in time.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from provider_sim.__main__ import build_parser

from .test_edges import _run_coordinator

pytestmark = pytest.mark.slow  # provider-sim and coordinator processes (docs/testing.md)


def _sim(*args: str, home: Path) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    environ["XDG_STATE_HOME"] = str(home)  # the default key directory lives here
    return subprocess.Popen([sys.executable, "-m", "provider_sim", "fleet", *args], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Output:
    """A process's output, read in the background; waits for lines with a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process, self.lines = process, []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                assert left > 0, f"no {text!r} in:\n{''.join(self.lines)}"
                self._changed.wait(left)

    def count(self, text: str) -> int:
        with self._changed:
            return sum(text in line for line in self.lines)

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(30)
        self._reader.join(5)  # it has read to the end of the output: the last lines are in
        return "".join(self.lines)


@contextmanager
def coordinator() -> Iterator[str]:
    """A coordinator on free ports (token "t"); its provider URL."""
    process = _run_coordinator("serve", "--port", "0", "--provider-port", "0")
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("coordinator: HTTP on"):
                yield line.rsplit(" ", 1)[1].strip()
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


def test_a_restarted_fleet_proves_the_same_keys_and_keeps_its_ids(tmp_path):
    with coordinator() as url:
        for run in range(2):  # the second run was refused "bound to another key", forever
            out = Output(_sim("--n", "2", "--token", "t", "--coordinator", url, home=tmp_path))
            out.wait_for("sim-1: registered")
            out.wait_for("sim-0: registered")
            said = out.stop()
            assert "another key" not in said, (run, said)
    keys = sorted(p.name for p in (tmp_path / "trio-inference-coordinator" / "sim-keys").iterdir())
    assert keys == [".lock", "sim-0.json", "sim-1.json"]


def test_two_fleets_on_one_key_directory_are_told_at_once(tmp_path):
    with coordinator() as url:
        first = Output(_sim("--n", "1", "--token", "t", "--coordinator", url, home=tmp_path))
        first.wait_for("sim-0: registered")
        second = _sim("--n", "1", "--token", "t", "--coordinator", url, home=tmp_path)
        said, _ = second.communicate(timeout=30)
        first.stop()
    assert second.returncode == 2 and "in use by another fleet" in said, said
    assert len(said.strip().splitlines()) == 1


def test_a_collision_with_another_key_is_said_once(tmp_path):
    with coordinator() as url:
        owner = Output(_sim("--n", "1", "--token", "t", "--coordinator", url,
                            home=tmp_path / "a"))
        owner.wait_for("sim-0: registered")
        rival = Output(_sim("--n", "1", "--token", "t", "--coordinator", url,
                            home=tmp_path / "b"))
        rival.wait_for("another provider holds this id")
        time.sleep(8)  # a scripted wait: it used to say so every second or two
        said = rival.stop()
        owner.stop()
    assert said.count("refused:") == 1, said
    assert "sim-0: refused: provider id sim-0" in said


@pytest.mark.parametrize("args, says", [
    (["--coordinator", "http://127.0.0.1:8001/"], "is not a coordinator's provider URL"),
    (["--n", "-3"], "--n: must be at least 1, not -3"),
    (["--n", "many"], "'many' is not a whole number"),
    (["--events-per-frame", "0"], "--events-per-frame: must be at least 1"),
    (["--behaviour", "bogus"], "unknown behaviour 'bogus'"),
    (["--file", "/nonexistent/fleet.toml"], "No such file"),
])
def test_a_fleet_that_cannot_run_stops_at_once_with_one_line(tmp_path, args, says):
    started = time.monotonic()
    process = _sim(*args, home=tmp_path)
    said, _ = process.communicate(timeout=30)
    assert process.returncode == 2 and says in said, said
    assert len(said.strip().splitlines()) == 1 and "Traceback" not in said
    assert time.monotonic() - started < 10  # no retrying an unusable URL forever


def test_one_provider_is_one_provider(tmp_path):
    out = Output(_sim("--n", "1", "--coordinator", "ws://127.0.0.1:9/", home=tmp_path))
    out.wait_for("connecting to")
    assert "1 simulated provider connecting" in out.stop()


def test_every_flag_says_what_it_does():
    parser = build_parser()
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in commands[0].choices.values():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{sub.prog} {action.option_strings} has no help"

"""Ctrl-C and SIGTERM stop ``provider-sim`` and ``provider-agent`` quietly, whenever they come.

The simulator said it was "connecting" before it caught signals: a Ctrl-C sent on
reading that line (as ``tests/test_simulator_cli.py`` sends it) could meet trio's
KeyboardInterrupt instead (a traceback) or, with SIGINT ignored from birth as in a
background job, nothing at all: a fleet that did not stop within 30 s (a CI run).
"""

from __future__ import annotations

import io
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

from provider_link import signals
from provider_link.signals import run_until_signalled, until_signalled


class _SignalOnReady(io.StringIO):
    """Standard output that gets a SIGINT the moment the ready line is written."""

    def write(self, text: str) -> int:
        if "ready" in text:
            signal.raise_signal(signal.SIGINT)
        return super().write(text)


async def _forever(cancelled: list[bool]) -> None:
    try:
        await trio.sleep_forever()
    finally:
        cancelled.append(True)


@contextmanager
def _sigint_disposition(handler: Any) -> Iterator[None]:
    """SIGINT's disposition as a process may inherit it: Python's default, or ignored (a
    job started in the background by a non-interactive shell, as CI may start it)."""
    before = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN],
                         ids=["default", "ignored"])
async def test_a_signal_sent_on_reading_ready_stops_quietly(inherited, monkeypatch, capsys,
                                                            autojump_clock):
    """With SIGINT ignored from birth, a signal before the receiver opened was lost and the
    simulator ran on (a CI run's fleet that did not stop within 30 s); with Python's
    default, it was a KeyboardInterrupt's traceback."""
    cancelled: list[bool] = []
    out = _SignalOnReady()
    monkeypatch.setattr(sys, "stdout", out)
    with _sigint_disposition(inherited), trio.fail_after(60):
        assert await until_signalled(_forever, cancelled, ready="ready") is None
    assert cancelled == [True]
    assert out.getvalue() == "ready\n"
    assert "SIGINT: stopping" in capsys.readouterr().err


async def test_what_the_function_returns_is_returned():
    async def answer() -> int:
        return 42

    assert await until_signalled(answer) == 42


def test_a_signal_while_trio_starts_stops_quietly(monkeypatch, capsys):
    """Before the signals are caught, trio turns a SIGINT into KeyboardInterrupt: caught."""
    stock = trio.open_signal_receiver

    def signalled_first(*signums: int) -> Any:
        signal.raise_signal(signal.SIGINT)
        return stock(*signums)

    monkeypatch.setattr(signals.trio, "open_signal_receiver", signalled_first)
    with _sigint_disposition(signal.default_int_handler):  # trio's, while it starts
        assert run_until_signalled(_forever, []) is None
    assert "SIGINT: stopping" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_either_signal_stops_a_run(signum, capsys):
    async def signal_soon(cancelled: list[bool]) -> None:
        signal.raise_signal(signum)
        await _forever(cancelled)

    cancelled: list[bool] = []
    assert run_until_signalled(signal_soon, cancelled) is None
    assert cancelled == [True]
    assert f"{signal.Signals(signum).name}: stopping" in capsys.readouterr().err

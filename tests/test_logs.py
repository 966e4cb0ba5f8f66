"""What reaches the logs (issue 22, item 7): outside text only escaped and bounded, and
no provider error text (which may quote the prompt) at INFO or above.

The hostile provider text holds a newline and a fake log line (it forged
``… CRITICAL coordinator.app FORGED-LINE`` in the log), then 10 KB of the
consumer's prompt. Every record, at every level, is checked.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys

import pytest
import trio
import trio_websocket

import coordinator.__main__ as coordinator_cli
import provider_sim.__main__ as sim_cli
from coordinator.untrusted import LineSafeFormatter
from provider_sim import fleet
from provider_sim.behaviours import Behaviour, Fault
from provider_sim.fleet import FleetMember
from provider_sim.provider import SimProvider

from .harness import MODEL, model, open_harness

WORD = "secret"
PROMPT = " ".join(f"{WORD}{i:05d}" for i in range(850))  # 10 KB of the consumer's prompt
FORGED = "\n2026-01-01 00:00:00,000 CRITICAL coordinator.app FORGED-LINE\n"
HOSTILE = "model said: " + FORGED + PROMPT
# At most this much of any one outside text may be in one log record.
MAX_OUTSIDE = 300
TYPE_EXCERPT = 40  # what a rejected frame's log line quotes of an unknown type (messages.py)


@pytest.fixture
def everything(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of every logger, DEBUG included."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="coordinator")  # conftest holds it at INFO
    return caplog


def _outside_chars(message: str) -> int:
    """How many characters of the prompt a message carries (whole words, then a part)."""
    words = re.findall(WORD + r"\d{0,5}", message)
    return sum(len(word) + 1 for word in words)


def assert_safe(records: list[logging.LogRecord], *, excerpt_above_debug: int) -> int:
    """Each record one line, holding at most MAX_OUTSIDE characters of the prompt, and at
    most ``excerpt_above_debug`` of it at INFO and above; how much was logged in all."""
    seen = 0
    for record in records:
        message = record.getMessage()
        assert "\n" not in message and "\r" not in message, message
        assert record.exc_info is None, message  # no traceback for what a provider sent
        outside = _outside_chars(message)
        assert outside <= MAX_OUTSIDE, (record.levelname, message[:400])
        if record.levelno >= logging.INFO:
            assert outside <= excerpt_above_debug, (record.levelname, message[:400])
        seen += outside
    return seen


async def test_a_provider_error_quoting_the_prompt_stays_out_of_the_log(
        autojump_clock, everything):
    """Before content (a failover, then the consumer's error) and after content (an
    in-band error): at INFO and above, the status and the reason, never the text."""
    async with open_harness(max_attempts=1) as h:
        await h.add_provider("p")
        h.providers["p"].behaviour = Behaviour(Fault.ERROR, status=500, error_message=HOSTILE)
        before = await h.chat(stream=False)
        assert before.status == 503  # the consumer gets the provider's text, bounded
        assert len(before.json()["error"]["message"]) <= 400
        h.providers["p"].behaviour = Behaviour(Fault.ERROR_AFTER_CONTENT, status=500,
                                               error_message=HOSTILE)
        after = await h.chat()
        assert after.status == 200 and any("error" in event for event in after.sse_json)
        await h.assert_quiescent()
    assert assert_safe(everything.records, excerpt_above_debug=0) > 0
    inband = [r for r in everything.records if "in-band error" in r.getMessage()]
    [warning] = [r for r in inband if r.levelno == logging.WARNING]
    assert "provider_error (status 500)" in warning.getMessage()  # what an operator needs
    [debug] = [r for r in inband if r.levelno == logging.DEBUG]
    assert "FORGED-LINE" in debug.getMessage()  # the text, escaped, for whoever asks for it


async def test_an_unknown_frame_type_cannot_forge_a_log_line(autojump_clock, everything):
    async with open_harness() as h:
        provider = await h.add_provider("p")
        assert provider.current_ws is not None
        for frame in ({"type": HOSTILE}, {"type": PROMPT}, {"type": "x", "request_id": HOSTILE},
                      {"type": "inference_error", "request_id": "r", "error": 7,
                       HOSTILE: HOSTILE}):
            await provider.current_ws.send_message(json.dumps(frame))
        result = await h.chat()
        assert result.status == 200  # its answer came after them on the same socket
        assert h.coordinator.metrics.frames_rejected.labels("malformed")._value.get() == 4
    # The type a provider used is still told: an excerpt, enough to name a newer frame.
    assert_safe(everything.records, excerpt_above_debug=TYPE_EXCERPT)
    rejected = [r.getMessage() for r in everything.records if "rejected frame" in r.getMessage()]
    assert len(rejected) == 4
    assert "(unknown message type model said: \\\\n2026-01-01 00:00:00,000 CR...)" in rejected[0]


async def test_the_request_log_holds_the_consumers_model_escaped_on_one_line(
        autojump_clock, everything):
    """The consumer's ``model`` is the one outside text in the request log: JSON escapes it,
    and the request's validation bounds it (256 characters) before it is recorded."""
    async with open_harness() as h:
        await h.add_provider("p")
        unknown = await h.chat(stream=False, model_id=MODEL + "\n" + WORD + "00001")
        assert unknown.status == 404
        too_long = await h.chat(stream=False, model_id=PROMPT)
        assert too_long.status == 400
    lines = [r.getMessage() for r in everything.records if r.name == "coordinator.requests"]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert json.loads(lines[0])["model"] == MODEL + "\n" + WORD + "00001"
    assert "model" not in json.loads(lines[1]) and len(lines[1]) < 300


def test_a_traceback_quoting_outside_text_cannot_forge_a_record():
    """The second line of defence: an exception quoting outside input, on a path nobody
    foresaw, is logged with its traceback; every line after the record's first is
    indented, and carriage returns and terminal escapes are escaped."""
    formatter = LineSafeFormatter("%(levelname)s %(name)s %(message)s")
    try:
        raise ValueError("bad frame" + FORGED + "\rCRITICAL again\x1b[2K")
    except ValueError:
        record = logging.LogRecord("coordinator.providers.edge", logging.ERROR, __file__, 1,
                                   "provider %s: frame handling failed", ("p",),
                                   sys.exc_info())
    first, *rest = formatter.format(record).split("\n")
    assert first == "ERROR coordinator.providers.edge provider p: frame handling failed"
    assert rest and all(line.startswith("    ") for line in rest)
    assert any(line.lstrip().startswith("2026-01-01") for line in rest)  # told, indented
    assert not any(c in line for line in rest for c in "\r\x1b")


@pytest.mark.parametrize(("main", "argv"), [(coordinator_cli.main, ["serve"]),
                                            (sim_cli.main, ["fleet", "--n", "1"])])
def test_the_command_lines_log_through_the_line_safe_formatter(monkeypatch, tmp_path, main,
                                                              argv):
    # The fleet locks its default key directory for the process's life: one of its own,
    # not the user's (where another fleet running on the machine holds the lock).
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    configured: dict = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: configured.update(kw))
    monkeypatch.setattr(trio, "run", lambda *args, **kwargs: None)  # configured, not run
    main(argv)
    [handler] = configured["handlers"]
    assert isinstance(handler.formatter, LineSafeFormatter)


async def test_the_simulator_logs_what_a_coordinator_sends_escaped(everything):
    """The simulator's side of the rule: a frame it cannot read and the reason it was
    closed with are outside text to it (a real loopback socket, bounded in time)."""
    async def coordinator(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()  # its register
        await ws.send_message(json.dumps({"type": HOSTILE}))
        await ws.aclose(1008, "refused:" + FORGED)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(
            trio_websocket.serve_websocket, coordinator, "127.0.0.1", 0, ssl_context=None))
        member = FleetMember(SimProvider("sim-0", (model(),)))
        with trio.fail_after(10):
            await fleet._keep_connected(member, [f"ws://127.0.0.1:{server.port}/"],
                                        reconnect=False)
        nursery.cancel_scope.cancel()
    said = [r for r in everything.records if r.name.startswith(("provider_sim", "provider_link"))]
    assert_safe(said, excerpt_above_debug=TYPE_EXCERPT)
    closed = [r.getMessage() for r in said if "closed the connection" in r.getMessage()]
    assert closed == ["sim-0: the coordinator closed the connection: 1008 refused:\\n2026-01-01 "
                      "00:00:00,000 CRITICAL coordinator.app FORGED-LINE\\n"]
    assert any("bad frame from the coordinator: unknown message type" in r.getMessage()
               for r in said)

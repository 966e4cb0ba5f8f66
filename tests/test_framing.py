"""The listener's HTTP/1 request framing (coordinator/api/framing.py), against h11 itself.

What the framing holds back must never be what h11 needs: wherever it stops passing
bytes, h11 fed exactly what passed is at that point — the last request whole and the
connection's end expected, or a chunked body waiting for the refused chunk.
"""

from __future__ import annotations

import itertools
import time

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.api.framing import RequestFraming, Stage

LIMIT = 10_000


def _frame(data: bytes, pieces: list[int] | None = None) -> tuple[RequestFraming, bytes]:
    """Feed ``data`` in pieces cut at ``pieces``; what passed, in order."""
    framing = RequestFraming(LIMIT)
    cuts = [0, *sorted(pieces or []), len(data)]
    passed = b""
    for start, end in itertools.pairwise(cuts):
        piece = data[start:end]
        if piece:
            passed += piece[:framing.feed(piece)]
    return framing, passed


class _Server:
    """h11 as hypercorn drives it: each request answered once its body is in."""

    def __init__(self, data: bytes) -> None:
        self.conn = h11.Connection(h11.SERVER)
        self.requests = 0
        self.ended = 0
        self.error: str | None = None
        self.body = 0
        self.both_lengths = False  # the last request: the coordinator answers 400, closes
        self.conn.receive_data(data)
        self._run()

    def _run(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.error = str(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.requests += 1
                names = {name for name, _ in event.headers}
                self.both_lengths = {b"content-length", b"transfer-encoding"} <= names
            elif isinstance(event, h11.Data):
                self.body += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.ended += 1
                self.conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                self.conn.send(h11.EndOfMessage())
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
            else:
                return


def _request(version: bytes = b"1.1", headers: tuple[bytes, ...] = (), body: bytes = b"",
             eol: bytes = b"\r\n") -> bytes:
    lines = [b"POST /v1/chat/completions HTTP/" + version, b"Host: x", *headers]
    return eol.join(lines) + eol + eol + body


def _chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailer + b"\r\n"


def _check_against_h11(data: bytes, pieces: list[int]) -> RequestFraming:
    framing, passed = _frame(data, pieces)
    if framing.stage is Stage.PASS:
        assert passed == data  # nothing held back once the framing is not followed
        return framing
    server = _Server(passed)
    if server.error is not None:
        # Input h11 refuses (the framing follows only framing): it refuses it whole too.
        assert _Server(data).error is not None
        return framing
    if framing.stage is Stage.ENDED:
        # The last request is whole and h11 expects the end of the connection (or, for
        # both lengths, the answer closes it): it needed nothing that was held back,
        # and saw nothing after it.
        assert server.requests == server.ended == framing.requests
        assert server.conn.their_state is h11.MUST_CLOSE or (
            server.both_lengths and server.conn.their_state is h11.IDLE)
        assert server.conn.trailing_data == (b"", False)
    elif framing.stage is Stage.REFUSED:
        assert server.requests == framing.requests == server.ended + 1
        assert server.conn.their_state is h11.SEND_BODY
        assert framing.refusal is not None and framing.refusal.status == 413
    else:
        assert passed == data
        assert server.requests == framing.requests
    return framing


# ---- the cases ----------------------------------------------------------------


def test_a_request_after_one_that_ends_its_connection_is_held_back():
    first = _request(b"1.0", (b"Connection: keep-alive", b"Content-Length: 2"), b"{}")
    data = first + _request(b"1.0", (b"Connection: keep-alive",))
    assert _Server(data).error == "Got data when expecting EOF"  # what hypercorn answered 400
    framing, passed = _frame(data)
    assert passed == first and framing.stage is Stage.ENDED
    assert _Server(passed).error is None
    _check_against_h11(data, [5, len(first) - 1, len(first) + 3])


@pytest.mark.parametrize("size", [b"f" * 20, b"00000000000000000000", b"%x" % (LIMIT + 1)])
def test_a_chunk_past_the_body_limit_is_refused_before_h11_reads_it(size):
    head = _request(headers=(b"Transfer-Encoding: chunked",))
    data = head + b"5\r\nhello\r\n" + size + b"\r\nabc"
    framing, passed = _frame(data)
    if size.strip(b"0"):
        assert framing.stage is Stage.REFUSED and passed == head + b"5\r\nhello\r\n"
    else:  # twenty zeros: the last chunk, however written ("abc" begins its trailer)
        assert framing.stage is Stage.TRAILER and passed == data
    _check_against_h11(data, [len(head) + 4, len(head) + 12])


def test_a_chunked_body_may_reach_the_limit_but_not_pass_it():
    head = _request(headers=(b"Transfer-Encoding: chunked",))
    exact = head + b"%x\r\n" % (LIMIT - 1) + b"a" * (LIMIT - 1) + b"\r\n1\r\nb\r\n0\r\n\r\n"
    assert _check_against_h11(exact, []).stage is Stage.HEAD
    over = head + b"%x\r\n" % LIMIT + b"a" * LIMIT + b"\r\n1\r\nb\r\n0\r\n\r\n"
    assert _check_against_h11(over, []).stage is Stage.REFUSED


def test_both_lengths_end_the_connection_after_the_chunked_body():
    # The smuggled request behind a body framed as chunked never reaches h11.
    data = _request(headers=(b"Content-Length: 40", b"Transfer-Encoding: chunked"),
                    body=b"0\r\n\r\n") + b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    framing, passed = _frame(data)
    assert framing.stage is Stage.ENDED and not passed.endswith(b"\r\nHost: x\r\n\r\n")
    _check_against_h11(data, [])


@pytest.mark.parametrize("head", [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",  # HTTP/2 with prior knowledge
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n\x00\x00\x00",
    b"GET / HTTP/1.0\r\nHost: x\r\n folded: v\r\n\r\nGET / HTTP/1.0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40,
])
def test_what_it_cannot_follow_it_passes_on_untouched(head):
    framing, passed = _frame(head * 2)
    assert passed == head * 2 and framing.stage in (Stage.PASS, Stage.HEAD)


def test_many_tiny_chunks_cost_a_pass_not_a_copy_each():
    head = _request(headers=(b"Transfer-Encoding: chunked",))
    body = b"1\r\na\r\n" * 9_000 + b"0\r\n\r\n"
    framing = RequestFraming(10**9)
    started = time.perf_counter()
    assert framing.feed(head + body) == len(head) + len(body)
    assert time.perf_counter() - started < 0.5  # quadratic: ~30 s
    assert framing.stage is Stage.HEAD


# ---- generated: well-formed and mutated streams, cut anywhere ------------------------


@st.composite
def _streams(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 4))):
        version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
        headers: list[bytes] = []
        connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, Close"]))
        if connection is not None:
            headers.append(b"Connection: " + connection)
        framing = draw(st.sampled_from(["none", "length", "chunked", "both", "empty"]))
        body = b""
        if framing in ("length", "empty"):
            body = b"" if framing == "empty" else draw(st.binary(max_size=40))
            headers.append(b"Content-Length: %d" % len(body))
        elif framing in ("chunked", "both"):
            chunks = draw(st.lists(st.binary(min_size=1, max_size=30), max_size=4))
            trailer = draw(st.sampled_from([b"", b"X-T: 1\r\n"]))
            body = _chunked(*chunks, trailer=trailer)
            if draw(st.booleans()):  # a chunk extension, or a chunk too large
                body = body.replace(b"\r\n", draw(st.sampled_from(
                    [b";ext=1\r\n", b" \r\n"])), 1) if chunks else body
            if draw(st.integers(0, 9)) == 0:
                body = b"%x\r\n" % (LIMIT + draw(st.integers(1, 10**6))) + b"abc"
            headers.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"Chunked"])))
            if framing == "both":
                headers.append(b"Content-Length: %d" % draw(st.integers(0, 99)))
        eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
        out += _request(version, tuple(headers), body, eol)
    if draw(st.booleans()):
        out = bytearray(out)
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(out) - 1))
            out[at:at + draw(st.integers(0, 2))] = draw(st.binary(max_size=3))
        out = bytes(out)
    return out


@settings(max_examples=300, deadline=None)
@given(data=_streams(), cuts=st.lists(st.integers(0, 400), max_size=4))
def test_framing_agrees_with_h11(data, cuts):
    _check_against_h11(data, [c for c in cuts if c < len(data)])

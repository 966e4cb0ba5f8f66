"""The HTTP/2 flow-control target of the fuzz campaign (issue 22, item 2).

A hostile h2c consumer on one or two connections to the real HTTP stack (hypercorn
over ``tests/memory_http.py``, the coordinator's edge and routes) and the
real coordinator (``tests/harness.py``, virtual time), whose simulated provider
answers each stream as the example says: small or large chunks, fast or slow,
errors before or after content, a stall after the role. The consumer is written
frame by frame (HPACK through ``hpack``), so it can do what a library would not:

* initial stream windows of 0, a few bytes or the usual 64 KiB, frame sizes from
  the smallest to the largest (and out of range), a connection window update at
  once;
* streams opened on any route, streamed or not (up to six a connection), their
  bodies in one or two DATA frames;
* WINDOW_UPDATEs for a stream or the connection, from one byte to the largest, of
  zero (a protocol error), past the window's limit, for streams never opened or
  already closed;
* RST_STREAM at any moment, PING (and unasked PING ACKs), SETTINGS changed in
  flight, GOAWAY, the TCP connection closed;
* pauses in virtual time, past ``write_timeout`` too, reading or not reading what
  the server writes (a socket buffer of 64 KiB or one that takes everything), and
  a consumer that gives back each byte it reads as window, or does not.

Each example ends by opening every window and reading to the end (``drain``), by
hanging up at once (``close``), or by leaving the connections alone until the
server has let go of everything (``abandon``).

Invariants, on top of the campaign's (nothing escaped, no ERROR record or traceback
from ``coordinator.*`` — hypercorn's error log is ``coordinator.http`` — no 500,
error bodies in their family's shape, the next chat completion succeeds, no lease,
queued entry or provider stream left):

* what the server wrote is well-formed HTTP/2, decoded with one HPACK decoder per
  connection from its first byte to its last: a header block that does not decode
  is a desynchronised table, every later answer on the connection unreadable;
* the bytes handed to hypercorn for a stream never run ahead of the window the
  consumer gave it by the bounded buffer's high-water mark or more (each message
  counted as it is handed over, ``BoundedStreamBuffer``: at most the mark and one
  message more in memory), and a streamed message is one SSE batch at most;
* no message waits on hypercorn longer than ``write_timeout`` (and a margin), a
  stream cut there has its slot released within the margin, and a connection
  that goes frees its requests' slots within it;
* with the windows opened and the consumer reading, every stream the consumer did
  not reset or break gets its whole, well-formed answer, or is cut by the server
  in a way the consumer sees (an RST_STREAM, or the connection closed because it
  stopped reading or broke the protocol); the server closes a connection only
  then, or once it is idle;
* the request log tells what happened: ``success`` only for an answer the server
  wrote to its end, ``consumer_stalled`` only for a stream whose message waited
  ``write_timeout`` for its window;
* once the consumer is gone, every connection is closed and out of the listener's
  table, and the provider was told to stop whatever it still served.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import hpack
import hypercorn.protocol.h2 as h2_protocol
import trio
from hypothesis import strategies as st

from coordinator.api.exchange import Edge
from coordinator.api.transport import ConsumerConnection
from provider_sim.behaviours import Behaviour, Fault

from .fuzz import (
    CHAT,
    COMPLETIONS,
    FUZZ_CONFIG,
    MESSAGES,
    RESPONSES,
    SIM_ID,
    InProcess,
    LogCatcher,
    Reply,
    Scenario,
    Seen,
    base_body,
    pick,
)
from .harness import API_KEY, MODEL, model, open_harness
from .memory_http import Connection, open_connection, socket_pair

WRITE_TIMEOUT = 30.0
# Virtual seconds within which what should happen at once does (a slot released, a
# cancel sent): the cancel's own bound is two seconds, but nothing here waits on it.
MARGIN = 1.0
SLOTS = 4  # the provider's: more streams than this queue
MAX_STREAMS = 6  # a connection
H2_CONFIG: dict[str, Any] = dict(
    write_timeout=WRITE_TIMEOUT, max_body_bytes=64 * 1024, max_frame_bytes=256 * 1024,
    request_buffer_bytes=512 * 1024, register_frame_bytes=16 * 1024,
    speculative_backup=False)
HIGH_WATER = h2_protocol.BUFFER_HIGH_WATER
# A streamed message is one SSE batch: the events the request's stream buffer held
# (``request_buffer_bytes`` of ciphertext), re-encoded, and the events held before the
# commit. Twice the buffer bounds it with room for the re-encoding.
MESSAGE_BOUND = 2 * H2_CONFIG["request_buffer_bytes"]
# A model per stream of an example, so each stream gets the provider behaviour drawn for it.
STREAM_MODELS = tuple(f"h{n}" for n in range(2 * MAX_STREAMS + 2))
ROUTES = (CHAT, CHAT, RESPONSES, MESSAGES, COMPLETIONS)
LARGEST_WINDOW = (1 << 31) - 1
WIDE_OPEN = 1 << 30  # the windows of the drain: room for every answer, and for replenishing
DEFAULT_WINDOW = 65_535
CLOSE_BUDGET = 60.0  # virtual seconds for the server to close a connection the consumer left

# Frame types and flags (RFC 9113).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, ENABLE_PUSH = 0x4, 0x5, 0x2
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame, as it is on the wire (nothing checked: a hostile end writes it)."""
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags))
            + (stream_id & 0x7FFFFFFF).to_bytes(4, "big") + payload)


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(key.to_bytes(2, "big") + value.to_bytes(4, "big")
                                          for key, value in values.items()))


def window_frame(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, (increment & 0x7FFFFFFF).to_bytes(4, "big"))


# =============================================================================
# Cases
# =============================================================================


@attrs.frozen
class Answer:
    """What the provider does with one stream's request (a :class:`Behaviour`, small to print)."""

    fault: Fault
    size: int  # bytes a token
    tokens: int
    first_token_delay: float
    token_interval: float
    after_chunks: int
    status: int

    def behaviour(self) -> Behaviour:
        word = "y" * max(1, self.size - 1)
        return Behaviour(fault=self.fault, status=self.status, after_chunks=self.after_chunks,
                         first_token_delay=self.first_token_delay,
                         token_interval=self.token_interval, tokens=self.tokens,
                         text=" ".join([word] * self.tokens))

    @property
    def duration(self) -> float:
        """Virtual seconds the provider may take over it (its stalls included)."""
        stall = 700.0 if self.fault in (Fault.STALL_AFTER_ROLE,) else 0.0
        return self.first_token_delay + self.tokens * self.token_interval + stall


@attrs.frozen
class Setup:
    """How one connection starts: the consumer's SETTINGS and socket."""

    initial_window: int
    max_frame: int | None  # None: not sent (16 KiB)
    connection_window: int  # a connection WINDOW_UPDATE right after the preface (0: none)
    capacity: int | None  # bytes the consumer's socket holds unread (None: any number)
    replenish: bool  # each DATA byte read is given back as window, as a library does


@attrs.frozen
class Open:
    """A new stream on connection ``conn``."""

    conn: int
    route: str
    stream: bool
    answer: Answer
    pieces: int  # the body in one DATA frame, or two


@attrs.frozen
class Window:
    """A WINDOW_UPDATE: for one of the connection's streams (``index``: which, in the
    order opened), the ``connection``, an ``idle`` stream (never opened) or a ``closed`` one."""

    conn: int
    target: str
    index: int
    increment: int


@attrs.frozen
class Reset:
    conn: int
    index: int
    code: int


@attrs.frozen
class Ping:
    conn: int
    ack: bool  # an ACK nobody asked for


@attrs.frozen
class Settings:
    conn: int
    initial_window: int | None
    max_frame: int | None


@attrs.frozen
class GoAway:
    conn: int
    code: int


@attrs.frozen
class Hangup:
    """The consumer closes the TCP connection."""

    conn: int


@attrs.frozen
class Pause:
    seconds: float


@attrs.frozen
class Reading:
    """The consumer reads its socket (``on``), or stops."""

    conn: int
    on: bool


Action = Open | Window | Reset | Ping | Settings | GoAway | Hangup | Pause | Reading


@attrs.frozen
class H2Case:
    setups: tuple[Setup, ...]
    actions: tuple[Action, ...]
    ending: str  # drain | close | abandon


windows = pick([0, 0, 1, 100, 16_384, DEFAULT_WINDOW, DEFAULT_WINDOW, 1 << 20, LARGEST_WINDOW])
frame_sizes = pick([None, None, 16_384, 16_777_215, 100_000])
bad_frame_sizes = pick([1_000, 1 << 24])
increments = pick([0, 1, 100, 16_384, DEFAULT_WINDOW, 1 << 20, 1 << 30, LARGEST_WINDOW])
window_targets = pick(["stream"] * 6 + ["connection"] * 3 + ["idle", "closed"])
mid_windows = pick([None, 0, 1, DEFAULT_WINDOW, 1 << 20, LARGEST_WINDOW])
error_codes = pick([0x0, 0x1, 0x2, 0x8, 0x8, 0xFFFF])  # none, protocol, internal, cancel, unknown
pauses = pick([0.0, 0.01, 1.0, 6.0, WRITE_TIMEOUT - 1, WRITE_TIMEOUT + 1, 2 * WRITE_TIMEOUT + 5,
               100.0])
faults = pick([Fault.HEALTHY] * 8 + [Fault.ERROR, Fault.ROLE_THEN_ERROR, Fault.ERROR_AFTER_CONTENT,
                                     Fault.ERROR_AFTER_CONTENT, Fault.STALL_AFTER_ROLE,
                                     Fault.ROLE_THEN_CLOSE])
ANSWER_BYTES = 160 * 1024  # at most, a stream


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    size = draw(pick([2, 2, 12, 300, 4_000, 16_000, 40_000]))
    tokens = max(1, min(draw(st.integers(1, 30)), ANSWER_BYTES // size))
    return Answer(draw(faults), size, tokens, draw(pick([0.0, 0.0, 0.0, 1.0, 40.0])),
                  draw(pick([0.0, 0.0, 0.0, 0.01, 0.5, 5.0, 40.0])),
                  draw(st.integers(0, tokens)), draw(pick([500, 500, 503, 400])))


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    # Now and then a frame size out of range (the connection's end).
    max_frame = draw(pick([None] * 9 + [16_384] * 3 + [16_777_215] * 3 + [100_000] * 4
                          + [1_000]))
    return Setup(draw(windows), max_frame, draw(pick([0, 0, 0, 1, DEFAULT_WINDOW, 1 << 30])),
                 draw(pick([None, None, 64 * 1024])), draw(st.booleans()))


# Weights (of 100) of the actions: mostly what a consumer does with its windows and
# streams; what ends a connection (GOAWAY, a bad frame size, a hang-up) is rarer, so
# most examples keep theirs to the end.
ACTION_WEIGHTS = (("open", 18), ("window", 24), ("pause", 18), ("reading", 9), ("reset", 9),
                  ("ping", 6), ("settings", 10), ("bad_settings", 2), ("goaway", 2),
                  ("hangup", 2))
action_kinds = st.sampled_from([kind for kind, weight in ACTION_WEIGHTS for _ in range(weight)])


@st.composite
def actions(draw: st.DrawFn, conns: int) -> Action:
    conn = draw(st.integers(0, conns - 1))
    index = draw(st.integers(0, MAX_STREAMS - 1))
    match draw(action_kinds):
        case "open":
            return Open(conn, draw(pick(list(ROUTES))), draw(pick([True, True, False])),
                        draw(answers()), draw(pick([1, 1, 1, 2])))
        case "window":
            return Window(conn, draw(window_targets), index, draw(increments))
        case "pause":
            return Pause(draw(pauses))
        case "reading":
            return Reading(conn, draw(st.booleans()))
        case "reset":
            return Reset(conn, index, draw(error_codes))
        case "ping":
            return Ping(conn, draw(pick([False, False, True])))
        case "settings":
            return Settings(conn, draw(mid_windows), draw(frame_sizes))
        case "bad_settings":
            return Settings(conn, None, draw(bad_frame_sizes))
        case "goaway":
            return GoAway(conn, draw(error_codes))
        case _:
            return Hangup(conn)


@st.composite
def h2_cases(draw: st.DrawFn) -> H2Case:
    conns = draw(pick([1, 1, 1, 2]))
    first = draw(st.builds(Open, st.just(0), pick(list(ROUTES)), st.booleans(), answers(),
                           st.just(1)))
    rest = draw(st.lists(actions(conns), max_size=14))
    return H2Case(tuple(draw(setups()) for _ in range(conns)), (first, *rest),
                  draw(pick(["drain", "drain", "drain", "close", "abandon"])))


# =============================================================================
# What the server wrote, decoded as a consumer decodes it
# =============================================================================


@attrs.define(eq=False)
class StreamOut:
    """One stream as the server wrote it."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    body: bytearray = attrs.field(factory=bytearray)
    flow: int = 0  # flow-controlled bytes (DATA payloads, padding included)
    ended_at: float | None = None  # END_STREAM
    reset_at: float | None = None  # RST_STREAM from the server
    reset_code: int | None = None

    @property
    def over(self) -> bool:
        return self.ended_at is not None or self.reset_at is not None

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@attrs.define(eq=False)
class ServerOutput:
    """Every byte the server wrote on one connection, parsed frame by frame with one HPACK
    decoder (as the consumer's library would): a block that does not decode means the
    server's and the consumer's header tables are out of step for good."""

    number: int
    opened: set[int] = attrs.field(factory=set)  # stream ids the consumer opened
    streams: dict[int, StreamOut] = attrs.field(factory=dict)
    problems: list[str] = attrs.field(factory=list)
    flow: int = 0  # connection-level flow-controlled bytes sent
    goaway: tuple[int, int] | None = None  # (last stream id, error code)
    closed_at: float | None = None  # the server closed its end
    activity: trio.Event = attrs.field(factory=trio.Event)
    settings_to_ack: int = 0
    _buffer: bytearray = attrs.field(factory=bytearray)
    _decoder: hpack.Decoder = attrs.field(factory=hpack.Decoder)
    _block: tuple[int, int, bytearray] | None = None  # (stream, flags of HEADERS, fragments)
    _started: bool = False

    def feed(self, data: bytes | None) -> None:
        if data is None:
            self.closed_at = trio.current_time()
        else:
            self._buffer += data
            self._parse()
        self.activity.set()
        self.activity = trio.Event()

    def _problem(self, text: str) -> None:
        self.problems.append(f"bad HTTP/2 from the server: connection {self.number}: it wrote {text}")

    def _parse(self) -> None:
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                return
            kind, flags = self._buffer[3], self._buffer[4]
            stream_id = int.from_bytes(self._buffer[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self._buffer[9:9 + length])
            del self._buffer[:9 + length]
            if not self._started and kind != SETTINGS:
                self._problem(f"a frame of type {kind} before its SETTINGS")
            self._started = True
            self._frame(kind, flags, stream_id, payload)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is not None and kind != CONTINUATION:
            self._problem(f"a frame of type {kind} inside a header block")
        match kind:
            case 0:  # DATA
                self._data(flags, stream_id, payload)
            case 1:  # HEADERS
                self._headers(flags, stream_id, payload)
            case 9:  # CONTINUATION
                if self._block is None or self._block[0] != stream_id:
                    self._problem("a CONTINUATION outside a header block")
                    return
                self._block[2].extend(payload)
                if flags & END_HEADERS:
                    block, self._block = self._block, None
                    self._decoded(block[0], block[1], bytes(block[2]))
            case 3:  # RST_STREAM
                out = self._stream(stream_id, "RST_STREAM")
                if out is not None and out.reset_at is None:
                    out.reset_at = trio.current_time()
                    out.reset_code = int.from_bytes(payload[:4], "big")
            case 4:  # SETTINGS
                if not flags & ACK:
                    self.settings_to_ack += 1
            case 7:  # GOAWAY
                self.goaway = (int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                               int.from_bytes(payload[4:8], "big"))
            case 5:  # PUSH_PROMISE (push is off)
                self._problem("a PUSH_PROMISE")
            case _:
                pass

    def _stream(self, stream_id: int, what: str) -> StreamOut | None:
        if stream_id not in self.opened:
            self._problem(f"{what} on stream {stream_id}, which the consumer never opened")
            return None
        return self.streams.setdefault(stream_id, StreamOut())

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self.flow += len(payload)
        out = self._stream(stream_id, "DATA")
        if out is None:
            return
        out.flow += len(payload)
        if out.over:
            self._problem(f"DATA on stream {stream_id} after its end")
        if out.status is None:
            self._problem(f"DATA on stream {stream_id} before its response head")
        if flags & PADDED and payload:
            payload = payload[1:len(payload) - payload[0]]
        out.body += payload
        if flags & END_STREAM:
            out.ended_at = trio.current_time()

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if flags & PADDED and payload:
            payload = payload[1:len(payload) - payload[0]]
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._decoded(stream_id, flags, payload)
        else:
            self._block = (stream_id, flags, bytearray(payload))

    def _decoded(self, stream_id: int, flags: int, block: bytes) -> None:
        try:
            headers = [(bytes(k), bytes(v)) for k, v in self._decoder.decode(block, raw=True)]
        except Exception as exc:  # hpack's errors, and what a garbled block trips
            self._problem(f"a header block on stream {stream_id} that does not decode (HPACK "
                          f"out of step: no later answer on the connection is readable): "
                          f"{type(exc).__name__}: {exc}")
            self._decoder = hpack.Decoder()
            return
        out = self._stream(stream_id, "HEADERS")
        if out is None:
            return
        if out.over:
            self._problem(f"HEADERS on stream {stream_id} after its end")
        status = dict(headers).get(b":status")
        if out.status is None:
            if status is None or not status.isdigit():
                self._problem(f"a response head without a status on stream {stream_id}: "
                              f"{headers!r:.300}")
                return
            out.status = int(status)
            out.headers = headers
        elif not flags & END_STREAM:
            self._problem(f"a second header block on stream {stream_id} that does not end it")
        if flags & END_STREAM:
            out.ended_at = trio.current_time()


# =============================================================================
# The hostile consumer's end of one connection
# =============================================================================


@attrs.define(eq=False)
class Consumer:
    number: int
    setup: Setup
    connection: Connection
    output: ServerOutput
    served: trio.Event  # the server has closed the connection and its handler ended
    encoder: hpack.Encoder = attrs.field(factory=hpack.Encoder)
    opened: list[int] = attrs.field(factory=list)
    routes: dict[int, tuple[str, bool]] = attrs.field(factory=dict)  # stream -> (route, streamed)
    next_id: int = 1
    initial: int = DEFAULT_WINDOW  # the stream window last announced
    most: int = DEFAULT_WINDOW  # the largest stream window ever announced
    given: dict[int, int] = attrs.field(factory=dict)  # stream -> WINDOW_UPDATE increments
    connection_given: int = 0
    resets: dict[int, float] = attrs.field(factory=dict)  # stream -> when the consumer reset it
    broken: dict[int, float] = attrs.field(factory=dict)  # streams it sent a bad WINDOW_UPDATE
    doomed_at: float | None = None  # it broke the protocol, sent GOAWAY or hung up
    why_doomed: str = ""
    hung_up_at: float | None = None
    reading: bool = True
    resume: trio.Event = attrs.field(factory=trio.Event)
    unread_since: float | None = None
    longest_unread: float = 0.0
    gone: bool = False  # a write failed: the server's end is closed
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    _incoming: bytearray = attrs.field(factory=bytearray)

    @property
    def stream(self) -> trio.abc.HalfCloseableStream:
        return self.connection.client

    async def send(self, data: bytes) -> None:
        if self.gone or self.hung_up_at is not None:
            return
        async with self._lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.gone = True

    def doom(self, why: str) -> None:
        if self.doomed_at is None:
            self.doomed_at = trio.current_time()
            self.why_doomed = why

    def credit(self, stream_id: int) -> int:
        """The most the server may have sent on ``stream_id`` (its window, ever)."""
        return self.most + self.given.get(stream_id, 0)

    def window(self, stream_id: int) -> int:
        """The stream's window as the server sees it, or more (the server may have sent
        bytes not yet seen here)."""
        out = self.output.streams.get(stream_id)
        return self.initial + self.given.get(stream_id, 0) - (out.flow if out else 0)

    def connection_window(self) -> int:
        return DEFAULT_WINDOW + self.connection_given - self.output.flow

    def live(self, stream_id: int) -> bool:
        """Whether the server should still serve ``stream_id`` (checks apply to it)."""
        out = self.output.streams.get(stream_id)
        return not (self.doomed_at is not None or stream_id in self.resets
                    or stream_id in self.broken or (out is not None and out.over)
                    or self.output.goaway is not None or self.output.closed_at is not None)

    # -- frames
    async def start(self) -> None:
        values = {ENABLE_PUSH: 0, INITIAL_WINDOW_SIZE: self.setup.initial_window}
        if self.setup.max_frame is not None:
            values[MAX_FRAME_SIZE] = self.setup.max_frame
        # The server reads these before any stream: no stream ever had the default window.
        self.most = 0
        self._announce(self.setup.initial_window, self.setup.max_frame)
        data = PREFACE + settings_frame(values)
        if self.setup.connection_window:
            data += window_frame(0, self.setup.connection_window)
            self._give_connection(self.setup.connection_window)
        await self.send(data)

    def _announce(self, initial: int | None, max_frame: int | None) -> None:
        if max_frame is not None and not 16_384 <= max_frame <= 16_777_215:
            self.doom(f"SETTINGS_MAX_FRAME_SIZE {max_frame}")
        if initial is None:
            return
        if initial > LARGEST_WINDOW:
            self.doom(f"SETTINGS_INITIAL_WINDOW_SIZE {initial}")
            return
        if any(self.window(s) + initial - self.initial > LARGEST_WINDOW for s in self.opened):
            self.doom("a SETTINGS_INITIAL_WINDOW_SIZE that overflows a stream's window")
        self.initial = initial
        self.most = max(self.most, initial)

    def _give_connection(self, increment: int) -> None:
        if increment == 0:
            self.doom("a connection WINDOW_UPDATE of 0")
        elif self.connection_window() + increment > LARGEST_WINDOW:
            self.doom("a connection WINDOW_UPDATE past 2^31-1")
        self.connection_given += increment

    async def open(self, route: str, stream: bool, model_id: str, pieces: int) -> int:
        stream_id = self.next_id
        self.next_id += 2
        self.opened.append(stream_id)
        self.output.opened.add(stream_id)
        self.routes[stream_id] = (route, stream)
        body = json.dumps(base_body(route, model_id, stream)).encode()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", route),
                   (":authority", "fuzz"), ("authorization", f"Bearer {API_KEY}"),
                   ("content-type", "application/json"), ("content-length", str(len(body))),
                   ("x-fuzz-stream", f"{self.number}:{stream_id}")]
        data = frame(HEADERS, END_HEADERS, stream_id, self.encoder.encode(headers))
        cut = len(body) // 2 if pieces == 2 else 0
        if pieces == 2:
            data += frame(DATA, 0, stream_id, body[:cut])
        data += frame(DATA, END_STREAM, stream_id, body[cut:])
        await self.send(data)
        return stream_id

    def pick(self, index: int) -> int | None:
        return self.opened[index % len(self.opened)] if self.opened else None

    async def window_update(self, target: str, index: int, increment: int) -> None:
        match target:
            case "connection":
                self._give_connection(increment)
                await self.send(window_frame(0, increment))
                return
            case "idle":
                stream_id: int | None = self.next_id + 2  # never opened
                self.doom("a WINDOW_UPDATE for a stream never opened")
            case "closed":
                stream_id = next((s for s in self.opened
                                  if (out := self.output.streams.get(s)) and out.over),
                                 self.pick(index))
            case _:
                stream_id = self.pick(index)
        if stream_id is None:
            return
        if increment == 0 or self.window(stream_id) + increment > LARGEST_WINDOW:
            self.broken.setdefault(stream_id, trio.current_time())
        self.given[stream_id] = self.given.get(stream_id, 0) + increment
        await self.send(window_frame(stream_id, increment))

    async def reset(self, index: int, code: int) -> None:
        stream_id = self.pick(index)
        if stream_id is None:
            return
        self.resets.setdefault(stream_id, trio.current_time())
        await self.send(frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big")))

    async def ping(self, ack: bool) -> None:
        await self.send(frame(PING, ACK if ack else 0, 0, b"fuzzping"))

    async def settings(self, initial: int | None, max_frame: int | None) -> None:
        values = {}
        if initial is not None:
            values[INITIAL_WINDOW_SIZE] = initial
        if max_frame is not None:
            values[MAX_FRAME_SIZE] = max_frame
        self._announce(initial, max_frame)
        await self.send(settings_frame(values))

    async def goaway(self, code: int) -> None:
        self.doom("GOAWAY")
        last = max(self.opened, default=0)
        await self.send(frame(GOAWAY, 0, 0, last.to_bytes(4, "big") + code.to_bytes(4, "big")))

    async def hang_up(self) -> None:
        if self.hung_up_at is None:
            self.doom("hung up")
            self.hung_up_at = trio.current_time()
            self.stop_reading()
            await self.stream.aclose()

    def stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.unread_since = trio.current_time()

    def start_reading(self) -> None:
        if not self.reading and self.hung_up_at is None:
            self.reading = True
            assert self.unread_since is not None
            self.longest_unread = max(self.longest_unread, trio.current_time() - self.unread_since)
            self.unread_since = None
            self.resume.set()
            self.resume = trio.Event()

    def unread_for(self) -> float:
        """The longest stretch the consumer did not read, so far."""
        now = trio.current_time()
        current = now - self.unread_since if self.unread_since is not None else 0.0
        return max(self.longest_unread, current)

    async def read(self) -> None:
        """Read as told, acknowledge the server's SETTINGS, give back what was read
        (``replenish``), as a consumer's library would."""
        while True:
            if not self.reading:
                await self.resume.wait()
                continue
            data = await self.stream.receive_some(65536)
            if not data:
                return
            self._incoming += data
            await self._react()

    async def _react(self) -> None:
        reply = b""
        while len(self._incoming) >= 9:
            length = int.from_bytes(self._incoming[:3], "big")
            if len(self._incoming) < 9 + length:
                break
            kind, flags = self._incoming[3], self._incoming[4]
            stream_id = int.from_bytes(self._incoming[5:9], "big") & 0x7FFFFFFF
            del self._incoming[:9 + length]
            if kind == SETTINGS and not flags & ACK:
                reply += frame(SETTINGS, ACK, 0)
            elif kind == DATA and length and self.setup.replenish:
                # What was read is given back (never past the largest window: a careful
                # library, not a hostile one).
                if self.window(stream_id) + length <= LARGEST_WINDOW:
                    self.given[stream_id] = self.given.get(stream_id, 0) + length
                    reply += window_frame(stream_id, length)
                if self.connection_window() + length <= LARGEST_WINDOW:
                    self.connection_given += length
                    reply += window_frame(0, length)
        if reply:
            await self.send(reply)


# =============================================================================
# The server side, recorded: what the application handed hypercorn, slots held
# =============================================================================


@attrs.define(eq=False)
class Handed:
    """One ASGI message the application handed hypercorn."""

    kind: str
    size: int
    start: float
    end: float | None = None
    outcome: str = "pending"  # ok, or the exception that ended the call


@attrs.define(eq=False)
class RecordedRequest:
    """One request as the application saw it, tagged with the consumer's stream."""

    conn: int
    stream_id: int
    started: float
    ended: float | None = None
    request_id: str | None = None
    streamed: bool = False
    handed: list[Handed] = attrs.field(factory=list)
    accepted: int = 0  # body bytes handed over
    largest: int = 0  # the largest body message
    problems: list[str] = attrs.field(factory=list)


def _tag(scope: dict[str, Any]) -> tuple[int, int] | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-fuzz-stream":
            conn, _, stream_id = value.partition(b":")
            return int(conn), int(stream_id)
    return None


@attrs.define(frozen=True)
class _RecordedEdge:
    """What ``open_connection`` serves: the coordinator's edge, each request recorded."""

    handle: Callable[[ConsumerConnection | None, dict[str, Any], Any, Any], Awaitable[None]]


@attrs.define(eq=False)
class H2World(InProcess):
    exchanges: dict[tuple[int, int], RecordedRequest] = attrs.field(factory=dict)
    # Lease id -> [granted, released] (virtual times), from every change of the table.
    leases: dict[str, list[float | None]] = attrs.field(factory=dict)
    requests: dict[str, dict[str, Any]] = attrs.field(factory=dict)  # the request log, by id
    consumers: dict[int, Consumer] = attrs.field(factory=dict)
    # Set and replaced when a recorded request ends or a lease comes or goes (after the
    # record is written: waiting on the registry's own event would race the record).
    moved: trio.Event = attrs.field(factory=trio.Event)

    def _touch(self) -> None:
        self.moved.set()
        self.moved = trio.Event()

    def recorded(self, edge: Edge) -> _RecordedEdge:
        """``edge`` with each tagged request's messages to hypercorn recorded and checked
        against the consumer's window as they are handed over."""
        async def handle(connection: ConsumerConnection | None, scope: dict[str, Any],
                         receive: Any, send: Any) -> None:
            tag = _tag(scope) if scope.get("type") == "http" else None
            if tag is None:
                await edge.handle(connection, scope, receive, send)
                return
            exchange = self.exchanges[tag] = RecordedRequest(*tag, trio.current_time())

            async def recorded_send(message: dict[str, Any]) -> None:
                kind = message.get("type", "")
                body = message.get("body", b"") if kind == "http.response.body" else b""
                if kind == "http.response.start":
                    headers = dict(message.get("headers", ()))
                    rid = headers.get(b"x-request-id")
                    exchange.request_id = rid.decode() if rid else None
                    exchange.streamed = headers.get(b"content-type", b"").startswith(
                        b"text/event-stream")
                if body:
                    self._check_bound(exchange, len(body))
                handed = Handed(kind, len(body), trio.current_time())
                exchange.handed.append(handed)
                exchange.accepted += len(body)
                exchange.largest = max(exchange.largest, len(body))
                try:
                    await send(message)
                    handed.outcome = "ok"
                except BaseException as exc:
                    handed.outcome = type(exc).__name__
                    raise
                finally:
                    handed.end = trio.current_time()

            try:
                await edge.handle(connection, scope, receive, recorded_send)
            finally:
                exchange.ended = trio.current_time()
                self._touch()

        return _RecordedEdge(handle)

    def _check_bound(self, exchange: RecordedRequest, size: int) -> None:
        consumer = self.consumers.get(exchange.conn)
        if consumer is None or not consumer.live(exchange.stream_id):
            return
        ahead = exchange.accepted - consumer.credit(exchange.stream_id)
        if ahead >= HIGH_WATER:
            exchange.problems.append(
                f"bytes beyond the window: {ahead} were handed to hypercorn for stream "
                f"{exchange.conn}:{exchange.stream_id} "
                f"beyond the {consumer.credit(exchange.stream_id)} its window ever allowed "
                f"(the buffer's bound is {HIGH_WATER} and one message) before a {size}-byte "
                "message")
        if exchange.streamed and size > MESSAGE_BOUND:
            exchange.problems.append(f"a message too large: a streamed message of {size} bytes for stream "
                                     f"{exchange.stream_id} (one SSE batch is at most "
                                     f"{MESSAGE_BOUND})")

    async def watch_leases(self) -> None:
        """Record when each lease is granted and released (every change of the table)."""
        held: set[str] = set()
        while True:
            changed = self.h.registry.changed
            now = trio.current_time()
            current = {rid for record in self.h.state.providers.values() for rid in record.leases}
            for rid in current - held:
                self.leases[rid] = [now, None]
            for rid in held - current:
                if rid in self.leases:
                    self.leases[rid][1] = now
            if held != current:
                self._touch()
            held = current
            await changed.wait()

    def leases_of(self, request_id: str) -> list[list[float | None]]:
        prefix = request_id + "."
        return [span for rid, span in self.leases.items() if rid.startswith(prefix)]

    async def quiescence(self) -> str | None:
        problem = await super().quiescence()
        if problem is not None:
            return problem
        left = []
        if self.h.coordinator.connections.open:
            left.append(f"{len(self.h.coordinator.connections.open)} connection(s) left in "
                        "the listener's table")
        if self.sim._active:
            left.append(f"p still serves {sorted(self.sim._active)} (never told to stop)")
        return f"not quiescent: {'; '.join(left)}" if left else None

    def forget_records(self) -> None:
        super().forget_records()
        self.exchanges.clear()
        self.leases = {rid: span for rid, span in self.leases.items() if span[1] is None}
        self.requests.clear()
        self.consumers.clear()


class _RequestLog(logging.Handler):
    def __init__(self, into: dict[str, dict[str, Any]]) -> None:
        super().__init__(logging.INFO)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(ValueError, TypeError):
            line = json.loads(record.getMessage())
            self.into[str(line.get("request_id"))] = line


def h2_world() -> Callable[[LogCatcher], Any]:
    @asynccontextmanager
    async def open_world(_: LogCatcher) -> AsyncIterator[H2World]:
        async with open_harness(**{**FUZZ_CONFIG, **H2_CONFIG}) as h:
            sim = await h.add_provider(SIM_ID, model(MODEL), *(model(m) for m in STREAM_MODELS),
                                       max_concurrency=SLOTS)
            world = H2World(h, sim)
            h.nursery.start_soon(world.watch_leases)
            requests = logging.getLogger("coordinator.requests")
            handler = _RequestLog(world.requests)
            requests.addHandler(handler)
            try:
                yield world
            finally:
                requests.removeHandler(handler)

    return open_world


# =============================================================================
# The scenario
# =============================================================================


@attrs.define(eq=False)
class Run:
    """One example: the consumer's connections, its actions, the ending, the verdict."""

    world: H2World
    case: H2Case
    consumers: list[Consumer] = attrs.field(factory=list)
    models: int = 0  # streams opened so far (each gets a model of its own)
    seen: list[Seen | str] = attrs.field(factory=list)
    started: float = attrs.field(factory=trio.current_time)

    async def play(self) -> list[Seen | str]:
        self.world.sim.model_behaviours.clear()
        self.world.consumers.clear()
        async with trio.open_nursery() as nursery:
            for number, setup in enumerate(self.case.setups):
                await self._connect(nursery, number, setup)
            for action in self.case.actions:
                await self._act(action)
            match self.case.ending:
                case "drain":
                    await self._drain()
                case "abandon":
                    await self._abandon()
                case _:
                    pass
            for consumer in self.consumers:
                await consumer.hang_up()
            with trio.move_on_after(CLOSE_BUDGET) as closing:
                for consumer in self.consumers:
                    await consumer.served.wait()
            if closing.cancelled_caught:
                self.seen.append(f"a connection outlived its consumer: still served "
                                 f"{CLOSE_BUDGET:g}s after the consumer hung up")
            nursery.cancel_scope.cancel()
        self._judge()
        return self.seen

    async def _connect(self, nursery: trio.Nursery, number: int, setup: Setup) -> None:
        output = ServerOutput(number)
        served = trio.Event()
        connection = await nursery.start(self._serve, number, setup, output, served)
        consumer = Consumer(number, setup, connection, output, served)
        self.consumers.append(consumer)
        self.world.consumers[number] = consumer
        nursery.start_soon(consumer.read)
        await consumer.start()

    async def _serve(self, number: int, setup: Setup, output: ServerOutput, served: trio.Event,
                     *, task_status: trio.TaskStatus[Connection]) -> None:
        h = self.world.h
        try:
            edge: Any = self.world.recorded(h.coordinator.http_edge)
            async with open_connection(
                    edge, h.coordinator.connections, write_timeout=WRITE_TIMEOUT,
                    pair=partial(socket_pair, setup.capacity, output.feed)) as connection:
                task_status.started(connection)
        finally:
            served.set()

    async def _act(self, action: Action) -> None:
        if isinstance(action, Pause):
            await trio.sleep(action.seconds)
            return
        consumer = self.consumers[action.conn]
        match action:
            case Open(_, route, stream, answer, pieces):
                model_id = STREAM_MODELS[self.models]
                self.models += 1
                self.world.sim.model_behaviours[model_id] = answer.behaviour()
                if len(consumer.opened) < MAX_STREAMS:
                    await consumer.open(route, stream, model_id, pieces)
            case Window(_, target, index, increment):
                await consumer.window_update(target, index, increment)
            case Reset(_, index, code):
                await consumer.reset(index, code)
            case Ping(_, ack):
                await consumer.ping(ack)
            case Settings(_, initial, max_frame):
                await consumer.settings(initial, max_frame)
            case GoAway(_, code):
                await consumer.goaway(code)
            case Hangup(_):
                await consumer.hang_up()
            case Reading(_, on):
                if on:
                    consumer.start_reading()
                else:
                    consumer.stop_reading()

    def _owed(self, consumer: Consumer) -> list[int]:
        """Streams whose answer the consumer may still expect."""
        return [s for s in consumer.opened if consumer.live(s)]

    async def _drain(self) -> None:
        """Every window opened wide, every socket read: each stream owed gets its end."""
        for consumer in self.consumers:
            if consumer.doomed_at is not None:
                continue
            consumer.start_reading()
            top = WIDE_OPEN - consumer.connection_window()
            if top > 0:
                await consumer.window_update("connection", 0, top)
            for stream_id in self._owed(consumer):
                top = WIDE_OPEN - consumer.window(stream_id)
                if top > 0:
                    consumer.given[stream_id] = consumer.given.get(stream_id, 0) + top
                    await consumer.send(window_frame(stream_id, top))
        budget = self._budget()
        with trio.move_on_after(budget):
            await self._until(lambda: not any(self._owed(c) for c in self.consumers))
            return
        for consumer in self.consumers:
            owed = self._owed(consumer)
            if owed:
                self.seen.append(
                    f"a stream never ended: connection {consumer.number}, stream(s) {owed}, not within "
                    f"{budget:g}s although every window was open and the consumer reading")

    async def _abandon(self) -> None:
        """The consumer does nothing more: the server lets go of everything by itself."""
        budget = self._budget()
        since = self.started

        def let_go() -> bool:
            return not any(e.ended is None for e in self.world.exchanges.values()) and not any(
                granted is not None and granted >= since and released is None
                for granted, released in self.world.leases.values())

        with trio.move_on_after(budget):
            await self._until(let_go)
            return
        running = sorted(k for k, e in self.world.exchanges.items() if e.ended is None)
        self.seen.append(f"an abandoned request never ended: the consumer left its connections "
                         f"alone, and {budget:g}s later the server still ran streams {running}")

    def _budget(self) -> float:
        """Virtual seconds every answer of the example may take, queueing and stalls included."""
        config = self.world.h.coordinator.config
        slowest = sum(a.answer.duration for a in self.case.actions if isinstance(a, Open))
        return (slowest + config.queue_timeout + config.idle_timeout
                + config.max_attempts * config.preamble_timeout + 6 * WRITE_TIMEOUT + 60.0)

    async def _until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            events = [self.world.moved, self.world.sim.activity,
                      *(c.output.activity for c in self.consumers)]
            async with trio.open_nursery() as nursery:
                for event in events:
                    nursery.start_soon(_cancel_when, event, nursery.cancel_scope)

    # -- the verdict
    def _judge(self) -> None:
        for consumer in self.consumers:
            self.seen.extend(consumer.output.problems)
            self._judge_connection(consumer)
            for stream_id in consumer.opened:
                self._judge_stream(consumer, stream_id)

    def _judge_connection(self, consumer: Consumer) -> None:
        output = consumer.output
        closed = output.closed_at
        if closed is None:
            return
        # The server closed the connection: because the consumer broke the protocol,
        # went, or stopped reading; or because it was idle.
        exchanges = [e for e in self.world.exchanges.values() if e.conn == consumer.number]
        busy = [e.stream_id for e in exchanges if e.ended is None or e.ended > closed]
        if busy and consumer.doomed_at is None and consumer.unread_for() < WRITE_TIMEOUT:
            self.seen.append(f"a busy connection closed: connection {consumer.number}, closed by "
                             f"the server at {closed:.2f} while streams {busy} were still served")
        # A connection that goes frees its requests' slots at once.
        gone = min(t for t in (closed, consumer.hung_up_at) if t is not None)
        for exchange in exchanges:
            if exchange.request_id is None:
                continue
            for granted, released in self.world.leases_of(exchange.request_id):
                assert granted is not None
                if granted <= gone and (released is None or released > gone + MARGIN):
                    self.seen.append(
                        f"a slot outlived its connection: connection {consumer.number} stream "
                        f"{exchange.stream_id}'s slot was held until {released} though the "
                        f"connection went at {gone:.2f}")

    def _judge_stream(self, consumer: Consumer, stream_id: int) -> None:
        label = f"connection {consumer.number} stream {stream_id}"
        out = consumer.output.streams.get(stream_id, StreamOut())
        exchange = self.world.exchanges.get((consumer.number, stream_id))
        route, streamed = consumer.routes[stream_id]
        if out.ended_at is not None and out.status is not None:
            reply = Reply(out.status, out.headers, bytes(out.body))
            self.seen.append(Seen(label, route, "POST", reply))
            if out.status == 200:
                problem = _answer_problem(label, streamed, reply)
                if problem:
                    self.seen.append(problem)
        if exchange is None:
            return
        self.seen.extend(exchange.problems)
        for handed in exchange.handed:
            end = handed.end if handed.end is not None else trio.current_time()
            if end - handed.start > WRITE_TIMEOUT + MARGIN:
                self.seen.append(f"a message waited too long: {label}, a {handed.kind} message "
                                 "waited on hypercorn "
                                 f"{end - handed.start:.2f}s (write_timeout is "
                                 f"{WRITE_TIMEOUT:g}s), ended by {handed.outcome}")
        self._judge_end(consumer, stream_id, out, exchange, label)
        rid = exchange.request_id
        if rid is None:
            return
        logged = self.world.requests.get(rid, {}).get("result")
        cut = [h for h in exchange.handed if h.kind == "http.response.body" and h.end is not None
               and h.end - h.start >= WRITE_TIMEOUT - 0.001 and h.outcome != "ok"]
        # Every byte handed over was written (the END_STREAM flag after them may not be,
        # when the connection goes at that moment: as over HTTP/1, the answer had left).
        if logged == "success" and not (out.status == 200 and len(out.body) == exchange.accepted):
            self.seen.append(f"logged success, not delivered: {label}: the server wrote "
                             f"{len(out.body)} of the answer's {exchange.accepted} bytes (status "
                             f"{out.status}, reset {out.reset_code}, cut after write_timeout: "
                             f"{bool(cut)})")
        if logged == "consumer_stalled" and not cut:
            self.seen.append(f"logged consumer_stalled, not stalled: {label}: no message of it "
                             f"waited write_timeout for its window")
        for handed in cut:
            for granted, released in self.world.leases_of(rid):
                assert granted is not None
                limit = handed.start + WRITE_TIMEOUT + MARGIN
                if granted < handed.start and (released is None or released > limit):
                    self.seen.append(f"a slot outlived its cut: {label}, cut after waiting "
                                     f"write_timeout from {handed.start:.2f}, its slot was held "
                                     f"until {released}")

    def _judge_end(self, consumer: Consumer, stream_id: int, out: StreamOut,
                   exchange: RecordedRequest, label: str) -> None:
        """A request over on the server is over for the consumer too: its stream ended
        (END_STREAM) or reset, or the connection gone, at once — or within write_timeout
        when the consumer's socket was full (the server's write waits for it)."""
        if exchange.ended is None or out.ended_at is not None:
            return
        limit = exchange.ended + MARGIN + (WRITE_TIMEOUT if consumer.setup.capacity else 0.0)
        known = [out.reset_at, consumer.resets.get(stream_id), consumer.broken.get(stream_id),
                 consumer.doomed_at, consumer.output.closed_at]
        if any(t is not None and t <= limit for t in known):
            return
        self.seen.append(f"a stream left hanging: {label}: its request ended on the server at "
                         f"{exchange.ended:.2f} "
                         f"(status {out.status}, {len(out.body)} bytes written), but the stream "
                         "was neither ended nor reset: the consumer still waits for it "
                         f"(connection closed at {consumer.output.closed_at})")


def _answer_problem(label: str, streamed: bool, reply: Reply) -> str | None:
    body = reply.body.decode("utf-8", "replace")
    try:
        if not streamed:
            return None if isinstance(json.loads(body), dict) else \
                f"a malformed answer: {label}: a 200 whose body is not a JSON object: {body[:300]!r}"
        datas = ["\n".join(line[6:] for line in block.split("\n") if line.startswith("data: "))
                 for block in body.split("\n\n") if block.strip()]
        if not datas:
            return f"a malformed answer: {label}: a streamed 200 with no event"
        for data in datas:
            if data != "[DONE]":
                json.loads(data)
    except ValueError:
        return f"a malformed answer: {label}: a 200 that is not well formed: {body[:300]!r}"
    return None


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def h2_scenario(case: H2Case) -> Scenario:
    async def scenario(world: H2World) -> list[Seen | str]:
        return await Run(world, case).play()

    return scenario

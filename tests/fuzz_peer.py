"""The peer-link target of the fuzz campaign: a hostile instance at either end of a link.

Links between instances (coordinator/cluster/peer.py) are authenticated with the
cluster token, and a token holder is still only a peer. The target drives both ends
(in process, memory streams, virtual time), one direction per example:

* **Into this instance** (:class:`LinkCase`): a hostile instance opens a link (or
  two) to the real ``PeerServer``, says hello with the token and sends frames:
  relays for the simulated provider ``p`` (sealed requests it serves, seals that do
  not open, inner frames that are malformed, not requests or name another request,
  the id of a consumer's request in flight on ``p``, the same id on both links),
  relays for providers that do not exist, cancels (known, unknown, repeated),
  frames of the other direction, malformed JSON, wrong types, deep nesting, long
  strings, frames over the link's size limit, binary messages — with pauses that
  interleave them with ``p``'s answers, and links hung up midway.
* **Out of this instance** (:class:`FarCase`): a consumer request for a model only
  another instance's provider serves goes through the dispatcher and a real
  ``PeerLink`` (dialled over memory streams) to a hostile far instance, which
  answers the relay with scripted ``relayed`` and ``refused`` frames: content that
  really decrypts, hostile provider frames, frames for other requests, refusals,
  malformed and oversized frames, silence, a link closed or hung.

Invariants, on top of the campaign's (nothing escaped a handler, no ERROR record or
traceback, no 5xx but 502/503/504, error bodies in shape, the next chat completion
succeeds, no lease, queued entry or provider stream left):

* into: every frame the link gets back is well formed and belongs to a request
  relayed on that link; every relay not cancelled gets its answer while the link
  is open; a consumer's request in flight on ``p`` meanwhile succeeds whole; once
  the links close, their handlers end and no relay is left (``PeerServer.serving``,
  ``in_flight``), and ``p`` was told to stop whatever it was still doing;
* out: the consumer's request ends within its budgets with a well-formed answer;
  every frame this instance sent the far one is well formed; a request the far
  instance left unfinished on a link still open was cancelled over it; nothing is
  left on the link (``PeerLink.in_flight``).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing
import trio_websocket
from hypothesis import strategies as st

from coordinator import sizes
from coordinator.cluster.entries import ProviderEntry, record_of
from coordinator.cluster.peer import PeerLink, PeerServer, remote_connection
from coordinator.protocol import (
    FrameError,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceResponseChunk,
    ModelInfo,
    RequestCipher,
    decode_frame,
)
from coordinator.protocol.cluster import (
    PeerHello,
    Relay,
    RelayCancel,
    Relayed,
    RelayRefused,
    decode_peer_frame,
)
from coordinator.protocol.crypto import load_public_key
from coordinator.providers.connection import ProviderConnection
from coordinator.wsio import WholeWriteStream
from provider_sim.behaviours import Behaviour

from .fuzz import (
    CHAT,
    FUZZ_CONFIG,
    POST_ROUTES,
    SIM_ID,
    Frame,
    Incoming,
    InProcess,
    LogCatcher,
    Placeholder,
    Puppet,
    Rid,
    Scenario,
    Sealed,
    Seen,
    _real,
    base_body,
    content_event,
    dumps,
    healthy_events,
    hostile_floats,
    hostile_ints,
    hostile_text,
    hostile_values,
    pick,
    post,
    provider_frames,
    raw_frames,
    request_frames,
)
from .harness import MODEL, model, open_harness

CLUSTER_TOKEN = "fuzz-cluster"
FAR_INSTANCE = "far"  # the hostile instance this one links to
FAR_ID = "far-p"  # its provider, the only one serving FAR_MODEL
FAR_MODEL = "fm"
# Small sizes, so a frame over the link's limit costs a quarter of a megabyte, not sixteen.
PEER_CONFIG: dict[str, Any] = dict(
    cluster_token=CLUSTER_TOKEN, max_body_bytes=64 * 1024, max_frame_bytes=64 * 1024,
    register_frame_bytes=16 * 1024, request_buffer_bytes=128 * 1024)
LINK_LIMIT = sizes.peer_socket_limit(PEER_CONFIG["max_body_bytes"], PEER_CONFIG["max_frame_bytes"])
# Virtual seconds the relays of a link may take to answer (p answers in a few) and a
# closed link's handler to end.
DRAIN_BUDGET = 900.0
CLOSE_BUDGET = 60.0
TERMINAL = InferenceComplete | InferenceError
_STRANGER = Puppet()  # keys for placeholders in frames no provider's keys are owed


# =============================================================================
# Placeholders of link frames
# =============================================================================


@attrs.frozen
class Session(Placeholder):
    """``p``'s session number (``right``) or one it does not have (``wrong``)."""

    which: str


@attrs.frozen
class SealedBody(Placeholder):
    """An ``inference_request``'s ``encrypted_body`` for ``p``: a chat body sealed to its
    key (``stream``, ``plain``) or ciphertext that does not open (``junk``)."""

    which: str


@attrs.frozen
class Inner(Placeholder):
    """A frame carried inside a link frame as a JSON string (a relay's request, a relayed
    provider frame), rendered when it is sent."""

    frame: Frame


def _text(data: str | bytes) -> str:
    """A frame as the JSON string that carries it (bytes that are not UTF-8 escaped)."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogateescape")


# =============================================================================
# Strategies
# =============================================================================

PEER_TYPES = ["hello", "relay", "cancel", "relayed", "refused"]
# Request ids: a and b (the hostile instance's own), local (a consumer's request in
# flight on p), puppet and sim (the far instance's scripted and other request), stale
# (the far instance's request of the example before), unknown; then hostile ones.
link_rids = st.one_of(
    pick([Rid("a"), Rid("a"), Rid("b"), Rid("local"), Rid("unknown"), Rid("puppet"), Rid("sim"),
          Rid("stale")]),
    pick(["", "x" * 257, "x" * 100_000, "r\n.1", "é"]),
    hostile_text,
)
relay_rids = pick([Rid("a"), Rid("a"), Rid("b"), Rid("local"), Rid("unknown")])
provider_refs = pick([SIM_ID, SIM_ID, "nobody", FAR_ID, "", "p" * 257]) | hostile_text
sessions = pick([Session("right"), Session("right"), Session("wrong"), 0, -1, 2**63, 1.5,
                 "1"]) | hostile_ints
costs = pick([1.0, 0.0, 1e9, 1e10, -1.0]) | hostile_floats
LEASE_FIELDS = ["request_id", "provider_id", "session", "model", "shape", "version", "cost"]
lease_fields = st.sampled_from(LEASE_FIELDS)
sealed_bodies = pick([SealedBody("stream"), SealedBody("stream"), SealedBody("plain"),
                      SealedBody("junk")])
inner_kinds = pick(["valid"] * 5 + ["junk", "other_rid", "provider", "raw", "value"])


@st.composite
def leases(draw: st.DrawFn, rid: Any) -> dict[str, Any]:
    """A lease for ``p`` (mostly), with up to two fields made hostile or dropped."""
    lease: dict[str, Any] = {"request_id": rid, "provider_id": SIM_ID, "session": Session("right"),
                             "model": MODEL, "shape": "base", "version": "0.7.0",
                             "cost": 1.0}
    if draw(st.integers(0, 3)) == 0:
        lease["provider_id"] = draw(provider_refs)
    for _ in range(draw(st.integers(1, 2)) if draw(st.integers(0, 3)) == 0 else 0):
        field = draw(lease_fields)
        match draw(st.integers(0, 3)):
            case 0:
                lease.pop(field, None)
            case 1 if field == "session":
                lease[field] = draw(sessions)
            case 2 if field == "cost":
                lease[field] = draw(costs)
            case _:
                lease[field] = draw(hostile_values)
    return lease


def _request(rid: Any, body: Any) -> Frame:
    return Frame({"type": "inference_request", "request_id": rid, "encrypted_body": body})


def relay_to_p(rid: Any, inner_rid: Any = None, body: str = "stream") -> Frame:
    """A well-formed relay to p; its request named ``inner_rid`` (default: ``rid``)."""
    inner = Inner(_request(rid if inner_rid is None else inner_rid, SealedBody(body)))
    lease = {"request_id": rid, "provider_id": SIM_ID, "session": Session("right"),
             "model": MODEL, "shape": "base", "version": "0.7.0", "cost": 1.0}
    return Frame({"type": "relay", "lease": lease, "frame": inner})


BAD_HELLO = Frame({"type": "hello", "instance": "x", "token": "wrong"})


@functools.cache
@st.composite
def relay_frames(draw: st.DrawFn) -> Frame:
    """A relay: mostly a lease for p and a request sealed to it; the inner frame hostile at times."""
    rid = draw(relay_rids)
    match draw(inner_kinds):
        case "valid":
            inner: Any = Inner(_request(rid, draw(sealed_bodies)))
        case "junk":
            inner = Inner(_request(rid, SealedBody("junk")))
        case "other_rid":  # the inner request names another request than the lease
            inner = Inner(_request(draw(link_rids.filter(lambda r: r != rid)), draw(sealed_bodies)))
        case "provider":
            inner = Inner(draw(provider_frames()))
        case "raw":
            inner = Inner(draw(raw_frames()))
        case _:
            inner = draw(hostile_values)
    frame: dict[str, Any] = {"type": "relay", "lease": draw(leases(rid)), "frame": inner}
    if draw(st.integers(0, 7)) == 0:
        frame[draw(pick(["x", "lease", "frame", "type"]))] = draw(hostile_values)
    return Frame(frame, binary=draw(st.integers(0, 9)) == 0, ascii_only=draw(st.booleans()))


@functools.cache
@st.composite
def cancel_frames(draw: st.DrawFn) -> Frame:
    frame = {"type": "cancel", "provider_id": SIM_ID, "session": Session("right"),
             "request_id": draw(relay_rids) if draw(st.integers(0, 3)) else draw(link_rids)}
    if draw(st.integers(0, 5)) == 0:
        frame[draw(pick(["provider_id", "session", "request_id", "x"]))] = draw(hostile_values)
    return Frame(frame, binary=draw(st.integers(0, 9)) == 0)


peer_kinds = st.sampled_from(PEER_TYPES) | hostile_values
relayed_inner = st.one_of(st.builds(Inner, request_frames()), st.builds(Inner, provider_frames()),
                          hostile_values)
peer_frame_keys = pick(["x", "type", "request_id", "lease", "frame", "provider_id", "session",
                        "reason", "token"])


@functools.cache
@st.composite
def peer_frames(draw: st.DrawFn) -> Frame:
    """A frame shaped like a link message (either direction), with hostile field values."""
    kind = draw(peer_kinds)
    frame: dict[str, Any] = {"type": kind}
    match kind:
        case "hello":
            frame.update(instance=draw(pick(["x", "é", "a" * 300]) | hostile_text),
                         token=draw(pick([CLUSTER_TOKEN, "wrong", ""]) | hostile_values))
        case "relay":
            frame.update(lease=draw(leases(draw(link_rids))),
                         frame=draw(st.builds(Inner, raw_frames()) | hostile_values))
        case "cancel":
            frame.update(provider_id=draw(provider_refs), session=draw(sessions),
                         request_id=draw(link_rids))
        case "relayed":
            frame.update(provider_id=draw(provider_refs), frame=draw(relayed_inner))
        case "refused":
            frame.update(provider_id=draw(provider_refs), request_id=draw(link_rids),
                         reason=draw(pick(["full", "gone"]) | hostile_text))
        case _:
            pass
    for _ in range(draw(st.integers(0, 2))):
        key = draw(peer_frame_keys)
        if draw(st.booleans()):
            frame.pop(key, None)
        else:
            frame[key] = draw(hostile_values)
    return Frame(frame, binary=draw(st.integers(0, 9)) == 0, ascii_only=draw(st.booleans()))


# Frames past the link's size limit (the link closes) and just under it (one frame dropped).
_PAD = "x" * LINK_LIMIT
OVERSIZE = [
    Frame('{"type":"cancel","provider_id":"p","session":1,"request_id":"' + _PAD + '"}'),
    Frame(('{"type":"relayed","provider_id":"far-p","frame":"' + _PAD + '"}').encode(), binary=True),
    Frame('{"type":"refused","provider_id":"p","request_id":"r","reason":"'
          + _PAD[: LINK_LIMIT - 200] + '"}'),
]
oversize_frames = pick(OVERSIZE)
pauses = pick([0.0, 0.2, 1.0, 5.0])


@attrs.frozen
class Send:
    """Send ``frame`` on hostile link ``link`` (0 or 1; opened, or opened again, on use)."""

    link: int
    frame: Frame


@attrs.frozen
class Pause:
    seconds: float


@attrs.frozen
class Ping:
    """Ping on hostile link ``link`` without waiting for the pong (a ping that may meet
    the server's Close: trio-websocket's answer to it once ended the process)."""

    link: int


@attrs.frozen
class Hangup:
    """Close hostile link ``link``: ``close`` (the WebSocket handshake) or ``abort``."""

    link: int
    how: str


@attrs.frozen
class LinkCase:
    """A hostile instance's links into this one."""

    hello: Frame | None  # None: a hello with the token
    actions: tuple[Send | Pause | Ping | Hangup, ...]
    local_request: bool  # a consumer's streamed request to p, in flight meanwhile
    # How the links still open close at the end: close | abort once every relay has its
    # answer, or cut-close | cut-abort right after the last action, relays in flight.
    ending: str


# Mostly relays, cancels and pauses (what interleaves with p's answers), some of the rest.
link_action_kinds = pick(["relay"] * 5 + ["cancel"] * 2 + ["pause"] * 3
                         + ["peer", "raw", "hangup", "oversize", "ping"])
link_numbers = st.sampled_from([0, 0, 0, 1])
hangups = pick(["close", "abort"])
endings = pick(["close", "abort", "cut-close", "cut-abort"])


@st.composite
def link_actions(draw: st.DrawFn) -> Send | Pause | Ping | Hangup:
    kind = draw(link_action_kinds)
    match kind:
        case "pause":
            return Pause(draw(pauses))
        case "ping":
            return Ping(draw(link_numbers))
        case "hangup":
            return Hangup(draw(link_numbers), draw(hangups))
    frames = {"relay": relay_frames(), "cancel": cancel_frames(), "peer": peer_frames(),
              "raw": raw_frames(), "oversize": oversize_frames}
    return Send(draw(link_numbers), draw(frames[kind]))


hostile_hellos = st.one_of(
    pick([Frame({"type": "hello", "instance": "x", "token": "wrong"}),
          Frame({"type": "hello", "instance": "x", "token": CLUSTER_TOKEN + "\x00"}),
          Frame({"type": "hello", "instance": "x" * 300, "token": CLUSTER_TOKEN}),
          Frame({"type": "hello", "instance": "x", "token": CLUSTER_TOKEN, "x": "y" * 20_000})]),
    peer_frames(), raw_frames())


@st.composite
def link_cases(draw: st.DrawFn) -> LinkCase:
    hello = draw(hostile_hellos) if draw(st.integers(0, 19)) == 0 else None
    return LinkCase(hello, tuple(draw(st.lists(link_actions(), min_size=1, max_size=10))),
                    draw(st.booleans()), draw(endings))


@attrs.frozen
class Relays:
    """The far instance relays ``frame`` as its provider's (a ``relayed`` frame)."""

    frame: Frame


@attrs.frozen
class FarFrame:
    """The far instance sends ``frame`` on the link as it is."""

    frame: Frame


@attrs.frozen
class FarHang:
    """The far instance stops reading the link (pings go unanswered) for ``seconds``."""

    seconds: float


@attrs.frozen
class FarClose:
    """The far instance closes the link with ``code``; None: the socket just drops."""

    code: int | None


@attrs.frozen
class FarPing:
    """The far instance pings the link (without waiting for the pong)."""


FarAction = Relays | FarFrame | FarHang | FarClose | FarPing | Pause


@attrs.frozen
class FarCase:
    """A consumer request relayed to a hostile far instance, and how it answers."""

    endpoint: str
    stream: bool
    content_first: bool  # a real content chunk first (the request commits)
    actions: tuple[FarAction, ...]
    finale: str  # content_complete | complete | error | refused | silence | close
    second_request: bool  # a second consumer request to the far provider meanwhile
    serve_rest: bool  # the far instance serves every other request it gets, or ignores it


far_actions = st.one_of(
    st.builds(Relays, request_frames()),
    st.builds(Relays, request_frames()),
    st.builds(Relays, provider_frames()),
    st.builds(FarFrame, peer_frames()),
    st.builds(FarFrame, raw_frames() | oversize_frames),
    st.builds(Pause, pauses),
    st.builds(FarHang, pick([1.0, 3.0, 12.0])),
    st.builds(FarClose, pick([1000, 1008, 1011, None])),
    st.builds(FarPing),
)
far_finales = pick(["content_complete", "content_complete", "complete", "error", "refused",
                    "silence", "close"])


@st.composite
def far_cases(draw: st.DrawFn) -> FarCase:
    return FarCase(
        endpoint=draw(st.sampled_from(POST_ROUTES)), stream=draw(st.booleans()),
        content_first=draw(st.booleans()),
        actions=tuple(draw(st.lists(far_actions, max_size=4))), finale=draw(far_finales),
        second_request=draw(st.integers(0, 3)) == 0, serve_rest=draw(st.booleans()))


def peer_cases() -> st.SearchStrategy[LinkCase | FarCase]:
    return st.one_of(link_cases(), far_cases())


# =============================================================================
# The hostile instance's end of a link into this one
# =============================================================================


@attrs.define(eq=False)
class HostileLink:
    """A link into the PeerServer, as a hostile instance holds it; checks what comes back."""

    number: int
    ws: trio_websocket.WebSocketConnection
    stream: trio.abc.Stream
    relayed: dict[str, set[str]] = attrs.field(factory=dict)  # request id -> provider ids
    owed: set[str] = attrs.field(factory=set)  # relayed, not cancelled, not yet answered
    cancelled: set[str] = attrs.field(factory=set)
    problems: list[str] = attrs.field(factory=list)
    closed: trio.Event = attrs.field(factory=trio.Event)
    close_code: int | None = None
    hung_up: bool = False
    activity: trio.Event = attrs.field(factory=trio.Event)  # a frame came, or the link closed
    # In the order sent, (time, request id): relays, and cuts — a cancel naming one, or
    # the link closing (None). A relay cut short must tell its provider to stop.
    relays: list[tuple[float, str]] = attrs.field(factory=list)
    cuts: list[tuple[float, int, str | None]] = attrs.field(factory=list)  # with len(relays)

    async def send(self, data: str | bytes) -> None:
        self._note(data)
        with contextlib.suppress(trio_websocket.ConnectionClosed, trio.BrokenResourceError,
                                 trio.ClosedResourceError):
            await self.ws.send_message(data)

    def _note(self, data: str | bytes) -> None:
        """What the server will make of ``data`` (the same codec, the same limit)."""
        try:
            message = decode_peer_frame(data, max_bytes=LINK_LIMIT)
        except FrameError:
            return
        match message:
            case Relay(lease, _):
                self.relayed.setdefault(lease.request_id, set()).add(lease.provider_id)
                self.relays.append((trio.current_time(), lease.request_id))
                if lease.request_id not in self.cancelled:
                    self.owed.add(lease.request_id)
            case RelayCancel(request_id=request_id):
                # A cancel voids the answer owed: the relay may end silently, and a relay
                # of the same id right after it may meet the first still in the map.
                self.cancelled.add(request_id)
                self.owed.discard(request_id)
                self._cut(request_id)
            case _:
                pass

    async def read(self) -> None:
        while True:
            try:
                raw = await self.ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self.close_code = exc.reason.code if exc.reason else None
                self.closed.set()
                self._cut(None)
                self._touch()
                return
            self._check(raw)
            self._touch()

    def _cut(self, request_id: str | None) -> None:
        self.cuts.append((trio.current_time(), len(self.relays), request_id))

    def _touch(self) -> None:
        self.activity.set()
        self.activity = trio.Event()

    def _check(self, raw: str | bytes) -> None:
        where = f"link {self.number}"
        try:
            message = decode_peer_frame(raw, max_bytes=LINK_LIMIT)
        except FrameError as exc:
            self.problems.append(f"{where} got a malformed frame back ({exc}): {raw[:200]!r}")
            return
        match message:
            case Relayed(provider_id, frame):
                try:
                    event = decode_frame(frame, max_bytes=len(frame.encode()))
                except FrameError as exc:
                    self.problems.append(f"{where}: a relayed frame that is not one ({exc}): "
                                         f"{frame[:200]!r}")
                    return
                if not isinstance(event, InferenceAccepted | InferenceResponseChunk | TERMINAL):
                    self.problems.append(f"{where}: relayed a {type(event).__name__}")
                    return
                self._answer(event.request_id, provider_id, terminal=isinstance(event, TERMINAL))
            case RelayRefused(provider_id, request_id, _):
                self._answer(request_id, provider_id, terminal=True)
            case _:
                self.problems.append(f"{where} got a {type(message).__name__} frame")

    def _answer(self, request_id: str, provider_id: str, *, terminal: bool) -> None:
        if request_id not in self.relayed:
            self.problems.append(f"link {self.number} got a frame of request {request_id[:80]!r}, "
                                 "which it never relayed")
        elif provider_id not in self.relayed[request_id]:
            self.problems.append(f"link {self.number}: request {request_id[:80]!r} was relayed "
                                 f"to {sorted(self.relayed[request_id])!r:.200}, answered as "
                                 f"{provider_id[:80]!r}'s")
        if terminal:
            self.owed.discard(request_id)

    async def ping(self) -> None:
        with contextlib.suppress(trio_websocket.ConnectionClosed, ValueError):
            await self.ws.ping()

    async def hangup(self, how: str) -> None:
        self.hung_up = True
        self._cut(None)
        if how == "abort":
            await trio.aclose_forcefully(self.stream)
        else:
            with trio.move_on_after(5):
                await self.ws.aclose()

    @property
    def open(self) -> bool:
        return not (self.hung_up or self.closed.is_set())


# =============================================================================
# The hostile far instance this one links to
# =============================================================================


class Gate(trio.abc.Stream):
    """A stream that can stop reading for a while: a hung instance (its pongs stop too)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.opened = trio.Event()
        self.opened.set()

    def hang(self) -> None:
        if self.opened.is_set():
            self.opened = trio.Event()

    def resume(self) -> None:
        self.opened.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await self.opened.wait()
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self.opened.set()
        await self.inner.aclose()


@attrs.define(eq=False)
class FarLink:
    """One link dialled to the far instance (this instance opens a new one after a close)."""

    ws: trio_websocket.WebSocketConnection
    gate: Gate
    closed: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class FarRequest:
    incoming: Incoming
    link: FarLink
    terminal_sent: bool = False  # the far instance sent a terminal frame for it
    cancelled: bool = False  # this instance cancelled it over the link


@attrs.define(eq=False)
class FarInstance:
    """The hostile other end of this instance's ``PeerLink``: reads relays, answers as told.

    Its provider's keys are a :class:`Puppet`'s: it opens the sealed requests and seals
    answers that really decrypt."""

    provider: Puppet
    nursery: trio.Nursery
    link: FarLink | None = None
    requests: dict[str, FarRequest] = attrs.field(factory=dict)
    queue: list[FarRequest] = attrs.field(factory=list)
    arrived: trio.Event = attrs.field(factory=trio.Event)
    problems: list[str] = attrs.field(factory=list)

    async def dial(self, nursery: trio.Nursery, url: str, *, max_message_size: int,
                   write_timeout: float) -> trio_websocket.WebSocketConnection:
        """``PeerLink.dial``: a memory stream to a fresh far-side handler."""
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, Gate(server))
        return await trio_websocket.wrap_client_stream(
            nursery, WholeWriteStream(client, write_timeout), "far", "/",  # type: ignore[arg-type]
            max_message_size=max_message_size)

    async def _serve(self, gate: Gate) -> None:
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, gate,
                                                              max_message_size=LINK_LIMIT)
            link = FarLink(await request.accept(), gate)
            self.link = link
            try:
                await self._read(link)
            finally:
                link.closed.set()
                gate.resume()
                nursery.cancel_scope.deadline = trio.current_time() + 10

    async def _read(self, link: FarLink) -> None:
        first = True
        while True:
            try:
                raw = await link.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            try:
                message = decode_peer_frame(raw, max_bytes=LINK_LIMIT)
            except FrameError as exc:
                self.problems.append(f"this instance sent the far one a malformed frame ({exc}): "
                                     f"{raw[:200]!r}")
                continue
            if first != isinstance(message, PeerHello):
                self.problems.append(f"this instance's link began with {message!r}, not its hello")
            first = False
            match message:
                case PeerHello(_, token) if token != CLUSTER_TOKEN:
                    self.problems.append("this instance said hello without its cluster token")
                case Relay(lease, frame):
                    self._arrive(link, lease.request_id, frame)
                case RelayCancel(request_id=request_id):
                    if request_id in self.requests:
                        self.requests[request_id].cancelled = True
                case PeerHello():
                    pass
                case _:
                    self.problems.append(f"this instance sent the far one a {type(message).__name__}")

    def _arrive(self, link: FarLink, request_id: str, frame: str) -> None:
        try:
            incoming = self.provider._open(json.loads(frame))
        except (ValueError, KeyError, TypeError):
            self.problems.append(f"this instance relayed a request that is not one: {frame[:200]!r}")
            return
        if incoming.request_id != request_id:
            self.problems.append(f"a relay's lease says {request_id!r}, its request "
                                 f"{incoming.request_id!r}")
        request = FarRequest(incoming, link)
        self.requests[request_id] = request
        self.queue.append(request)
        self.arrived.set()
        self.arrived = trio.Event()

    async def next_request(self, budget: float) -> FarRequest | None:
        with trio.move_on_after(budget):
            while not self.queue:
                await self.arrived.wait()
            return self.queue.pop(0)
        return None

    async def send(self, data: str | bytes) -> None:
        """Send on the current link (frames for a closed link go nowhere, as on a network)."""
        link = self.link
        if link is None or link.closed.is_set():
            return
        self._note(data)
        with contextlib.suppress(trio_websocket.ConnectionClosed, trio.BrokenResourceError,
                                 trio.ClosedResourceError):
            await link.ws.send_message(data)

    def _note(self, data: str | bytes) -> None:
        """Which request a frame ends, as this instance will read it."""
        try:
            message = decode_peer_frame(data, max_bytes=LINK_LIMIT)
        except FrameError:
            return
        match message:
            case RelayRefused(request_id=request_id) if request_id in self.requests:
                self.requests[request_id].terminal_sent = True
            case Relayed(frame=frame):
                try:
                    event = decode_frame(frame, max_bytes=len(frame))
                except FrameError:
                    return
                if isinstance(event, TERMINAL) and event.request_id in self.requests:
                    self.requests[event.request_id].terminal_sent = True
            case _:
                pass

    async def relay(self, frame: str) -> None:
        await self.send(dumps({"type": "relayed", "provider_id": FAR_ID, "frame": frame}))

    async def serve(self, request: FarRequest) -> None:
        """Answer ``request`` as a healthy provider behind a healthy instance would."""
        incoming = request.incoming
        if incoming.sealer is None:
            await self.relay(dumps({"type": "inference_error", "request_id": incoming.request_id,
                                    "error": "request did not decrypt", "status_code": 400}))
            return
        for text in healthy_events(incoming):
            await self.chunk(incoming, text)
        await self.complete(incoming)

    async def chunk(self, incoming: Incoming, text: str) -> None:
        await self.relay(dumps({"type": "inference_response_chunk", "request_id": incoming.request_id,
                                "encrypted_data": self.provider.seal(incoming, text)}))

    async def complete(self, incoming: Incoming) -> None:
        await self.relay(dumps({"type": "inference_complete", "request_id": incoming.request_id,
                                "usage": {"prompt_tokens": 3, "completion_tokens": 2}}))

    async def close(self, code: int | None) -> None:
        link = self.link
        if link is None or link.closed.is_set():
            return
        if code is None:
            await trio.aclose_forcefully(link.gate)
        else:
            with trio.move_on_after(5):
                await link.ws.aclose(code, "fuzz")

    def ping(self) -> None:
        link = self.link
        if link is not None and not link.closed.is_set():
            self.nursery.start_soon(self._ping, link)

    @staticmethod
    async def _ping(link: FarLink) -> None:
        with trio.move_on_after(60), contextlib.suppress(trio_websocket.ConnectionClosed,
                                                         ValueError):
            await link.ws.ping()

    async def hang(self, seconds: float) -> None:
        link = self.link
        if link is None:
            return
        link.gate.hang()
        try:
            await trio.sleep(seconds)
        finally:
            link.gate.resume()

    def forget(self) -> None:
        """Between examples: the requests of the one before are done with."""
        self.requests.clear()
        self.queue.clear()
        self.problems.clear()


# =============================================================================
# The world: the in-process coordinator, its peer server, a link to a far instance
# =============================================================================


@attrs.define(eq=False)
class PeerWorld(InProcess):
    peers: PeerServer | None = None
    far: FarInstance | None = None
    link: PeerLink | None = None
    remote: ProviderConnection | None = None
    examples: int = 0
    last_far_rid: str | None = None
    handler_ended: trio.Event = attrs.field(factory=trio.Event)  # a link's handler returned

    @property
    def config(self) -> Any:
        return self.h.coordinator.config

    async def until(self, predicate: Callable[[], bool], links: list[HostileLink]) -> None:
        """Wait until ``predicate()`` holds, checking it again whenever something moved:
        the registry (a slot reserved or released), p, a hostile link, a link handler."""
        while not predicate():
            events = [self.h.registry.changed, self.sim.activity, self.handler_ended,
                      *(link.activity for link in links)]
            async with trio.open_nursery() as nursery:
                for event in events:
                    nursery.start_soon(_cancel_when, event, nursery.cancel_scope)

    async def open_link(self, number: int, nursery: trio.Nursery) -> HostileLink:
        """A hostile instance's link into the peer server (its end's reader in ``nursery``)."""
        client, server = trio.testing.memory_stream_pair()
        self.h.nursery.start_soon(self._serve_link, server)
        ws = await trio_websocket.wrap_client_stream(nursery, client, "fuzz", "/",
                                                     max_message_size=4 * LINK_LIMIT)
        link = HostileLink(number, ws, client)
        nursery.start_soon(link.read)
        return link

    async def _serve_link(self, stream: trio.abc.Stream) -> None:
        """The server's end, as serve() wraps it: whole writes, small frames until hello."""
        assert self.peers is not None
        try:
            async with trio.open_nursery() as nursery:
                request = await trio_websocket.wrap_server_stream(
                    nursery, WholeWriteStream(stream, self.config.write_timeout),  # type: ignore[arg-type]
                    max_message_size=self.config.register_frame_bytes)
                await self.peers.handle(request)
                nursery.cancel_scope.deadline = trio.current_time() + 10
        except BaseException as exc:  # recorded: in production it would end the server
            if _real(exc):
                self.edge_errors.append(exc)
            else:
                raise
        finally:
            self.handler_ended.set()
            self.handler_ended = trio.Event()

    async def quiescence(self) -> str | None:
        problem = await super().quiescence()
        if problem is not None:
            return problem
        assert self.peers is not None and self.link is not None and self.remote is not None
        left = []
        if self.peers.serving:
            left.append(f"{len(self.peers.serving)} closed link(s) still served")
        if self.peers.in_flight:
            left.append(f"{self.peers.in_flight} relay(s) left in a link's map")
        if self.link.in_flight:
            left.append(f"{self.link.in_flight} request(s) left on the link to the far instance")
        for connection in self.h.coordinator.dispatcher.directory.live():
            if connection._ended:
                left.append(f"{connection.provider_id} keeps why {len(connection._ended)} "
                            "stream(s) ended")
        if self.sim._active:
            left.append(f"p still serves {sorted(self.sim._active)} (never told to stop)")
        return f"not quiescent: {'; '.join(left)}" if left else None

    def forget_records(self) -> None:
        super().forget_records()
        assert self.far is not None
        self.far.forget()


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def peer_world() -> Callable[[LogCatcher], Any]:
    @asynccontextmanager
    async def open_world(_: LogCatcher) -> AsyncIterator[PeerWorld]:
        async with open_harness(**{**FUZZ_CONFIG, **PEER_CONFIG}) as h:
            # p answers a token every half second, so relays interleave with other frames.
            sim = await h.add_provider(SIM_ID, model(MODEL),
                                       behaviour=Behaviour(token_interval=0.5))
            config = h.coordinator.config
            directory = h.coordinator.dispatcher.directory
            world = PeerWorld(h, sim, peers=PeerServer(config, h.registry, directory))
            far = world.far = FarInstance(Puppet(), h.nursery)
            link = world.link = PeerLink(FAR_INSTANCE, "ws://far.invalid/", "fuzz", CLUSTER_TOKEN,
                                         config, dial=far.dial)
            await h.nursery.start(link.run)
            # As RedisShared mirrors another instance's page (cluster/shared.py).
            entry = ProviderEntry(FAR_ID, 1, "0.7.0", "FuzzMac", (ModelInfo(FAR_MODEL, size_bytes=1024),),
                                  64.0, 200.0, 2000.0, 8, 0, far.provider.public_key, "", True,
                                  1 << 20)
            record = record_of(entry, FAR_INSTANCE)

            async def lease_of(request_id: str) -> Any:
                return await h.registry.lease_of(FAR_ID, request_id)

            world.remote = remote_connection(record, link, config, lease_of)
            directory.add(world.remote)
            await h.registry.mirror(FAR_INSTANCE, [record])
            if not await world.wait_providers(lambda ids: FAR_ID in ids):
                raise RuntimeError("the far provider was not mirrored")
            yield world

    return open_world


# =============================================================================
# Scenarios
# =============================================================================


def _sse_data(body: bytes) -> list[str]:
    out = []
    for block in body.decode("utf-8", "replace").split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            out.append("\n".join(data))
    return out


def answer_problem(label: str, stream: bool, seen: Seen) -> str | None:
    """Why a 200 is not a well-formed answer (errors are checked by the campaign)."""
    reply = seen.reply
    if reply.status != 200:
        return None
    try:
        if not stream:
            if not isinstance(json.loads(reply.body), dict):
                return f"{label}: a 200 whose body is not a JSON object: {reply.body[:300]!r}"
            return None
        # A clean close before any content is a valid empty answer (dispatch/race.py):
        # a stream may hold its terminator only.
        for data in _sse_data(reply.body):
            if data != "[DONE]":
                json.loads(data)
        if not reply.body:
            return f"{label}: a streamed 200 with nothing in it"
    except ValueError:
        return f"{label}: a 200 that is not well formed: {reply.body[:300]!r}"
    return None


def local_problem(seen: Seen) -> str | None:
    """Why the consumer's request to p did not succeed whole (it is no link's request)."""
    reply = seen.reply
    if reply.status != 200:
        return f"{seen.label}: {reply.status} (a request no link had any part in)"
    try:
        events = [json.loads(d) for d in _sse_data(reply.body) if d != "[DONE]"]
    except ValueError:
        return f"{seen.label}: not well formed: {reply.body[:300]!r}"
    text = "".join(str(((c.get("delta") or {}).get("content")) or "")
                   for e in events for c in (e.get("choices") or ()) if isinstance(c, dict))
    if any("error" in e for e in events) or not text or _sse_data(reply.body)[-1:] != ["[DONE]"]:
        return f"{seen.label}: did not succeed whole: {reply.body[-300:]!r}"
    return None


def link_scenario(case: LinkCase) -> Scenario:
    async def scenario(world: PeerWorld) -> list[Seen | str]:
        world.examples += 1
        tag = f"hx{world.examples}"
        seen: list[Seen | str] = []
        sim, peers = world.sim, world.peers
        assert peers is not None
        local_rid = "no-such-request.1"
        links: dict[int, HostileLink] = {}
        every: list[HostileLink] = []

        def resolve(value: Any) -> Any:
            match value:
                case Rid("a" | "b" as which):
                    return f"{tag}{which}.1"
                case Rid("local"):
                    return local_rid
                case Rid(_):
                    return "no-such-request.1"
                case Session(which):
                    record = world.h.registry._state_for_tests.providers.get(SIM_ID)
                    session = record.session if record is not None else 1
                    return session if which == "right" else session + 1
                case SealedBody("junk"):
                    return {"ephemeral_public_key": sim.public_key, "ciphertext": "AAAA" * 12}
                case SealedBody(which):
                    body = {**base_body(CHAT, MODEL, which == "stream"), "endpoint": CHAT}
                    sealed = RequestCipher(load_public_key(sim.public_key)).seal_body(
                        json.dumps(body).encode())
                    return {"ephemeral_public_key": sealed.ephemeral_public_key,
                            "ciphertext": sealed.ciphertext}
                case Inner(frame):
                    return _text(frame.render(resolve))
            return _STRANGER.resolve(value)

        async def consume() -> None:
            request = post(CHAT, {**base_body(CHAT), "stream": True})
            with trio.move_on_after(DRAIN_BUDGET):
                answer = await world.request(request, "a streamed chat to p beside the links")
                seen.append(answer)
                problem = local_problem(answer)
                if problem:
                    seen.append(problem)
                return
            seen.append(f"a streamed chat to p beside the links: no answer in {DRAIN_BUDGET:g}s")

        async def link(number: int, nursery: trio.Nursery) -> HostileLink:
            current = links.get(number)
            if current is None or not current.open:
                current = links[number] = await world.open_link(number, nursery)
                every.append(current)
                hello = case.hello or Frame({"type": "hello", "instance": "hostile",
                                             "token": CLUSTER_TOKEN})
                await current.send(hello.render(resolve))
            return current

        async with trio.open_nursery() as beside:
            if case.local_request:
                received = len([e for e in sim.log if e[1] == "received"])
                beside.start_soon(consume)
                with trio.move_on_after(30):
                    while len(news := [e for e in sim.log if e[1] == "received"]) <= received:
                        await sim.activity.wait()
                    local_rid = news[received][2]
            async with trio.open_nursery() as wire:  # the hostile ends' readers
                for action in case.actions:
                    match action:
                        case Send(number, frame):
                            await (await link(number, wire)).send(frame.render(resolve))
                        case Pause(seconds):
                            await trio.sleep(seconds)
                        case Ping(number):
                            wire.start_soon((await link(number, wire)).ping)
                        case Hangup(number, how):
                            if number in links and links[number].open:
                                await links[number].hangup(how)
                how = case.ending.removeprefix("cut-")
                if case.ending.startswith("cut-"):
                    for hostile in every:
                        if hostile.open:
                            await hostile.hangup(how)
                seen.extend(await _drain(world, every))
                if case.hello is not None:
                    seen.extend(await _refused(case.hello, every, resolve, world.config))
                for hostile in every:
                    if hostile.open:
                        await hostile.hangup(how)
                with trio.move_on_after(CLOSE_BUDGET) as closing:
                    await world.until(lambda: not (peers.serving or peers.pending), every)
                if closing.cancelled_caught:
                    seen.append(f"{len(peers.serving)} link handler(s) still running "
                                f"{CLOSE_BUDGET:g}s after their links closed")
                wire.cancel_scope.cancel()
        for hostile in every:
            seen.extend(hostile.problems)
        await trio.testing.wait_all_tasks_blocked()  # p reads the cancels sent at the cut
        seen.extend(_left_serving(sim.log, every, local_rid))
        return seen

    return scenario


# p answers a token every half second: a cancel reaches it well before its next one.
CANCEL_WINDOW = 0.25


def _cuts(relays: list[tuple[float, str]], cut: float, sent: int, rid: str) -> bool:
    """Whether a cut after ``sent`` relays surely cuts a relay of ``rid`` that p may hold:
    one was sent before it, and none at the same virtual instant after it (p's log cannot
    tell which of the two it got)."""
    before = any(r == rid for _, r in relays[:sent])
    return before and not any(r == rid and t == cut for t, r in relays[sent:])


def _left_serving(log: list[tuple[float, str, str]], links: list[HostileLink],
                  local: str) -> list[str]:
    """Relays cut short (a cancel, a closed link) while p served them: p was told to stop.

    p's log holds (time, what, request id) for this example: received, cancel, complete,
    error. A request p had before its relay was cut, and had not finished, must show a
    cancel at the cut."""
    problems = []
    for link in links:
        for rid in link.relayed:
            if rid == local or any(rid in other.relayed for other in links if other is not link):
                continue  # a consumer's request, or one whose link is ambiguous
            notes = [(t, what) for t, what, r in log if r == rid]
            for cut, sent, which in link.cuts:
                if which not in (None, rid) or not _cuts(link.relays, cut, sent, rid):
                    continue
                served = [t for t, what in notes if what == "received" and t <= cut]
                if not served or any(what in ("complete", "error", "cancel", "closed")
                                     and served[-1] <= t <= cut for t, what in notes):
                    continue  # not in p's hands at the cut
                if not any(what == "cancel" and cut <= t <= cut + CANCEL_WINDOW
                           for t, what in notes):
                    problems.append(f"link {link.number}: the relay of {rid!r:.80} was cut at "
                                    f"{cut:.2f} while p served it, and p was never told to stop")
                    break
    return problems


async def _drain(world: PeerWorld, links: list[HostileLink]) -> list[str]:
    """Every relay owed an answer gets it while its link is open, and no relay is left."""
    peers = world.peers
    assert peers is not None
    with trio.move_on_after(DRAIN_BUDGET):
        await world.until(lambda: not (any(k.open and k.owed for k in links) or peers.in_flight),
                          links)
        return []
    owed = {k.number: sorted(k.owed) for k in links if k.open and k.owed}
    return [f"relays unanswered after {DRAIN_BUDGET:g}s on open links: {owed}; "
            f"{peers.in_flight} in the server's maps"]


async def _refused(hello: Frame, links: list[HostileLink], resolve: Any, config: Any) -> list[str]:
    """A link whose hello is not one with the token is closed: 1008 (or 1009, too big)."""
    try:
        message = decode_peer_frame(hello.render(resolve), max_bytes=config.register_frame_bytes)
    except FrameError:
        message = None
    if isinstance(message, PeerHello) and message.token == CLUSTER_TOKEN:
        return []
    problems = []
    for link in links:
        if link.hung_up:
            continue
        with trio.move_on_after(config.register_timeout + config.close_timeout + 5):
            await link.closed.wait()
        if link.close_code not in (1008, 1009):
            problems.append(f"link {link.number} said hello with {hello!r} and was not refused "
                            f"(closed: {link.closed.is_set()}, code {link.close_code})")
    return problems


def far_scenario(case: FarCase) -> Scenario:
    async def scenario(world: PeerWorld) -> list[Seen | str]:
        far, link = world.far, world.link
        assert far is not None and link is not None
        seen: list[Seen | str] = []
        body = base_body(case.endpoint, FAR_MODEL, case.stream)
        config = world.config
        # Past every budget of the request (queue, attempts, relay idle) and the script's waits.
        budget = (config.queue_timeout + config.max_attempts * (
            config.ttft_base + config.inference_timeout + config.preamble_timeout)
            + config.idle_timeout + 200.0)

        async def consume(label: str) -> None:
            with trio.move_on_after(budget) as scope:
                answer = await world.request(post(case.endpoint, body), label)
            if scope.cancelled_caught:
                seen.append(f"{label}: no answer within {budget:g}s (its budgets)")
                return
            seen.append(answer)
            problem = answer_problem(label, case.stream, answer)
            if problem:
                seen.append(problem)

        scripted: FarRequest | None = None
        other: FarRequest | None = None

        def resolve(value: Any) -> Any:
            incoming = scripted.incoming if scripted is not None else None
            match value:
                case Rid("puppet"):
                    return incoming.request_id if incoming else "far-gone.1"
                case Rid("sim"):
                    return other.incoming.request_id if other else "far-other.1"
                case Rid("stale"):
                    return world.last_far_rid or "far-stale.1"
                case Rid(_):
                    return "no-such-request.1"
                case Inner(frame):
                    return _text(frame.render(resolve))
                case Session(_) | SealedBody(_):
                    return 1
                case Sealed(plaintext):
                    return far.provider.seal(incoming, plaintext)
            return far.provider.resolve(value)

        async def rest() -> None:
            """Every request after the scripted ones: served, or left to its budget."""
            while True:
                request = await far.next_request(1e9)
                if request is not None and case.serve_rest:
                    await far.serve(request)

        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as consumers:
                consumers.start_soon(consume, f"POST {case.endpoint} to the far provider")
                if case.second_request:
                    consumers.start_soon(consume, f"a second POST {case.endpoint} to it")
                scripted = await far.next_request(60)
                if case.second_request:
                    other = await far.next_request(10)
                    if other is not None and case.serve_rest:
                        outer.start_soon(far.serve, other)
                outer.start_soon(rest)
                if scripted is not None:
                    await _play(far, scripted, case, resolve)
            outer.cancel_scope.cancel()
        if scripted is not None:
            world.last_far_rid = scripted.incoming.request_id
        await trio.testing.wait_all_tasks_blocked()
        seen.extend(far.problems)
        for request in far.requests.values():
            if not (request.terminal_sent or request.cancelled or request.link.closed.is_set()):
                seen.append(f"request {request.incoming.request_id} ended here but the far "
                            "instance, which never finished it, was not told to stop")
        return seen

    return scenario


async def _play(far: FarInstance, request: FarRequest, case: FarCase, resolve: Any) -> None:
    incoming = request.incoming
    if case.content_first and incoming.sealer is not None:
        await far.chunk(incoming, content_event(incoming))
    for action in case.actions:
        match action:
            case Relays(frame):
                await far.relay(_text(frame.render(resolve)))
            case FarFrame(frame):
                await far.send(frame.render(resolve))
            case Pause(seconds):
                await trio.sleep(seconds)
            case FarHang(seconds):
                await far.hang(seconds)
            case FarClose(code):
                await far.close(code)
            case FarPing():
                far.ping()
    match case.finale:
        case "content_complete":
            await far.serve(request)
        case "complete":
            await far.complete(incoming)
        case "error":
            await far.relay(dumps({"type": "inference_error", "request_id": incoming.request_id,
                                   "error": "fuzz", "status_code": 500}))
        case "refused":
            await far.send(dumps({"type": "refused", "provider_id": FAR_ID,
                                  "request_id": incoming.request_id, "reason": "full"}))
        case "close":
            await far.close(1000)
        case _:
            pass


def peer_scenario(case: LinkCase | FarCase) -> Scenario:
    return link_scenario(case) if isinstance(case, LinkCase) else far_scenario(case)


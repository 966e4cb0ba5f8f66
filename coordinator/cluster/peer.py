"""Links between instances: dispatch to a provider connected to another instance.

Instance A routes a request to provider P, which is connected to instance B.
A seals the body to P's public key itself — exactly as for a local provider —
and hands B only the sealed ``inference_request`` frame over a WebSocket link
between the two instances. B holds one of P's slots (B is authoritative: a
full provider is a capacity refusal, 503, no strike), forwards the frame, and
relays P's frames for that request back, still encrypted to A's ephemeral key.
A decrypts, classifies and commits as always: to A's engine a remote provider
is one more :class:`~coordinator.providers.connection.ProviderConnection`,
whose transport is the link (:class:`PeerRoute`) instead of a socket. A cancel travels
the same way; a link that drops ends every stream on it (before content: a
failover; after: an in-band error), as a provider disconnect would.

Frames on a link are typed and bounded (:mod:`coordinator.protocol.cluster`);
links are authenticated with the shared ``cluster_token``, and every write on
them is whole or the link is closed (:mod:`coordinator.wsio`).

A stream already relayed depends on its link, not on the directory: A pings
each open link every ``cluster_refresh`` seconds and drops it when no pong
comes within ``cluster_ttl`` (the streams on it then end, as above). An
instance whose directory page expires (Redis away, say) gets no new requests,
but its link lives on until the streams on it are done.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import attrs
import trio
import trio_websocket

from coordinator import sizes, wsio
from coordinator.config import Config
from coordinator.credentials import matches_any
from coordinator.protocol import (
    Cancel,
    FrameError,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    decode_frame,
    encode_frame,
)
from coordinator.protocol.cluster import (
    PeerHello,
    PeerMessage,
    Relay,
    RelayCancel,
    Relayed,
    RelayLease,
    RelayRefused,
    decode_peer_frame,
    encode_peer_frame,
)
from coordinator.protocol.crypto import load_public_key
from coordinator.providers.connection import Directory, ProviderConnection, ProviderGone
from coordinator.registry.actor import RegistryClient
from coordinator.registry.table import CANCELLED, Lease, ProviderRecord
from coordinator.untrusted import printable

log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008
LOGGED_REJECTIONS = 10  # malformed frames a link may have logged (all are dropped)


def _lease_of(relayed: RelayLease) -> Lease:
    return Lease(relayed.request_id, relayed.provider_id, relayed.session, relayed.model,
                 relayed.shape, relayed.version, relayed.cost)


def _relay_lease(lease: Lease) -> RelayLease:
    return RelayLease(lease.request_id, lease.provider_id, lease.session, lease.model,
                      lease.shape, lease.version, lease.cost)


@attrs.define(eq=False)
class _Frames:
    """A link's incoming frames, decoded strictly; bad ones dropped, a few logged."""

    limit: int
    peer: str
    rejected: int = 0

    def decode(self, raw: str | bytes) -> PeerMessage | None:
        try:
            return decode_peer_frame(raw, max_bytes=self.limit)
        except FrameError as exc:
            self.rejected += 1
            if self.rejected <= LOGGED_REJECTIONS:
                log.warning("link %s: malformed frame dropped (%s)", printable(self.peer),
                            printable(str(exc)))
            return None


# ---- B: serving links from other instances ------------------------------------------


@attrs.define(eq=False)
class _Served:
    """One link being served: the instance on it and its relays in flight, by request id."""

    peer: str
    relays: dict[str, trio.CancelScope] = attrs.field(factory=dict)


@attrs.define(eq=False)
class PeerServer:
    """Accepts links from other instances and relays their requests to local providers."""

    config: Config
    registry: RegistryClient
    directory: Directory
    relayed: int = 0  # frames relayed, for the status page and tests
    pending: int = 0  # links accepted that have not said hello yet
    serving: set[_Served] = attrs.field(factory=set)  # links past hello, until they close

    @property
    def in_flight(self) -> int:
        """Relays in flight on every link (each holds a slot on a provider here)."""
        return sum(len(link.relays) for link in self.serving)

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        """trio-websocket handler: one call per link. Never raises."""
        try:
            # Like provider admission: links that never say hello are bounded in number.
            if self.pending >= self.config.max_pending_providers:
                await request.reject(503, body=b"not accepting links now")
                return
            self.pending += 1
            try:
                ws = await request.accept()
                peer = await self._hello(ws)
            finally:
                self.pending -= 1
            if peer is not None:
                await self._serve(ws, peer)
        except trio_websocket.ConnectionClosed:
            pass
        except Exception:
            log.error("peer link handler failed", exc_info=True)

    async def _hello(self, ws: trio_websocket.WebSocketConnection) -> str | None:
        frames = _Frames(self.config.register_frame_bytes, "(before hello)")
        with trio.move_on_after(self.config.register_timeout):
            hello = frames.decode(await ws.get_message())
            if isinstance(hello, PeerHello) and matches_any(
                    hello.token, (self.config.cluster_token,)):
                wsio.allow_large_messages(ws, _link_limit(self.config))
                return hello.instance
        with trio.move_on_after(self.config.close_timeout):
            await ws.aclose(POLICY_VIOLATION, "not a cluster member")
        return None

    async def _serve(self, ws: trio_websocket.WebSocketConnection, peer: str) -> None:
        link = _Served(peer)
        relays = link.relays
        frames = _Frames(_link_limit(self.config), peer)
        self.serving.add(link)
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        message = frames.decode(await ws.get_message())
                    except trio_websocket.ConnectionClosed:
                        break
                    match message:
                        case Relay(relayed, frame) if relayed.request_id not in relays:
                            lease = _lease_of(relayed)
                            scope = trio.CancelScope()
                            relays[lease.request_id] = scope
                            nursery.start_soon(self._relay, ws, lease, frame, scope, relays)
                        case RelayCancel(request_id=request_id) if request_id in relays:
                            relays[request_id].cancel(
                                reason="cancelled by the requesting instance")
                        case _:
                            pass  # malformed (dropped above), a duplicate, or not ours to act on
                nursery.cancel_scope.cancel(reason=f"link from {peer} closed")
        finally:
            self.serving.discard(link)

    async def _relay(self, ws: trio_websocket.WebSocketConnection, lease: Lease, frame: str,
                     scope: trio.CancelScope, relays: dict[str, trio.CancelScope]) -> None:
        """One request for one local provider, from the send to its last frame."""
        try:
            request = decode_frame(frame, max_bytes=len(frame))
        except FrameError:
            request = None
        if not isinstance(request, InferenceRequest) or request.request_id != lease.request_id:
            relays.pop(lease.request_id, None)
            await _refuse(ws, lease, "malformed relay")
            return
        refused = await self.registry.reserve(lease)
        connection = self.directory.get(lease.provider_id, lease.session)
        if refused is not None or connection is None:
            relays.pop(lease.request_id, None)
            if refused is None:  # held, but its provider has just gone: give the slot back first
                with trio.CancelScope(shield=True):
                    await self.registry.release(lease, CANCELLED)
            await _refuse(ws, lease, refused or "gone")
            return
        sent = finished = False
        limit = _link_limit(self.config) - sizes.PEER_FRAME_OVERHEAD
        try:
            events = connection.open_stream(lease.request_id)
            with scope:
                await connection.send(request)
                sent = True  # whole (wsio): before this, the provider has nothing to cancel
                async for event in events:
                    self.relayed += 1
                    relayed = encode_frame(event)
                    if len(relayed) > limit // 2:  # escaped in the link frame: up to twice
                        event = InferenceError(lease.request_id, "a provider frame too large "
                                               "to relay between instances", 502)
                        relayed = encode_frame(event)
                    await _send(ws, Relayed(lease.provider_id, relayed))
                    if isinstance(event, InferenceComplete | InferenceError):
                        finished = True
                        return
                # The provider went without a last frame: say so, as the provider would.
                gone = InferenceError(lease.request_id, connection.end_reason(
                    lease.request_id), 502)
                await _send(ws, Relayed(lease.provider_id, encode_frame(gone)))
                finished = True
        except ProviderGone:
            pass
        finally:
            relays.pop(lease.request_id, None)
            connection.close_stream(lease.request_id)
            with trio.CancelScope(shield=True):
                if sent and not finished:
                    with trio.move_on_after(self.config.cancel_send_timeout):
                        await connection.send_cancel(lease.request_id)
                # Health verdicts are the requesting instance's (the shared breaker).
                await self.registry.release(lease, CANCELLED)


async def _refuse(ws: trio_websocket.WebSocketConnection, lease: Lease, reason: str) -> None:
    """Say why a relay was not taken; a link that has closed meanwhile needs no answer."""
    with contextlib.suppress(ProviderGone):
        await _send(ws, RelayRefused(lease.provider_id, lease.request_id, reason))


async def _send(ws: trio_websocket.WebSocketConnection, message: PeerMessage) -> None:
    try:
        await ws.send_message(encode_peer_frame(message))
    except trio_websocket.ConnectionClosed:
        raise ProviderGone("peer link closed") from None


def _link_limit(config: Config) -> int:
    return sizes.peer_socket_limit(config.max_body_bytes, config.max_frame_bytes)


# ---- A: links to other instances, and the providers behind them ----------------------


@attrs.frozen
class PeerRoute:
    """The transport of a provider connected to another instance: the link to it.

    A request's frame travels with its lease (the instance there holds the slot);
    a link that cannot be opened fails the request as the instance being gone.
    """

    link: PeerLink
    lease_of: Callable[[str], Awaitable[Lease | None]]  # request id -> its lease here

    @property
    def instance(self) -> str:
        return self.link.instance

    async def send(self, connection: ProviderConnection, message: InferenceRequest | Cancel) -> None:
        if isinstance(message, Cancel):
            await self.link.cancel(connection, message.request_id)
            return
        lease = await self.lease_of(message.request_id)
        if lease is None:
            raise ProviderGone(connection.provider_id)
        try:
            await self.link.relay(connection, lease, encode_frame(message))
        except ProviderGone as exc:
            connection.deliver(message.request_id, _instance_gone(message.request_id, str(exc)))


@attrs.define(eq=False)
class PeerLink:
    """This instance's link to one other instance, opened on first use.

    Runs (:meth:`run`) until retired and idle: an instance that left the directory
    keeps its link while streams are still relayed over it.
    """

    instance: str
    url: str
    me: str
    token: str
    config: Config = attrs.field(factory=Config)
    # Opens the socket: wsio.connect (tests dial the other end over memory streams).
    dial: Callable[..., Awaitable[trio_websocket.WebSocketConnection]] = wsio.connect
    _ws: trio_websocket.WebSocketConnection | None = None
    _opening: trio.Lock = attrs.field(factory=trio.Lock)
    _requests: dict[str, ProviderConnection] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None
    _refused: bool = False  # said once until a link is accepted again
    _retired: trio.Event = attrs.field(factory=trio.Event)
    _idle: trio.Event = attrs.field(factory=trio.Event)  # set while no request is on the link

    def __attrs_post_init__(self) -> None:
        self._idle.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a nursery for the link's reader until retired and idle."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._retired.wait()
            while not self._idle.is_set():
                await self._idle.wait()
            await self.aclose()
            nursery.cancel_scope.cancel(reason=f"link to {self.instance} retired")

    def retire(self) -> None:
        """No new requests go this way; the link closes once those on it are done."""
        self._retired.set()

    async def _open(self) -> trio_websocket.WebSocketConnection:
        async with self._opening:
            if self._ws is not None and not self._ws.closed:
                return self._ws
            if self._nursery is None or self._retired.is_set():
                raise ProviderGone(f"instance {self.instance}: link retired")
            try:
                with trio.fail_after(self.config.register_timeout):
                    ws = await self.dial(self._nursery, self.url,
                                         max_message_size=_link_limit(self.config),
                                         write_timeout=self.config.write_timeout)
                    await _send(ws, PeerHello(self.me, self.token))
            except (OSError, ValueError, trio.TooSlowError, trio_websocket.HandshakeError,
                    ProviderGone) as exc:
                raise ProviderGone(f"instance {self.instance}: {printable(str(exc))}") from None
            self._ws = ws
            self._nursery.start_soon(self._read, ws)
            self._nursery.start_soon(self._watch, ws)
            return ws

    async def relay(self, connection: ProviderConnection, lease: Lease, frame: str) -> None:
        ws = await self._open()
        self._track(lease.request_id, connection)  # before the write: answers may beat its return
        try:
            await _send(ws, Relay(_relay_lease(lease), frame))
        except BaseException:
            # Cancelled, nothing was written (wsio), so no cancel will follow; or the
            # link broke. Either way nothing of this request is on the link.
            self._untrack(lease.request_id)
            raise

    async def cancel(self, connection: ProviderConnection, request_id: str) -> None:
        self._untrack(request_id)
        if self._ws is not None and not self._ws.closed:
            await _send(self._ws, RelayCancel(connection.provider_id, connection.session,
                                              request_id))

    @property
    def in_flight(self) -> int:
        """Requests relayed over this link that have not ended."""
        return len(self._requests)

    def _track(self, request_id: str, connection: ProviderConnection) -> None:
        self._requests[request_id] = connection
        if self._idle.is_set():
            self._idle = trio.Event()

    def _untrack(self, request_id: str) -> ProviderConnection | None:
        connection = self._requests.pop(request_id, None)
        if not self._requests:
            self._idle.set()
        return connection

    async def _watch(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Drop the link when the other instance stops answering pings.

        The directory says where new requests may go; whether the streams already
        on a link live is the link's own business (a Redis outage must not end them,
        a hung instance must).
        """
        while not ws.closed:
            await trio.sleep(self.config.cluster_refresh)
            with trio.move_on_after(self.config.cluster_ttl) as silent:
                try:
                    await ws.ping()
                except (trio_websocket.ConnectionClosed, ValueError):
                    return
            if silent.cancelled_caught:
                log.warning("instance %s did not answer a ping within %gs; dropping the link",
                            printable(self.instance), self.config.cluster_ttl)
                await _abort(ws, self.config.close_timeout)
                return

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> None:
        frames = _Frames(_link_limit(self.config), self.instance)
        try:
            while True:
                message = frames.decode(await ws.get_message())
                if message is not None:
                    self._on_message(message)
                self._refused = False
        except trio_websocket.ConnectionClosed as exc:
            self._note_refusal(exc.reason)
        finally:
            # Every request on this link ends as if its provider had disconnected.
            for request_id, connection in list(self._requests.items()):
                connection.deliver(request_id, _instance_gone(
                    request_id, f"instance {self.instance} is gone"))
            self._requests.clear()
            self._idle.set()

    def _note_refusal(self, reason: trio_websocket.CloseReason | None) -> None:
        # Without this a wrong cluster token looked healthy: every request to the other
        # instance's providers failed with "instance … is gone" and nothing said why.
        if reason is None or reason.code != POLICY_VIOLATION or self._refused:
            return
        self._refused = True
        log.warning("instance %s refused this instance's link (%s): is COORDINATOR_CLUSTER_TOKEN "
                    "the same on every instance?", printable(self.instance),
                    printable(reason.reason))

    def _on_message(self, message: PeerMessage) -> None:
        match message:
            case RelayRefused(request_id=request_id, reason=reason):
                connection = self._untrack(request_id)
                if connection is not None:  # B is authoritative for its slots: capacity
                    connection.deliver(request_id, InferenceError(
                        request_id, f"capacity: {printable(reason, 100)}", 503))
            case Relayed(frame=frame):
                try:
                    event = decode_frame(frame, max_bytes=len(frame))
                except FrameError:
                    return
                if not isinstance(event, InferenceAccepted | InferenceResponseChunk
                                  | InferenceComplete | InferenceError):
                    return
                connection = self._requests.get(event.request_id)
                if connection is not None:
                    connection.deliver(event.request_id, event)
                    if isinstance(event, InferenceComplete | InferenceError):
                        self._untrack(event.request_id)
            case _:
                pass  # hello, relay and cancel go the other way

    async def aclose(self) -> None:
        if self._ws is not None:
            await _abort(self._ws, self.config.close_timeout)


async def _abort(ws: trio_websocket.WebSocketConnection, wait: float) -> None:
    """Close ``ws``, waiting at most ``wait`` seconds for the other side's reply."""
    with trio.CancelScope(shield=True), trio.move_on_after(wait):
        await ws.aclose()


def _instance_gone(request_id: str, why: str) -> InferenceError:
    # The instance in between went away, not the provider: a lifecycle status
    # (503) that fails over without a strike, as a draining provider's would.
    return InferenceError(request_id, why, 503)


def remote_connection(record: ProviderRecord, link: PeerLink, config: Config,
                      lease_of: Callable[[str], Awaitable[Lease | None]]) -> ProviderConnection:
    """A provider connected to ``link``'s instance, as a connection the engine sends to."""
    return ProviderConnection(
        provider_id=record.provider_id, session=record.session,
        transport=PeerRoute(link, lease_of), public_key=load_public_key(record.public_key),
        encrypted_chunks=record.encrypted_chunks, stream_buffer=config.request_buffer_chunks,
        stream_buffer_bytes=config.request_buffer_bytes)

"""Links between instances: dispatch to a provider connected to another instance.

Instance A routes a request to provider P, which is connected to instance B.
A seals the body to P's public key itself — exactly as for a local provider —
and hands B only the sealed ``inference_request`` frame over a WebSocket link
between the two instances. B holds one of P's slots (B is authoritative: a
full provider is a capacity refusal, 503, no strike), forwards the frame, and
relays P's frames for that request back, still encrypted to A's ephemeral key.
A decrypts, classifies and commits as always: to A's engine a remote provider
is one more :class:`~coordinator.providers.connection.ProviderConnection`,
whose writes go over the link (:class:`RemoteConnection`). A cancel travels
the same way; a link that drops ends every stream on it (before content: a
failover; after: an in-band error), as a provider disconnect would.

Frames on a link are JSON objects with a ``type``:

* A → B: ``hello {instance, token}`` first; then ``relay {lease, frame}`` and
  ``cancel {provider_id, session, request_id}``;
* B → A: ``relayed {provider_id, frame}`` (P's own frame, as sent) and
  ``refused {provider_id, request_id, reason}``.

Links are authenticated with the shared ``cluster_token``.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import orjson
import trio
import trio_websocket

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
from coordinator.protocol.crypto import load_public_key
from coordinator.providers.connection import Directory, ProviderConnection, ProviderGone
from coordinator.registry.actor import RegistryClient
from coordinator.registry.table import CANCELLED, Lease, ProviderRecord

log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008


def _frame(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def _lease_of(data: Any) -> Lease | None:
    if not isinstance(data, dict):
        return None
    try:
        return Lease(str(data["request_id"]), str(data["provider_id"]), int(data["session"]),
                     str(data["model"]), str(data["shape"]), str(data["version"]),
                     float(data["cost"]))
    except (KeyError, TypeError, ValueError):
        return None


# ---- B: serving links from other instances ------------------------------------------


@attrs.define(eq=False)
class PeerServer:
    """Accepts links from other instances and relays their requests to local providers."""

    config: Config
    registry: RegistryClient
    directory: Directory
    relayed: int = 0  # frames relayed, for the status page and tests
    pending: int = 0  # links accepted that have not said hello yet

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
        with trio.move_on_after(self.config.register_timeout):
            hello = _message(await ws.get_message())
            if (hello is not None and hello.get("type") == "hello"
                    and isinstance(hello.get("token"), str)
                    and matches_any(hello["token"], (self.config.cluster_token,))
                    and isinstance(hello.get("instance"), str)):
                _allow_large_frames(ws, self.config)
                return str(hello["instance"])
        with trio.move_on_after(self.config.close_timeout):
            await ws.aclose(POLICY_VIOLATION, "not a cluster member")
        return None

    async def _serve(self, ws: trio_websocket.WebSocketConnection, peer: str) -> None:
        relays: dict[str, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    message = _message(await ws.get_message())
                except trio_websocket.ConnectionClosed:
                    break
                if message is None:
                    continue
                if message.get("type") == "relay":
                    lease = _lease_of(message.get("lease"))
                    frame = message.get("frame")
                    if lease is not None and isinstance(frame, str):
                        scope = trio.CancelScope()
                        relays[lease.request_id] = scope
                        nursery.start_soon(self._relay, ws, lease, frame, scope, relays)
                elif message.get("type") == "cancel":
                    scope_ = relays.get(str(message.get("request_id")))
                    if scope_ is not None:
                        scope_.cancel(reason="cancelled by the requesting instance")
            nursery.cancel_scope.cancel(reason=f"link from {peer} closed")

    async def _relay(self, ws: trio_websocket.WebSocketConnection, lease: Lease, frame: str,
                     scope: trio.CancelScope, relays: dict[str, trio.CancelScope]) -> None:
        """One request for one local provider, from the send to its last frame."""
        try:
            request = decode_frame(frame, max_bytes=len(frame))
        except FrameError:
            request = None
        if not isinstance(request, InferenceRequest) or request.request_id != lease.request_id:
            await _send(ws, _frame(type="refused", provider_id=lease.provider_id,
                                   request_id=lease.request_id, reason="malformed relay"))
            return
        refused = await self.registry.reserve(lease)
        connection = self.directory.get(lease.provider_id, lease.session)
        if refused is not None or connection is None:
            await _send(ws, _frame(type="refused", provider_id=lease.provider_id,
                                   request_id=lease.request_id, reason=refused or "gone"))
            if refused is None:
                await self.registry.release(lease, CANCELLED)
            return
        finished = False
        events = connection.open_stream(lease.request_id)
        try:
            with scope:
                await connection.send(request)
                async for event in events:
                    self.relayed += 1
                    await _send(ws, _frame(type="relayed", provider_id=lease.provider_id,
                                           frame=encode_frame(event)))
                    if isinstance(event, InferenceComplete | InferenceError):
                        finished = True
                        return
                # The provider went without a last frame: say so, as the provider would.
                gone = InferenceError(lease.request_id, connection.end_reason(
                    lease.request_id), 502)
                await _send(ws, _frame(type="relayed", provider_id=lease.provider_id,
                                       frame=encode_frame(gone)))
                finished = True
        except ProviderGone:
            pass
        finally:
            relays.pop(lease.request_id, None)
            connection.close_stream(lease.request_id)
            with trio.CancelScope(shield=True):
                if not finished:
                    with trio.move_on_after(self.config.cancel_send_timeout):
                        await connection.send_cancel(lease.request_id)
                # Health verdicts are the requesting instance's (the shared breaker).
                await self.registry.release(lease, CANCELLED)


async def _send(ws: trio_websocket.WebSocketConnection, frame: bytes) -> None:
    try:
        await ws.send_message(frame.decode())
    except trio_websocket.ConnectionClosed:
        raise ProviderGone("peer link closed") from None


def _allow_large_frames(ws: trio_websocket.WebSocketConnection, config: Config) -> None:
    # A relayed request carries a whole sealed body (docs/configuration.md, "Sizes").
    from coordinator import sizes

    ws._max_message_size = max(sizes.largest_request_frame(config.max_body_bytes) + 4096,
                               sizes.provider_socket_limit(config.max_frame_bytes))


# ---- A: links to other instances, and the providers behind them ----------------------


@attrs.define(eq=False)
class RemoteConnection(ProviderConnection):
    """A provider connected to another instance; writes go over the link to it."""

    link: PeerLink | None = None
    lease_of: Any = None  # request id -> Lease, read from the registry's table
    instance: str = ""  # the instance it is connected to
    remote = True

    async def send(self, message: Any) -> None:
        if self.closed or self.link is None:
            raise ProviderGone(self.provider_id)
        if isinstance(message, InferenceRequest):
            lease = self.lease_of(message.request_id)
            if lease is None:
                raise ProviderGone(self.provider_id)
            try:
                await self.link.relay(self, lease, encode_frame(message))
            except ProviderGone as exc:
                self.deliver(message.request_id, _instance_gone(message.request_id, str(exc)))
        elif isinstance(message, Cancel):
            await self.link.cancel(self, message.request_id)


@attrs.define(eq=False)
class PeerLink:
    """This instance's link to one other instance, opened on first use."""

    instance: str
    url: str
    me: str
    token: str
    _ws: trio_websocket.WebSocketConnection | None = None
    _opening: trio.Lock = attrs.field(factory=trio.Lock)
    _requests: dict[str, RemoteConnection] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None
    _refused: bool = False  # said once until a link is accepted again

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a nursery for the link's reader; cancelled when the link is dropped."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _open(self) -> trio_websocket.WebSocketConnection:
        async with self._opening:
            if self._ws is not None and not self._ws.closed:
                return self._ws
            assert self._nursery is not None
            try:
                ws = await trio_websocket.connect_websocket_url(self._nursery, self.url)
                await ws.send_message(_frame(type="hello", instance=self.me,
                                             token=self.token).decode())
            except (OSError, trio_websocket.HandshakeError,
                    trio_websocket.ConnectionClosed) as exc:
                raise ProviderGone(f"instance {self.instance}: {exc}") from None
            ws._max_message_size = 1 << 30  # frames are the requests' own, bounded at the source
            self._ws = ws
            self._nursery.start_soon(self._read, ws)
            return ws

    async def relay(self, connection: RemoteConnection, lease: Lease, frame: str) -> None:
        ws = await self._open()
        self._requests[lease.request_id] = connection
        await _send(ws, _frame(type="relay", lease=attrs.asdict(lease), frame=frame))

    async def cancel(self, connection: RemoteConnection, request_id: str) -> None:
        self._requests.pop(request_id, None)
        if self._ws is not None and not self._ws.closed:
            await _send(self._ws, _frame(type="cancel", provider_id=connection.provider_id,
                                         session=connection.session, request_id=request_id))

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                self._on_message(await ws.get_message())
                self._refused = False
        except trio_websocket.ConnectionClosed as exc:
            self._note_refusal(exc.reason)
        finally:
            # Every request on this link ends as if its provider had disconnected.
            for connection in set(self._requests.values()):
                for request_id in [r for r, c in self._requests.items() if c is connection]:
                    connection.deliver(request_id, _instance_gone(
                        request_id, f"instance {self.instance} is gone"))
            self._requests.clear()

    def _note_refusal(self, reason: trio_websocket.CloseReason | None) -> None:
        # Without this a wrong cluster token looked healthy: every request to the other
        # instance's providers failed with "instance … is gone" and nothing said why.
        if reason is None or reason.code != POLICY_VIOLATION or self._refused:
            return
        self._refused = True
        log.warning("instance %s refused this instance's link (%s): is COORDINATOR_CLUSTER_TOKEN "
                    "the same on every instance?", self.instance, reason.reason)

    def _on_message(self, raw: str | bytes) -> None:
        message = _message(raw)
        if message is None:
            return
        if message.get("type") == "refused":
            request_id = str(message.get("request_id"))
            connection = self._requests.pop(request_id, None)
            if connection is not None:  # B is authoritative for its slots: capacity
                connection.deliver(request_id, InferenceError(
                    request_id, f"capacity: {str(message.get('reason'))[:100]}", 503))
        elif message.get("type") == "relayed" and isinstance(message.get("frame"), str):
            try:
                event = decode_frame(message["frame"])
            except FrameError:
                return
            if not isinstance(event, InferenceAccepted | InferenceResponseChunk
                              | InferenceComplete | InferenceError):
                return
            connection = self._requests.get(event.request_id)
            if connection is not None:
                connection.deliver(event.request_id, event)
                if isinstance(event, InferenceComplete | InferenceError):
                    self._requests.pop(event.request_id, None)

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.aclose()


def _instance_gone(request_id: str, why: str) -> InferenceError:
    # The instance in between went away, not the provider: a lifecycle status
    # (503) that fails over without a strike, as a draining provider's would.
    return InferenceError(request_id, why, 503)


def remote_connection(record: ProviderRecord, link: PeerLink, config: Config,
                      lease_of: Any) -> RemoteConnection:
    return RemoteConnection(
        provider_id=record.provider_id, session=record.session, ws=None,  # type: ignore[arg-type]
        public_key=load_public_key(record.public_key), encrypted_chunks=record.encrypted_chunks,
        stream_buffer=config.request_buffer_chunks,
        stream_buffer_bytes=config.request_buffer_bytes, link=link, lease_of=lease_of,
        instance=link.instance)


def _message(raw: str | bytes) -> dict[str, Any] | None:
    """A peer link's frame as a JSON object, or None for anything else (ignored)."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None

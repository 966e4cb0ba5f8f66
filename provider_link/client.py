"""One provider's side of the protocol (docs/protocol.md), over one WebSocket at a time.

:class:`ProviderClient` registers, answers the coordinator's challenges with its
Ed25519 key (and the proof that it holds its X25519 key), heartbeats, opens each
``inference_request``, hands it to :meth:`ProviderClient.answer` in a task of its own
and turns the actions it yields (:mod:`.actions`) into sealed frames; a ``cancel``
cancels that task. Every frame goes out whole or the socket is closed
(``coordinator.wsio``). Subclasses say who they are (:meth:`register_message`) and
what they answer: the simulator scripts it, the agent asks an inference engine.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import nacl.signing
import trio
import trio_websocket

from coordinator.protocol import (
    AttestationChallenge,
    AttestationResponse,
    Cancel,
    EncryptedPayload,
    FrameError,
    Heartbeat,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    Message,
    Register,
    ResponseSealer,
    Usage,
    decode_frame,
    encode_frame,
    open_request,
    prove_key,
    sign_challenge,
)
from coordinator.protocol.crypto import DecryptError
from coordinator.untrusted import printable
from coordinator.wsio import open_websocket

from .actions import Accepted, Action, Chunk, Complete, Crash, Error
from .keys import ProviderKeys

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class ProviderClient(abc.ABC):
    """The protocol machinery every provider shares; see the module docstring."""

    # Connection state, for the owner (and tests) to read.
    current_ws: trio_websocket.WebSocketConnection | None = attrs.field(default=None, kw_only=True)
    closed_with: int | None = attrs.field(default=None, kw_only=True)
    closed_reason: str = attrs.field(default="", kw_only=True)
    admissions: int = attrs.field(default=0, kw_only=True)  # connections it was admitted on
    frames_sent: int = attrs.field(default=0, kw_only=True)
    registered: trio.Event = attrs.field(factory=trio.Event, kw_only=True)
    _answered: bool = attrs.field(default=False, kw_only=True)  # on the current connection
    _active: dict[str, trio.CancelScope] = attrs.field(factory=dict, kw_only=True)

    # -- what a provider says and does (subclasses)
    @property
    @abc.abstractmethod
    def name(self) -> str:
        """How logs name this provider."""

    @property
    @abc.abstractmethod
    def keys(self) -> ProviderKeys: ...

    @property
    @abc.abstractmethod
    def token(self) -> str: ...

    @abc.abstractmethod
    def register_message(self) -> Register:
        """The ``register`` frame this provider opens each connection with."""

    @abc.abstractmethod
    async def answer(self, request_id: str, body: dict[str, Any],
                     send: Callable[[Action], Awaitable[None]]) -> None:
        """Answer one decrypted request (``body`` holds its ``"endpoint"``), each action
        through ``send``. Cancelled when the coordinator cancels the request."""

    heartbeat_interval: float = attrs.field(default=20.0, kw_only=True)
    # Whether response chunks are sealed (declared in register); the simulator can lie.
    encrypt: bool = attrs.field(default=True, kw_only=True)

    def challenge_signer(self) -> nacl.signing.SigningKey:
        """The key challenges are signed with (the simulator can be told to use another)."""
        return self.keys.signing

    def receive_limit(self) -> int:
        """The largest message this provider's socket takes (its ``max_request_bytes``)."""
        return 1024 * 1024

    def may_cancel(self, request_id: str) -> bool:
        """Whether a ``cancel`` stops this request (the simulator can ignore one)."""
        return True

    def note(self, event: str, request_id: str) -> None:  # noqa: B027 (an optional hook)
        """Told of each request's events: received, cancel, complete, error, closed."""

    @property
    def active(self) -> int:
        """Requests being answered now."""
        return len(self._active)

    # -- the connection
    async def run(self, url: str) -> None:
        """Connect to ``url`` (``ws://`` or ``wss://``) and serve until the socket closes."""
        # The token in the upgrade request too: the coordinator keeps places for it.
        async with open_websocket(
                url, max_message_size=self.receive_limit(),
                extra_headers=[(b"authorization", f"Bearer {self.token}".encode())]) as ws:
            await self.serve(ws)

    async def serve(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Serve one connection; returns when it closes."""
        self.current_ws = ws
        self._answered = False
        await ws.send_message(encode_frame(self.register_message()))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, ws)
                while True:
                    try:
                        raw = await ws.get_message()
                    except trio_websocket.ConnectionClosed as exc:
                        self.closed_with = exc.reason.code if exc.reason else None
                        self.closed_reason = (exc.reason.reason or "") if exc.reason else ""
                        self.note("closed", "")
                        break
                    try:
                        message = decode_frame(raw)
                    except FrameError as exc:
                        log.warning("%s: bad frame from the coordinator: %s", self.name,
                                    printable(str(exc)))
                        continue
                    self._on_message(ws, nursery, message)
                nursery.cancel_scope.cancel(reason="connection closed")
        finally:
            self._active.clear()

    def _on_message(
        self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery, message: Message
    ) -> None:
        match message:
            case AttestationChallenge(nonce, timestamp, challenge_key):
                signature = sign_challenge(self.challenge_signer(), nonce, timestamp,
                                           self.keys.public_key)
                proof = prove_key(self.keys.encryption, nonce, challenge_key) \
                    if challenge_key else ""
                nursery.start_soon(self._send, ws, AttestationResponse(nonce, signature, proof))
                if not self._answered:
                    self._answered = True
                    self.admissions += 1
                    log.info("%s: registered, answering the coordinator's challenge", self.name)
                self.registered.set()
            case InferenceRequest():
                scope = trio.CancelScope()
                self._active[message.request_id] = scope
                nursery.start_soon(self._serve_request, ws, message, scope)
            case Cancel(request_id):
                self.note("cancel", request_id)
                running = self._active.get(request_id)
                if running is not None and self.may_cancel(request_id):
                    running.cancel(reason="cancelled by the coordinator")
            case _:
                pass  # nothing else is sent to a provider

    async def _send(self, ws: trio_websocket.WebSocketConnection, message: Message) -> None:
        self.frames_sent += 1
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await ws.send_message(encode_frame(message))

    async def _heartbeat(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            await self._send(ws, Heartbeat())

    async def _serve_request(self, ws: trio_websocket.WebSocketConnection,
                             request: InferenceRequest, scope: trio.CancelScope) -> None:
        rid = request.request_id
        try:
            with scope:
                plaintext, sealer = open_request(self.keys.encryption, request.encrypted_body)
                body = json.loads(plaintext)
                if not isinstance(body, dict):
                    raise ValueError("the request body is not a JSON object")
                await self.answer(rid, body, partial(self._act, ws, rid, sealer=sealer))
        except (DecryptError, ValueError):
            self.note("error", rid)
            await self._send(ws, InferenceError(rid, "request did not decrypt", 400))
        except Exception:
            # A backend's bug fails its request, not the connection.
            log.error("%s: answering %s failed", self.name, rid, exc_info=True)
            self.note("error", rid)
            await self._send(ws, InferenceError(rid, "provider internal error", 502))
        finally:
            self._active.pop(rid, None)

    async def _act(self, ws: trio_websocket.WebSocketConnection, rid: str, action: Action, *,
                   sealer: ResponseSealer) -> None:
        match action:
            case Accepted():
                await self._send(ws, InferenceAccepted(rid))
            case Chunk(text, corrupt):
                await self._send(ws, self._chunk_frame(rid, text, corrupt, sealer))
            case Error(status, message):
                self.note("error", rid)
                await self._send(ws, InferenceError(rid, message, status))
            case Crash():
                self.note("closed", rid)
                await ws.aclose(1011, "simulated crash")
            case Complete(prompt_tokens, completion_tokens, _):
                self.note("complete", rid)
                await self._send(ws, InferenceComplete(rid, Usage(prompt_tokens,
                                                                  completion_tokens)))

    def _chunk_frame(self, rid: str, text: str, corrupt: str | None,
                     sealer: ResponseSealer) -> InferenceResponseChunk:
        if corrupt == "plaintext" or not self.encrypt:
            return InferenceResponseChunk(rid, data=text)
        if corrupt == "garbage":
            return InferenceResponseChunk(rid, encrypted_data=EncryptedPayload(
                sealer.provider_public_key, base64.b64encode(b"\0" * 40).decode()))
        return InferenceResponseChunk(rid, encrypted_data=sealer.seal(text))

"""A simulated provider: the real protocol over trio-websocket, scripted behaviour.

It registers, answers challenges with its Ed25519 key, heartbeats, decrypts
each request, and streams the endpoint's native events back, encrypted to the
request's ephemeral key, as its :class:`Behaviour` says. Everything it was
sent is recorded for tests to assert on.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
from collections import deque
from collections.abc import Iterable
from typing import Any

import attrs
import nacl.public
import nacl.signing
import trio
import trio_websocket

from coordinator.protocol import (
    AttestationChallenge,
    AttestationResponse,
    Cancel,
    EncryptedPayload,
    FrameError,
    Hardware,
    Heartbeat,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    Message,
    ModelInfo,
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

from .behaviours import HEALTHY, Behaviour
from .script import Accepted, Chunk, Complete, Crash, Error, Pace, play

log = logging.getLogger(__name__)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _to_deque(items: Iterable[Behaviour]) -> deque[Behaviour]:
    return deque(items)


@attrs.define(eq=False)
class SimProvider:
    provider_id: str
    models: tuple[ModelInfo, ...]
    token: str = "demo-provider-token"
    version: str = "0.7.0"
    behaviour: Behaviour = HEALTHY
    script: deque[Behaviour] = attrs.field(factory=deque, converter=_to_deque)
    decode_tps: float = 200.0
    prefill_tps: float = 2000.0
    memory_gb: float = 64.0
    max_concurrency: int = 8
    # The largest request frame this provider's socket takes (declared in register).
    max_request_bytes: int = 1024 * 1024
    heartbeat_interval: float = 20.0
    encrypt: bool = True
    # Frame each chunk's payload as an SSE event ("data: {...}\n\n"), as some backends do.
    sse_chunks: bool = False
    # Put up to this many events that are ready together in one frame (SSE-framed);
    # only when the behaviour sends without pauses, so timing is unchanged.
    events_per_frame: int = 1
    seed: int = 0
    # Per-model default behaviour, overriding ``behaviour`` for that model.
    model_behaviours: dict[str, Behaviour] = attrs.field(factory=dict)
    # Chat templates per model: old binaries (< 0.6.3) crash on raw tool schemas.
    templates: dict[str, str] = attrs.field(factory=dict)
    # Derive prefill and decode delays from the advertised rates.
    pace: bool = False
    # (probability, behaviour) pairs drawn per request with the seeded rng.
    fault_mix: tuple[tuple[float, Behaviour], ...] = ()
    # Tampering hooks for admission tests.
    sign_with: nacl.signing.SigningKey | None = None
    # Recorded for tests.
    received: list[dict[str, Any]] = attrs.field(factory=list)
    registered: trio.Event = attrs.field(factory=trio.Event)
    # (virtual time, event, wire request id): received, cancel, complete, error, closed.
    log: list[tuple[float, str, str]] = attrs.field(factory=list)
    # Replaced whenever something above is recorded, so tests can wait on it.
    activity: trio.Event = attrs.field(factory=trio.Event)
    frames_sent: int = 0
    admissions: int = 0  # connections on which it answered the coordinator's challenge
    _answered: bool = False  # on the current connection
    closed_with: int | None = None
    closed_reason: str = ""
    current_ws: trio_websocket.WebSocketConnection | None = None
    _key: nacl.public.PrivateKey = attrs.field(factory=nacl.public.PrivateKey.generate)
    _signing: nacl.signing.SigningKey = attrs.field(factory=nacl.signing.SigningKey.generate)
    _active: dict[str, trio.CancelScope] = attrs.field(factory=dict)
    _ignoring: set[str] = attrs.field(factory=set)
    _rng: random.Random = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def cancelled(self) -> list[str]:
        """Wire ids the coordinator cancelled, in order (derived from the log)."""
        return [rid for _, event, rid in self.log if event == "cancel"]

    @property
    def completed(self) -> list[str]:
        return [rid for _, event, rid in self.log if event == "complete"]

    def _drawn(self) -> Behaviour | None:
        if not self.fault_mix:
            return None
        roll = self._rng.random()
        for probability, behaviour in self.fault_mix:
            if roll < probability:
                return behaviour
            roll -= probability
        return None

    def _note(self, event: str, request_id: str) -> None:
        self.log.append((trio.current_time(), event, request_id))
        self._touch()

    def _touch(self) -> None:
        self.activity.set()
        self.activity = trio.Event()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def public_key(self) -> str:
        """This provider's X25519 key, base64, as registered (and signed in challenges)."""
        return _b64(bytes(self._key.public_key))

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return self._signing

    def register_message(self) -> Register:
        return Register(
            hardware=Hardware("SimMac", "Sim M3 Max", self.memory_gb),
            models=self.models,
            backend="sim",
            version=self.version,
            public_key=self.public_key,
            auth_token=self.token,
            encrypted_response_chunks=self.encrypt,
            decode_tps=self.decode_tps,
            prefill_tps=self.prefill_tps,
            provider_id=self.provider_id,
            signing_public_key=_b64(bytes(self._signing.verify_key)),
            max_concurrency=self.max_concurrency,
            max_request_bytes=self.max_request_bytes,
        )

    async def run(self, url: str) -> None:
        """Connect to ``url`` and serve until the socket closes."""
        # The token in the upgrade request too: the coordinator keeps places for it.
        async with open_websocket(
                url, max_message_size=self.max_request_bytes,
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
                        self._touch()
                        break
                    try:
                        message = decode_frame(raw)
                    except FrameError as exc:
                        log.warning("%s: bad frame from coordinator: %s", self.provider_id,
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
                key = self.sign_with or self._signing
                signature = sign_challenge(key, nonce, timestamp, self.public_key)
                proof = prove_key(self._key, nonce, challenge_key) if challenge_key else ""
                nursery.start_soon(self._send, ws, AttestationResponse(nonce, signature, proof))
                if not self._answered:
                    self._answered = True
                    self.admissions += 1
                    log.info("%s: registered, answering the coordinator's challenge",
                             self.provider_id)
                self.registered.set()
            case InferenceRequest():
                scripted = self.script.popleft() if self.script else None
                scope = trio.CancelScope()
                self._active[message.request_id] = scope
                nursery.start_soon(self._serve_request, ws, message, scripted, scope)
            case Cancel(request_id):
                self._note("cancel", request_id)
                running = self._active.get(request_id)
                if running is not None and request_id not in self._ignoring:
                    running.cancel(reason="cancelled by the coordinator")

    async def _send(self, ws: trio_websocket.WebSocketConnection, message: Message) -> None:
        self.frames_sent += 1
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await ws.send_message(encode_frame(message))

    async def _heartbeat(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            await self._send(ws, Heartbeat())

    async def _serve_request(
        self,
        ws: trio_websocket.WebSocketConnection,
        request: InferenceRequest,
        scripted: Behaviour | None,
        scope: trio.CancelScope,
    ) -> None:
        rid = request.request_id
        try:
            with scope:
                body, sealer = open_request(self._key, request.encrypted_body)
                payload = json.loads(body)
                # A scripted behaviour first, then the model's own, then the default.
                behaviour = scripted or self._drawn() or self.model_behaviours.get(
                    str(payload.get("model")), self.behaviour)
                if behaviour.ignore_cancel:
                    self._ignoring.add(rid)
                self.received.append(payload)
                self._note("received", rid)
                await self._play(ws, rid, payload, behaviour, sealer)
        except DecryptError:
            self._note("error", rid)
            await self._send(ws, InferenceError(rid, "request did not decrypt", 400))
        finally:
            self._active.pop(rid, None)
            self._ignoring.discard(rid)

    async def _play(
        self,
        ws: trio_websocket.WebSocketConnection,
        rid: str,
        body: dict[str, Any],
        behaviour: Behaviour,
        sealer: ResponseSealer,
    ) -> None:
        model = str(body.get("model", ""))
        actions = play(
            body, behaviour, provider_id=self.provider_id, request_id=rid, rng=self._rng,
            pace=Pace(self.decode_tps, self.prefill_tps) if self.pace else Pace(),
            template=self.templates.get(model), version=self.version)
        batch = self.events_per_frame if not (self.pace or behaviour.token_interval) else 1
        held: list[str] = []
        async with contextlib.aclosing(actions):
            async for action in actions:
                if held and (not isinstance(action, Chunk) or len(held) >= batch):
                    await self._send(ws, self._batch_frame(rid, held, sealer))
                    held = []
                match action:
                    case Accepted():
                        await self._send(ws, InferenceAccepted(rid))
                    case Chunk(text, None) if batch > 1:
                        held.append(text)
                    case Chunk(text, corrupt):
                        await self._send(ws, self._chunk_frame(rid, text, corrupt, sealer))
                    case Error(status, message):
                        self._note("error", rid)
                        await self._send(ws, InferenceError(rid, message, status))
                    case Crash():
                        self._note("closed", rid)
                        await ws.aclose(1011, "simulated crash")
                    case Complete(prompt_tokens, completion_tokens, _):
                        self._note("complete", rid)
                        await self._send(ws, InferenceComplete(
                            rid, Usage(prompt_tokens, completion_tokens)))

    def _batch_frame(self, rid: str, texts: list[str],
                     sealer: ResponseSealer) -> InferenceResponseChunk:
        """Several events in one frame: SSE framing, one encryption."""
        payload = "".join(f"data: {text}\n\n" for text in texts)
        if not self.encrypt:
            return InferenceResponseChunk(rid, data=payload)
        return InferenceResponseChunk(rid, encrypted_data=sealer.seal(payload))

    def _chunk_frame(
        self, rid: str, text: str, corrupt: str | None, sealer: ResponseSealer
    ) -> InferenceResponseChunk:
        if self.sse_chunks:
            text = f"data: {text}\n\n"
        if corrupt == "plaintext" or not self.encrypt:
            return InferenceResponseChunk(rid, data=text)
        if corrupt == "garbage":
            return InferenceResponseChunk(rid, encrypted_data=EncryptedPayload(
                sealer.provider_public_key, _b64(b"\0" * 40)))
        return InferenceResponseChunk(rid, encrypted_data=sealer.seal(text))

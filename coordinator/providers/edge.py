"""The provider edge: admit a WebSocket, register it, read its frames until it goes.

Admission: the first frame must be ``register`` with a configured provider
token, an X25519 ``public_key`` and an Ed25519 ``signing_public_key``; the
provider must then sign a fresh challenge. Anything else closes the socket
with 1008 (policy violation) before the registry ever hears of it. Admitted
providers are challenged again every ``challenge_interval`` seconds.

After admission, one malformed frame is logged, counted and skipped; it never
ends the connection or touches another request.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets

import attrs
import trio
import trio_websocket

from coordinator.config import Config
from coordinator.metrics import Metrics
from coordinator.protocol import (
    AttestationChallenge,
    AttestationResponse,
    FrameError,
    Heartbeat,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceResponseChunk,
    Register,
    decode_frame,
    encode_frame,
    verify_challenge,
)
from coordinator.protocol.crypto import load_public_key
from coordinator.providers.connection import ProviderConnection
from coordinator.registry.actor import RegistryClient
from coordinator.registry.table import ProviderRecord
from coordinator.registry.versions import parse_version

log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008
_sessions = itertools.count(1)


class AdmissionError(Exception):
    pass


@attrs.define(eq=False)
class ProviderEdge:
    config: Config
    registry: RegistryClient
    metrics: Metrics

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        """trio-websocket handler: one call per provider connection."""
        ws = await request.accept()
        try:
            register = await self._admit(ws)
        except AdmissionError as exc:
            log.warning("provider refused: %s", exc)
            with trio.move_on_after(1):
                await ws.aclose(POLICY_VIOLATION, str(exc)[:120])
            return
        except trio_websocket.ConnectionClosed:
            return
        await self._serve_admitted(ws, register)

    async def _admit(self, ws: trio_websocket.WebSocketConnection) -> Register:
        message = await self._next_frame(ws, self.config.register_timeout, "register")
        if not isinstance(message, Register):
            raise AdmissionError(f"expected register, got {type(message).__name__}")
        # No configured token admits nobody: a coordinator is never open by accident.
        if not any(
            secrets.compare_digest(message.auth_token, t) for t in self.config.provider_tokens
        ):
            raise AdmissionError("invalid provider token")
        try:
            load_public_key(message.public_key)
        except ValueError as exc:
            raise AdmissionError(f"bad public_key: {exc}") from None
        if not message.signing_public_key:
            raise AdmissionError("register carries no signing_public_key")
        if not await self._challenge(ws, message.signing_public_key, None):
            raise AdmissionError("challenge not answered with a valid signature")
        return message

    async def _next_frame(
        self, ws: trio_websocket.WebSocketConnection, budget: float, what: str
    ) -> object:
        with trio.move_on_after(budget):
            raw = await ws.get_message()
            try:
                return decode_frame(raw, max_bytes=self.config.max_frame_bytes)
            except FrameError as exc:
                raise AdmissionError(str(exc)) from None
        raise AdmissionError(f"no {what} within {budget:g}s")

    async def _challenge(
        self,
        ws: trio_websocket.WebSocketConnection,
        signing_key: str,
        answers: trio.MemoryReceiveChannel[AttestationResponse] | None,
    ) -> bool:
        """Send a fresh nonce; True when the answer is signed by ``signing_key``."""
        nonce = secrets.token_hex(16)
        timestamp = trio.current_time()
        await ws.send_message(
            encode_frame(AttestationChallenge(nonce=nonce, timestamp=timestamp))
        )
        with trio.move_on_after(self.config.challenge_timeout):
            while True:
                if answers is None:
                    frame = await self._next_frame(ws, self.config.challenge_timeout, "answer")
                else:
                    frame = await answers.receive()
                if isinstance(frame, AttestationResponse) and frame.nonce == nonce:
                    return verify_challenge(signing_key, nonce, timestamp, frame.signature)
        return False

    async def _serve_admitted(
        self, ws: trio_websocket.WebSocketConnection, register: Register
    ) -> None:
        provider_id = register.provider_id or _key_id(register.public_key)
        connection = ProviderConnection(
            provider_id=provider_id,
            session=next(_sessions),
            ws=ws,
            public_key=load_public_key(register.public_key),
            encrypted_chunks=register.encrypted_response_chunks,
            stream_buffer=self.config.request_buffer_chunks,
        )
        record = ProviderRecord(
            provider_id=provider_id,
            session=connection.session,
            version_text=register.version,
            version=parse_version(register.version),
            models={m.id: m for m in register.models},
            memory_gb=register.hardware.memory_gb,
            decode_tps=register.decode_tps,
            prefill_tps=register.prefill_tps,
            max_slots=register.max_concurrency or self.config.default_provider_slots,
            connection=connection,
            hardware=f"{register.hardware.machine_model} {register.hardware.chip_name}".strip(),
        )
        answers_in, answers = trio.open_memory_channel[AttestationResponse](4)
        await self.registry.register(record)
        log.info("provider %s v%s registered (session %d, %d models)", provider_id,
                 register.version, connection.session, len(register.models))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_supersede, connection, nursery.cancel_scope)
                nursery.start_soon(
                    self._rechallenge, ws, register.signing_public_key or "", answers,
                    nursery.cancel_scope)
                await self.read_frames(connection, answers_in)
                nursery.cancel_scope.cancel()
        finally:
            connection.close_all()
            with trio.CancelScope(shield=True):
                await self.registry.unregister(provider_id, connection.session)
                with trio.move_on_after(1):
                    await ws.aclose()
            log.info("provider %s session %d gone", provider_id, connection.session)

    async def _watch_supersede(self, connection: ProviderConnection, scope: trio.CancelScope) -> None:
        await connection.superseded.wait()
        log.info("provider %s session %d superseded by a newer one", connection.provider_id,
                 connection.session)
        scope.cancel()

    async def _rechallenge(
        self,
        ws: trio_websocket.WebSocketConnection,
        signing_key: str,
        answers: trio.MemoryReceiveChannel[AttestationResponse],
        scope: trio.CancelScope,
    ) -> None:
        while True:
            await trio.sleep(self.config.challenge_interval)
            try:
                ok = await self._challenge(ws, signing_key, answers)
            except trio_websocket.ConnectionClosed:
                return
            if not ok:
                log.warning("provider failed a periodic challenge; closing")
                with trio.move_on_after(1):
                    await ws.aclose(POLICY_VIOLATION, "challenge failed")
                scope.cancel()
                return

    async def read_frames(
        self,
        connection: ProviderConnection,
        answers: trio.MemorySendChannel[AttestationResponse],
    ) -> None:
        """Route frames until the socket closes or goes silent past the liveness budget."""
        ws = connection.ws
        budget = self.config.heartbeat_timeout
        # One liveness scope for the connection; every frame moves its deadline
        # (cheaper on this per-chunk path than a new scope per frame).
        with trio.CancelScope(deadline=trio.current_time() + budget) as idle:
            while True:
                try:
                    raw = await ws.get_message()
                except trio_websocket.ConnectionClosed:
                    return
                idle.deadline = trio.current_time() + budget
                self._on_frame(connection, raw, answers)
        log.warning("provider %s silent for %gs; closing", connection.provider_id, budget)

    def _on_frame(
        self,
        connection: ProviderConnection,
        raw: str | bytes,
        answers: trio.MemorySendChannel[AttestationResponse],
    ) -> None:
        try:
            message = decode_frame(raw, max_bytes=self.config.max_frame_bytes)
        except FrameError as exc:
            self._reject(connection, "malformed", str(exc))
            return
        match message:
            case InferenceResponseChunk() | InferenceAccepted() | InferenceComplete() | InferenceError():
                if not connection.deliver(message.request_id, message):
                    # Late frames for a cancelled request are expected; count, don't log.
                    self.metrics.frames_rejected.labels("unknown_request").inc()
            case Heartbeat():
                pass  # any frame resets the liveness budget
            case AttestationResponse():
                try:
                    answers.send_nowait(message)
                except trio.WouldBlock:
                    self._reject(connection, "unsolicited", "unsolicited attestation response")
            case _:
                self._reject(connection, "unexpected", f"unexpected {type(message).__name__}")

    def _reject(self, connection: ProviderConnection, reason: str, detail: str) -> None:
        self.metrics.frames_rejected.labels(reason).inc()
        log.warning("provider %s: rejected frame (%s)", connection.provider_id, detail[:200])


def _key_id(public_key: str) -> str:
    return "p-" + hashlib.sha256(public_key.encode()).hexdigest()[:12]

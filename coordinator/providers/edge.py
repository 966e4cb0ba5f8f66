"""The provider edge: admit a WebSocket, register it, read its frames until it goes.

Admission (docs/protocol.md): the first frame must be ``register`` within
``register_timeout`` and at most ``register_frame_bytes`` long, with a
configured provider token, an X25519 ``public_key``, an Ed25519
``signing_public_key`` and claims that pass :mod:`.admission`; the provider
must then sign a fresh challenge covering its encryption key, and its id must
be bound to the key it proved (:mod:`.identity`). Anything else closes the
socket with 1008 (policy violation) before the registry ever hears of it. At
most ``max_pending_providers`` sockets may be in admission at once; more are
refused at the handshake with 503. A provider that sends its token in the upgrade
request (``Authorization: Bearer``) has ``max_pending_providers`` places of its own,
so sockets that never register cannot keep it out. Admitted providers are
challenged again every ``challenge_interval`` seconds.

After admission, one malformed frame is logged, counted and skipped; a frame
that names one of this connection's requests but is malformed fails that
request (and only it). Nothing one connection sends can end another or the
listener: the handler never lets an exception out.
"""

from __future__ import annotations

import itertools
import logging
import secrets

import attrs
import trio
import trio_websocket

from coordinator import sizes, wsio
from coordinator.capabilities import parse_version
from coordinator.config import Config
from coordinator.credentials import bearer_token, matches_any
from coordinator.lifecycle import Drain
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
from coordinator.protocol.crypto import (
    challenge_key,
    load_public_key,
    load_verify_key,
    verify_key_proof,
)
from coordinator.providers import admission
from coordinator.providers.admission import AdmissionError
from coordinator.providers.connection import Directory, ProviderConnection, ProviderSocket
from coordinator.providers.identity import IdentityBook, PinStoreUnavailable, Session, SharedPins
from coordinator.registry.actor import RegistryClient
from coordinator.registry.state import RegisterRefused
from coordinator.registry.table import ProviderRecord
from coordinator.untrusted import printable

log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 503
LOGGED_REJECTIONS = 10  # rejected frames a session may have logged (all are counted)
_sessions = itertools.count(1)


@attrs.frozen
class _Admitted:
    register: Register
    session: Session
    new_pin: tuple[str, str] | None  # (id, key) when this admission made the pin


@attrs.define(eq=False, kw_only=True)
class ProviderEdge:
    # Collaborators are named and required: a private default would split their state.
    config: Config
    registry: RegistryClient
    metrics: Metrics
    identities: IdentityBook
    drain: Drain
    directory: Directory
    pins: SharedPins | None  # with several instances: the fleet-wide pins
    pending: int = 0  # sockets in admission now, without a token in the upgrade request
    pending_proven: int = 0  # and with one (their own places: never starved by the others)
    # The sockets of the providers admitted here (the directory also holds providers
    # connected to other instances, whose sockets are not ours to close).
    admitted: set[trio_websocket.WebSocketConnection] = attrs.field(factory=set)

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        """trio-websocket handler: one call per provider connection. Never raises."""
        try:
            await self._handle(request)
        except trio_websocket.ConnectionClosed:
            pass
        except Exception:
            # A bug in this connection's handling ends this connection only.
            log.error("provider connection handler failed", exc_info=True)

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        # A wrong token earns no places of its own; `register` refuses it as before.
        proven = matches_any(bearer_token(request.headers) or "", self.config.provider_tokens)
        waiting = self.pending_proven if proven else self.pending
        if waiting >= self.config.max_pending_providers or self.drain.draining:
            self.metrics.frames_rejected.labels("admission_full").inc()
            await request.reject(TRY_AGAIN_LATER, body=b"not admitting providers now")
            return
        self._count_pending(proven, +1)
        try:
            ws = await request.accept()
            admitted = await self._admit_or_close(ws)
        finally:
            self._count_pending(proven, -1)
        if admitted is not None:
            await self._serve_admitted(ws, admitted)

    def _count_pending(self, proven: bool, change: int) -> None:
        if proven:
            self.pending_proven += change
        else:
            self.pending += change

    async def _admit_or_close(self, ws: trio_websocket.WebSocketConnection) -> _Admitted | None:
        try:
            return await self._admit(ws)
        except AdmissionError as exc:
            reason = printable(str(exc), 120)
            log.warning("provider refused: %s", reason)
            await _close(ws, POLICY_VIOLATION, reason, self.config.close_timeout)
            return None

    async def _admit(self, ws: trio_websocket.WebSocketConnection) -> _Admitted:
        message = await self._next_frame(ws, self.config.register_timeout, "register",
                                         self.config.register_frame_bytes)
        if not isinstance(message, Register):
            raise AdmissionError(f"expected register, got {type(message).__name__}")
        # No configured token admits nobody: a coordinator is never open by accident.
        if not matches_any(message.auth_token, self.config.provider_tokens):
            raise AdmissionError("invalid provider token")
        try:
            load_public_key(message.public_key)
            load_verify_key(message.signing_public_key or "")
        except ValueError as exc:
            raise AdmissionError(f"bad public_key or signing_public_key: {exc}") from None
        admission.check_register(message, self.config)
        signing_key = message.signing_public_key or ""
        problem = await self._challenge(ws, signing_key, message.public_key, None)
        if problem is not None:
            raise AdmissionError(problem)
        new_pin = None
        if self.pins is not None and self.identities.pinnable(message.provider_id):
            provider_id = message.provider_id or ""
            # A key refused for a live session must never become the pin: asked first.
            self.identities.check_live(provider_id, signing_key, message.public_key)
            if await self._claim_shared(provider_id, signing_key):
                new_pin = (provider_id, signing_key)
        try:
            session = self.identities.admit(message.provider_id, next(_sessions), signing_key,
                                            message.public_key)
        except AdmissionError:
            await self._undo_pin(new_pin)
            raise
        wsio.allow_large_messages(ws, sizes.provider_socket_limit(self.config.max_frame_bytes))
        return _Admitted(message, session, new_pin)

    async def _claim_shared(self, provider_id: str, signing_key: str) -> bool:
        """Pin an explicit id fleet-wide before this instance's checks (identity.py);
        whether this claim made the pin."""
        assert self.pins is not None
        try:
            claim = await self.pins.claim_pin(provider_id, signing_key,
                                              self.config.max_identity_pins)
        except PinStoreUnavailable:
            # Fail closed, even for a key this instance saw bound to the id: an operator
            # may have unpinned it elsewhere since (a key thought compromised, say).
            raise AdmissionError("the identity store is unavailable; try again") from None
        if claim is None:
            raise AdmissionError("no room for another provider identity")
        self.identities.adopt_pin(provider_id, claim.key)
        return claim.created

    async def _undo_pin(self, new_pin: tuple[str, str] | None) -> None:
        """A pin this admission made, for a provider then refused, is taken back."""
        if new_pin is None or self.pins is None:
            return
        provider_id, signing_key = new_pin
        self.identities.unpin_if(provider_id, signing_key)
        with trio.CancelScope(shield=True):
            try:
                await self.pins.release_pin(provider_id, signing_key)
            except PinStoreUnavailable:
                log.warning("could not take back the pin of refused provider %s (the identity "
                            "store is unavailable); an operator may unpin it",
                            printable(provider_id))

    async def _next_frame(
        self, ws: trio_websocket.WebSocketConnection, budget: float, what: str,
        max_bytes: int,
    ) -> object:
        with trio.move_on_after(budget):
            raw = await ws.get_message()
            try:
                return decode_frame(raw, max_bytes=max_bytes)
            except FrameError as exc:
                raise AdmissionError(str(exc)) from None
        raise AdmissionError(f"no {what} within {budget:g}s")

    async def _challenge(
        self,
        ws: trio_websocket.WebSocketConnection,
        signing_key: str,
        public_key: str,
        answers: trio.MemoryReceiveChannel[AttestationResponse] | None,
    ) -> str | None:
        """Send a fresh nonce; None when the answer is signed by ``signing_key`` and proves
        the private half of ``public_key``, else why not."""
        nonce = secrets.token_hex(16)
        timestamp = round(trio.current_time() * 1000)
        proof_key, proof_key_text = challenge_key()
        await ws.send_message(encode_frame(AttestationChallenge(
            nonce=nonce, timestamp=timestamp, key=proof_key_text)))
        with trio.move_on_after(self.config.challenge_timeout):
            while True:
                if answers is None:
                    frame = await self._next_frame(ws, self.config.challenge_timeout, "answer",
                                                   self.config.register_frame_bytes)
                else:
                    frame = await answers.receive()
                if isinstance(frame, AttestationResponse) and frame.nonce == nonce:
                    if not verify_challenge(signing_key, nonce, timestamp, public_key,
                                            frame.signature):
                        return "challenge answered with an invalid signature"
                    if not verify_key_proof(proof_key, public_key, nonce, frame.key_proof):
                        return "challenge answered without proof of holding public_key"
                    return None
        return f"challenge not answered within {self.config.challenge_timeout:g}s"

    async def _serve_admitted(self, ws: trio_websocket.WebSocketConnection,
                              admitted: _Admitted) -> None:
        register, session = admitted.register, admitted.session
        provider_id = session.provider_id
        connection = ProviderConnection(
            provider_id=provider_id,
            session=session.session,
            transport=ProviderSocket(ws),
            public_key=load_public_key(register.public_key),
            encrypted_chunks=register.encrypted_response_chunks,
            stream_buffer=self.config.request_buffer_chunks,
            stream_buffer_bytes=self.config.request_buffer_bytes,
        )
        record = ProviderRecord(
            provider_id=provider_id,
            session=connection.session,
            version_text=register.version,
            version=parse_version(register.version),
            models=admission.unique_models(register),
            memory_gb=admission.clamp(register.hardware.memory_gb, admission.MAX_MEMORY_GB),
            decode_tps=admission.clamp(register.decode_tps, admission.MAX_DECODE_TPS),
            prefill_tps=admission.clamp(register.prefill_tps, admission.MAX_PREFILL_TPS),
            max_slots=admission.slots(register, self.config),
            max_request_bytes=admission.request_limit(register),
            hardware=admission.hardware_label(register),
            signing_key=session.signing_key,
            public_key=session.public_key,
            encrypted_chunks=register.encrypted_response_chunks,
        )
        answers_in, answers = trio.open_memory_channel[AttestationResponse](4)
        try:
            self.directory.add(connection)
            self.admitted.add(ws)
            try:
                superseded = await self.registry.register(record)
            except RegisterRefused as exc:
                reason = printable(str(exc), 120)
                log.warning("provider %s refused by the registry: %s", provider_id, reason)
                await self._undo_pin(admitted.new_pin)
                await _close(ws, POLICY_VIOLATION, reason, self.config.close_timeout)
                return
            if superseded is not None:
                old = self.directory.get(provider_id, superseded)
                if old is not None:
                    old.supersede()
            log.info("provider %s v%s registered (session %d, %d models)", provider_id,
                     register.version, connection.session, len(record.models))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_supersede, connection, nursery.cancel_scope)
                nursery.start_soon(
                    self._rechallenge, ws, session.signing_key, register.public_key, answers,
                    nursery.cancel_scope)
                await self.read_frames(ws, connection, answers_in)
                nursery.cancel_scope.cancel(reason="the provider left")
        finally:
            # The id is free again before the registry forgets the provider, so
            # whoever sees it gone may at once register under it.
            self.identities.leave(session)
            self.directory.remove(connection)
            self.admitted.discard(ws)
            connection.close_all()
            with trio.CancelScope(shield=True):
                await self.registry.unregister(provider_id, connection.session)
                await _close(ws, 1000, "", self.config.close_timeout)
            log.info("provider %s session %d gone", provider_id, connection.session)

    async def close_all(self, code: int, reason: str) -> None:
        """Close every admitted provider's socket with ``code`` (shutdown: 1001, going away)."""
        async with trio.open_nursery() as nursery:
            for ws in list(self.admitted):
                nursery.start_soon(_close, ws, code, reason, self.config.close_timeout)

    async def _watch_supersede(self, connection: ProviderConnection, scope: trio.CancelScope) -> None:
        await connection.superseded.wait()
        log.info("provider %s session %d superseded by a newer one", connection.provider_id,
                 connection.session)
        scope.cancel(reason="superseded by a newer session")

    async def _rechallenge(
        self,
        ws: trio_websocket.WebSocketConnection,
        signing_key: str,
        public_key: str,
        answers: trio.MemoryReceiveChannel[AttestationResponse],
        scope: trio.CancelScope,
    ) -> None:
        while True:
            await trio.sleep(self.config.challenge_interval)
            try:
                problem = await self._challenge(ws, signing_key, public_key, answers)
            except trio_websocket.ConnectionClosed:
                return
            if problem is not None:
                log.warning("provider failed a periodic challenge (%s); closing", problem)
                await _close(ws, POLICY_VIOLATION, problem, self.config.close_timeout)
                scope.cancel(reason="failed a periodic challenge")
                return

    async def read_frames(
        self,
        ws: trio_websocket.WebSocketConnection,
        connection: ProviderConnection,
        answers: trio.MemorySendChannel[AttestationResponse],
    ) -> None:
        """Route ``ws``'s frames until it closes or goes silent past the liveness budget."""
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
                try:
                    self._on_frame(connection, raw, answers)
                except Exception:
                    # A frame the code did not foresee costs that frame, not the connection.
                    self.metrics.frames_rejected.labels("internal").inc()
                    log.error("provider %s: frame handling failed", connection.provider_id,
                              exc_info=True)
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
            if exc.request_id is not None:
                # The frame names one of this provider's requests: that request
                # fails (before content it fails over), nothing else notices.
                connection.deliver(exc.request_id, InferenceError(
                    exc.request_id, f"malformed frame from the provider: {exc}"[:300], 502))
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
        # Logged for the first few of a session, counted for all: a provider sending
        # garbage in a loop must not fill the operator's disk (500 frames, 65 KB of log).
        connection.rejected += 1
        if connection.rejected <= LOGGED_REJECTIONS:
            log.warning("provider %s: rejected frame (%s)", connection.provider_id,
                        printable(detail))
        if connection.rejected == LOGGED_REJECTIONS:
            log.warning("provider %s: further rejected frames of this session are counted "
                        "(coordinator_provider_frames_rejected_total), not logged",
                        connection.provider_id)


async def _close(ws: trio_websocket.WebSocketConnection, code: int, reason: str,
                 wait: float) -> None:
    """Close with ``code``, waiting at most ``wait`` seconds for the peer's close reply."""
    with trio.move_on_after(wait):
        await ws.aclose(code, reason)



"""A simulated provider: the shared provider client (``provider_link``) with a scripted backend.

It registers, answers challenges, heartbeats and seals its answers exactly as
every provider does (:class:`provider_link.client.ProviderClient`); what it
answers each request is scripted by its :class:`Behaviour` (:mod:`.script`).
Everything it was sent is recorded for tests to assert on.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Any

import attrs
import nacl.public
import nacl.signing
import trio

from coordinator.protocol import Hardware, ModelInfo, Register
from provider_link.actions import Action, Chunk
from provider_link.client import ProviderClient
from provider_link.keys import ProviderKeys

from .behaviours import HEALTHY, Behaviour
from .script import Pace, play

log = logging.getLogger(__name__)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _to_deque(items: Iterable[Behaviour]) -> deque[Behaviour]:
    return deque(items)


@attrs.define(eq=False)
class SimProvider(ProviderClient):
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
    # (virtual time, event, wire request id): received, cancel, complete, error, closed.
    log: list[tuple[float, str, str]] = attrs.field(factory=list)
    # Replaced whenever something above is recorded, so tests can wait on it.
    activity: trio.Event = attrs.field(factory=trio.Event)
    _key: nacl.public.PrivateKey = attrs.field(factory=nacl.public.PrivateKey.generate)
    _signing: nacl.signing.SigningKey = attrs.field(factory=nacl.signing.SigningKey.generate)
    _ignoring: set[str] = attrs.field(factory=set)
    _rng: random.Random = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def name(self) -> str:
        return self.provider_id

    @property
    def keys(self) -> ProviderKeys:
        return ProviderKeys(self._signing, self._key)

    def use_keys(self, keys: ProviderKeys) -> None:
        """Prove ``keys`` from the next connection on (a fleet's key directory)."""
        self._signing, self._key = keys.signing, keys.encryption

    def challenge_signer(self) -> nacl.signing.SigningKey:
        return self.sign_with or self._signing

    def may_cancel(self, request_id: str) -> bool:
        return request_id not in self._ignoring

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

    def note(self, event: str, request_id: str) -> None:
        if event != "closed" or request_id:  # a closed socket is recorded by its fields
            self.log.append((trio.current_time(), event, request_id))
        self._touch()

    def _touch(self) -> None:
        self.activity.set()
        self.activity = trio.Event()

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

    def receive_limit(self) -> int:
        return self.max_request_bytes

    async def answer(self, request_id: str, body: dict[str, Any],
                     send: Callable[[Action], Awaitable[None]]) -> None:
        scripted = self.script.popleft() if self.script else None
        # A scripted behaviour first, then the model's own, then the default.
        behaviour = scripted or self._drawn() or self.model_behaviours.get(
            str(body.get("model")), self.behaviour)
        if behaviour.ignore_cancel:
            self._ignoring.add(request_id)
        self.received.append(body)
        self.note("received", request_id)
        try:
            async with contextlib.aclosing(self._play(request_id, body, behaviour)) as actions:
                async for action in actions:  # a script of sleeps only: no scope crosses a yield
                    await send(action)
        finally:
            self._ignoring.discard(request_id)

    async def _play(self, rid: str, body: dict[str, Any],
                    behaviour: Behaviour) -> AsyncGenerator[Action, None]:
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
                    yield Chunk("".join(f"data: {text}\n\n" for text in held))
                    held = []
                match action:
                    case Chunk(text, None) if batch > 1:
                        held.append(text)
                    case Chunk(text, corrupt) if self.sse_chunks:
                        yield Chunk(f"data: {text}\n\n", corrupt)
                    case _:
                        yield action

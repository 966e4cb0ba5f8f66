"""What a provider's event means to the engine: one observation of :mod:`.race`. Pure.

Decrypting and parsing happen here, once per chunk, for both sides of the
commit: before it the racer steps its state machine with the observation;
after it the relay forwards the events or ends the stream.
"""

from __future__ import annotations

from coordinator.protocol import (
    DecryptError,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceResponseChunk,
    RequestCipher,
)
from coordinator.protocol.endpoints import Endpoint
from coordinator.providers.connection import ProviderEvent

from .chunks import ChunkError, parse_chunk
from .race import Accepted, Broken, Completed, Errored, Events, Observation


def observe(event: ProviderEvent, endpoint: Endpoint, cipher: RequestCipher,
            encrypted: bool, *, classify: bool = True) -> Observation:
    """``classify``: whether a chunk's kind matters (before the commit; after it, every
    event is simply relayed)."""
    match event:
        case InferenceAccepted():
            return Accepted()
        case InferenceResponseChunk():
            try:
                chunk = parse_chunk(endpoint, _plaintext(event, cipher, encrypted),
                                    classify=classify)
            except (DecryptError, ChunkError) as exc:
                return Broken(f"bad response chunk: {exc}")
            return Events(chunk.kind, chunk.events)
        case InferenceComplete():
            return Completed(event.usage)
        case InferenceError():
            return Errored(event.status_code, provider_message(event.error))


def _plaintext(chunk: InferenceResponseChunk, cipher: RequestCipher, encrypted: bool) -> str:
    """The chunk's text; DecryptError for anything a provider must not send."""
    if chunk.encrypted_data is not None:
        return cipher.open_chunk(chunk.encrypted_data)
    if encrypted:
        raise DecryptError("plaintext chunk from a provider that declared encryption")
    if chunk.data is None:
        raise DecryptError("chunk carries no data")
    return chunk.data


def provider_message(text: str, limit: int = 300) -> str:
    """A provider's error text as consumers and the status page see it: printable and
    bounded. Logs hold it only at DEBUG, through ``untrusted.printable`` (it may quote
    the prompt)."""
    cleaned = "".join(c if c.isprintable() else " " for c in text[:limit]).strip()
    return cleaned or "provider error"

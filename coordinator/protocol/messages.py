"""Protocol messages: attrs classes, one cattrs converter, one frame codec.

Every frame is a JSON text object with a ``type`` discriminator. Decoding is
strict (unknown type, wrong field types, oversized frames all raise
:class:`FrameError`) so the provider edge can reject one frame and keep the
connection; unknown *fields* are ignored so newer providers can add some.
Optional fields are omitted on encode when unset: ``template_render_ok`` is
tri-state and ``false`` must go on the wire, ``None`` must not.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from coordinator.protocol import boundedjson
from coordinator.untrusted import printable as short

MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
# How much of an unknown frame type an error message (and so a log line) quotes.
TYPE_EXCERPT: Final = 40
# Token counts above this are not counts; a provider reporting one is broken.
MAX_USAGE_TOKENS: Final = 10**9


class FrameError(ValueError):
    """A frame that cannot be turned into a message. Reject it, keep the socket.

    ``request_id`` is set when the frame names a request it belongs to (a
    well-formed JSON object with a string ``request_id`` whose other fields
    are wrong): the edge then fails that request, and only that one.
    """

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _token_count(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= MAX_USAGE_TOKENS:
        raise ValueError(f"{attribute.name} {value} is outside 0..{MAX_USAGE_TOKENS}")


def _http_status(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if not 100 <= value <= 599:
        raise ValueError(f"{attribute.name} {value} is not an HTTP status")


@attrs.frozen
class Hardware:
    machine_model: str = ""
    chip_name: str = ""
    memory_gb: float = 0.0


@attrs.frozen
class ModelInfo:
    id: str
    size_bytes: int = 0
    model_type: str = ""
    quantization: str = ""
    is_vision: bool | None = None
    # Tri-state: None = no opinion (old provider), False = fenced off.
    template_render_ok: bool | None = None
    # The inference endpoints this model is served on ("/v1/chat/completions", …);
    # None (a provider that does not say): every one.
    endpoints: tuple[str, ...] | None = None


@attrs.frozen
class EncryptedPayload:
    ephemeral_public_key: str
    ciphertext: str


@attrs.frozen
class Usage:
    prompt_tokens: int = attrs.field(default=0, validator=_token_count)
    completion_tokens: int = attrs.field(default=0, validator=_token_count)


# ---- provider -> coordinator -------------------------------------------------


@attrs.frozen
class Register:
    TYPE = "register"
    hardware: Hardware
    models: tuple[ModelInfo, ...]
    backend: str
    version: str
    public_key: str
    auth_token: str
    encrypted_response_chunks: bool = True
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    # Extensions of this coordinator (documented in docs/protocol.md).
    provider_id: str | None = None
    signing_public_key: str | None = None
    max_concurrency: int | None = None
    # The largest inference_request frame (bytes) this provider accepts.
    max_request_bytes: int | None = None


@attrs.frozen
class Heartbeat:
    TYPE = "heartbeat"


@attrs.frozen
class InferenceAccepted:
    TYPE = "inference_accepted"
    request_id: str


@attrs.frozen
class InferenceResponseChunk:
    TYPE = "inference_response_chunk"
    request_id: str
    data: str | None = None
    encrypted_data: EncryptedPayload | None = None


@attrs.frozen
class InferenceComplete:
    TYPE = "inference_complete"
    request_id: str
    usage: Usage = Usage()


@attrs.frozen
class InferenceError:
    TYPE = "inference_error"
    request_id: str
    error: str
    status_code: int = attrs.field(default=500, validator=_http_status)


@attrs.frozen
class AttestationResponse:
    TYPE = "attestation_response"
    nonce: str
    signature: str
    # The nonce boxed from the registered X25519 key to the challenge's ``key``:
    # proof that the provider holds the private half of the key it registered.
    key_proof: str = ""


# ---- coordinator -> provider -------------------------------------------------


@attrs.frozen
class InferenceRequest:
    TYPE = "inference_request"
    request_id: str
    encrypted_body: EncryptedPayload


@attrs.frozen
class Cancel:
    TYPE = "cancel"
    request_id: str


@attrs.frozen
class AttestationChallenge:
    TYPE = "attestation_challenge"
    nonce: str
    # Integer milliseconds: its decimal text is what gets signed, the same in
    # every language (docs/protocol.md, admission).
    timestamp: int
    # A fresh X25519 public key (base64) of the coordinator's, for the key proof.
    key: str = ""


Message = (
    Register
    | Heartbeat
    | InferenceAccepted
    | InferenceResponseChunk
    | InferenceComplete
    | InferenceError
    | AttestationResponse
    | InferenceRequest
    | Cancel
    | AttestationChallenge
)

_MESSAGE_TYPES: Final[dict[str, type[Any]]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        Heartbeat,
        InferenceAccepted,
        InferenceResponseChunk,
        InferenceComplete,
        InferenceError,
        AttestationResponse,
        InferenceRequest,
        Cancel,
        AttestationChallenge,
    )
}


def _strict_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _strict_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _strict_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _strict_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _make_converter() -> cattrs.Converter:
    # cattrs' defaults coerce ("1" -> 1); a wire protocol wants types checked.
    conv = cattrs.Converter(forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(bool, _strict_bool)
    return conv


converter: Final = _make_converter()


def register_wire_types(*classes: type[Any]) -> None:
    """Give ``classes`` strict hooks on :data:`converter`; optional fields omitted when unset.

    Leaf classes first: a parent's hook captures its children's hooks when built.
    """
    for cls in classes:
        optional = {
            a.name: override(omit_if_default=True)
            for a in attrs.fields(cls)
            if a.default is None
        }
        converter.register_unstructure_hook(
            cls, make_dict_unstructure_fn(cls, converter, **optional)  # type: ignore[arg-type]
        )
        converter.register_structure_hook(cls, make_dict_structure_fn(cls, converter))


class Codec:
    """Frames of one protocol: JSON text objects whose ``type`` names one of ``types``."""

    def __init__(self, *types: type[Any]) -> None:
        self._types: dict[str, type[Any]] = {cls.TYPE: cls for cls in types}

    def encode(self, message: Any) -> str:
        """Serialize one message to a JSON text frame."""
        body: dict[str, Any] = converter.unstructure(message)
        return json.dumps({"type": message.TYPE, **body}, separators=(",", ":"))

    def decode(self, frame: str | bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Any:
        """Parse one frame; raise :class:`FrameError` with a short reason on anything off."""
        size = len(frame)
        if isinstance(frame, str) and size * 4 > max_bytes:  # a text limit is in UTF-8 bytes
            size = len(frame.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise FrameError(f"frame of {size} bytes exceeds the {max_bytes}-byte limit",
                             _leading_request_id(frame))
        try:
            # No depth limit here: the converter reads only known, shallow fields,
            # and the parser itself stops at its recursion limit.
            raw = boundedjson.loads_fast(frame)
        except boundedjson.JsonLimitError as exc:
            raise FrameError(f"malformed JSON: {short(str(exc))}",
                             _leading_request_id(frame)) from None
        if not isinstance(raw, dict):
            raise FrameError("frame is not a JSON object")
        kind = raw.pop("type", None)
        cls = self._types.get(kind) if isinstance(kind, str) else None
        if cls is None:
            # An excerpt names a newer frame type; a whole one may be a quoted prompt.
            raise FrameError(f"unknown message type {short(kind, TYPE_EXCERPT)}")
        try:
            return converter.structure(raw, cls)
        except (cattrs.BaseValidationError, TypeError, ValueError, KeyError) as exc:
            detail = "; ".join(cattrs.transform_error(exc)) if isinstance(
                exc, cattrs.BaseValidationError
            ) else str(exc)
            request_id = raw.get("request_id")
            raise FrameError(
                f"bad {short(kind)} frame: {short(detail)}",
                request_id if isinstance(request_id, str) else None,
            ) from None


register_wire_types(Hardware, ModelInfo, EncryptedPayload, Usage, *_MESSAGE_TYPES.values())
_PROVIDER_FRAMES: Final = Codec(*_MESSAGE_TYPES.values())


def encode_frame(message: Message) -> str:
    """Serialize one provider-protocol message to a JSON text frame."""
    return _PROVIDER_FRAMES.encode(message)


def decode_frame(frame: str | bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Parse one provider-protocol frame; raise :class:`FrameError` on anything off."""
    message: Message = _PROVIDER_FRAMES.decode(frame, max_bytes=max_bytes)
    return message


_LEADING_ID: Final = re.compile(r'^\{"type":"[a-z_]{1,40}","request_id":"([A-Za-z0-9._:-]{1,128})"')


def _leading_request_id(frame: str | bytes) -> str | None:
    """The request id a frame that cannot be parsed leads with, if it does as this codec writes it.

    Parsing a frame over the limit is what the limit avoids (and a malformed one
    cannot be parsed), but the request it belongs to should fail at once rather
    than wait for its budget to expire.
    """
    head = frame[:256]
    if isinstance(head, bytes):
        head = head.decode("ascii", "replace")
    match = _LEADING_ID.match(head)
    return match.group(1) if match else None

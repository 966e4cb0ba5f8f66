"""Wire protocol between the coordinator and provider machines.

Only this package knows field names on the wire. Nothing here does I/O.
"""

from coordinator.protocol.crypto import (
    DecryptError,
    RequestCipher,
    ResponseSealer,
    open_request,
    sign_challenge,
    verify_challenge,
)
from coordinator.protocol.messages import (
    MAX_FRAME_BYTES,
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
    Usage,
    decode_frame,
    encode_frame,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "AttestationChallenge",
    "AttestationResponse",
    "Cancel",
    "DecryptError",
    "EncryptedPayload",
    "FrameError",
    "Hardware",
    "Heartbeat",
    "InferenceAccepted",
    "InferenceComplete",
    "InferenceError",
    "InferenceRequest",
    "InferenceResponseChunk",
    "Message",
    "ModelInfo",
    "Register",
    "RequestCipher",
    "ResponseSealer",
    "Usage",
    "decode_frame",
    "encode_frame",
    "open_request",
    "sign_challenge",
    "verify_challenge",
]

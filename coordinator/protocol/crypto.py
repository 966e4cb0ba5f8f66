"""End-to-end encryption (NaCl box over X25519) and challenge signatures (Ed25519).

A request gets a fresh ephemeral key pair; the body is boxed to the provider's
registered public key and the provider boxes every response chunk back to the
ephemeral public key. Ciphertext on the wire is base64(24-byte nonce || box),
which is exactly what ``Box.encrypt`` returns. The shared key is computed once
per request (``Box`` precomputes it), so each chunk costs one secretbox open.
"""

from __future__ import annotations

import base64
import binascii

import attrs
import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from coordinator.protocol.messages import EncryptedPayload, InferenceRequest, encode_frame


class DecryptError(ValueError):
    """Ciphertext that is malformed, tampered with, or boxed to another key."""


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecryptError(f"bad base64: {exc}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_public_key(text: str) -> nacl.public.PublicKey:
    """Parse a base64 X25519 public key, raising ``ValueError`` when it is not one.

    A key of the right length can still be unusable (all zeros, or another
    point of low order): libsodium then refuses every box to it, so it is
    refused here, once, rather than in every request routed to it.
    """
    raw = _b64decode(text)
    if len(raw) != nacl.public.PublicKey.SIZE:
        raise ValueError(f"public key must be {nacl.public.PublicKey.SIZE} bytes")
    key = nacl.public.PublicKey(raw)
    try:
        nacl.public.Box(_PROBE, key)
    except nacl.exceptions.CryptoError:
        raise ValueError("public key is not a usable X25519 key") from None
    return key


_PROBE = nacl.public.PrivateKey.generate()


# A box adds a 24-byte nonce and a 16-byte MAC; the ephemeral key is 32 bytes.
BOX_OVERHEAD = nacl.public.Box.NONCE_SIZE + 16
EPHEMERAL_KEY_B64 = 44


def sealed_b64_bytes(plaintext_bytes: int) -> int:
    """Length of the base64 ciphertext of a ``plaintext_bytes``-long body."""
    return 4 * -(-(plaintext_bytes + BOX_OVERHEAD) // 3)


def _request_envelope_bytes() -> int:
    empty = InferenceRequest("", EncryptedPayload("A" * EPHEMERAL_KEY_B64, ""))
    return len(encode_frame(empty))


_REQUEST_ENVELOPE = _request_envelope_bytes()


def request_frame_bytes(request_id: str, plaintext_bytes: int) -> int:
    """The exact length of the ``inference_request`` frame carrying a sealed body.

    JSON escapes nothing in it: the id is the coordinator's own, the rest base64.
    """
    return _REQUEST_ENVELOPE + len(request_id) + sealed_b64_bytes(plaintext_bytes)


@attrs.define(eq=False)
class RequestCipher:
    """The coordinator's side of one request: seal the body, open the chunks."""

    provider_key: nacl.public.PublicKey
    _ephemeral: nacl.public.PrivateKey = attrs.field(factory=nacl.public.PrivateKey.generate)
    _box: nacl.public.Box = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._box = nacl.public.Box(self._ephemeral, self.provider_key)

    def seal_body(self, plaintext: bytes) -> EncryptedPayload:
        return EncryptedPayload(
            ephemeral_public_key=_b64(bytes(self._ephemeral.public_key)),
            ciphertext=_b64(bytes(self._box.encrypt(plaintext))),
        )

    def open_chunk(self, payload: EncryptedPayload) -> str:
        try:
            plain = self._box.decrypt(_b64decode(payload.ciphertext))
            return plain.decode("utf-8")
        except (nacl.exceptions.CryptoError, ValueError, UnicodeDecodeError) as exc:
            raise DecryptError(f"chunk does not decrypt: {exc}") from None


@attrs.define(eq=False)
class ResponseSealer:
    """The provider's side of one request: seal each chunk back to the requester."""

    provider_public_key: str
    _box: nacl.public.Box

    def seal(self, text: str) -> EncryptedPayload:
        return EncryptedPayload(
            ephemeral_public_key=self.provider_public_key,
            ciphertext=_b64(bytes(self._box.encrypt(text.encode("utf-8")))),
        )


def open_request(
    provider_key: nacl.public.PrivateKey, payload: EncryptedPayload
) -> tuple[bytes, ResponseSealer]:
    """Provider side: decrypt a request body; return it and a sealer for the replies."""
    try:
        requester = load_public_key(payload.ephemeral_public_key)
        box = nacl.public.Box(provider_key, requester)
        body = box.decrypt(_b64decode(payload.ciphertext))
    except (nacl.exceptions.CryptoError, ValueError) as exc:
        raise DecryptError(f"request does not decrypt: {exc}") from None
    sealer = ResponseSealer(_b64(bytes(provider_key.public_key)), box)
    return body, sealer


def challenge_text(nonce: str, timestamp: int, public_key: str) -> bytes:
    """The exact bytes a provider signs to answer a challenge.

    ``"<nonce>:<timestamp>:<public_key>"`` in UTF-8: the hex nonce, the
    integer timestamp in decimal, and the base64 X25519 key exactly as the
    provider registered it. Covering the encryption key binds it to the
    signing key, so no one can register somebody else's encryption key.
    """
    return f"{nonce}:{timestamp}:{public_key}".encode("utf-8", "surrogatepass")


def sign_challenge(
    key: nacl.signing.SigningKey, nonce: str, timestamp: int, public_key: str
) -> str:
    """Provider side: prove possession of the registered signing key."""
    return _b64(key.sign(challenge_text(nonce, timestamp, public_key)).signature)


def verify_challenge(
    verify_key_b64: str, nonce: str, timestamp: int, public_key: str, signature: str
) -> bool:
    """Coordinator side: True only for a valid signature by the registered key."""
    try:
        key = nacl.signing.VerifyKey(_b64decode(verify_key_b64))
        key.verify(challenge_text(nonce, timestamp, public_key), _b64decode(signature))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        return False
    return True


def challenge_key() -> tuple[nacl.public.PrivateKey, str]:
    """A fresh X25519 key for one challenge, and its public half as sent (base64)."""
    key = nacl.public.PrivateKey.generate()
    return key, _b64(bytes(key.public_key))


def prove_key(key: nacl.public.PrivateKey, nonce: str, challenge_key: str) -> str:
    """Provider side: the nonce boxed from the registered X25519 key to the challenge's."""
    box = nacl.public.Box(key, load_public_key(challenge_key))
    return _b64(bytes(box.encrypt(nonce.encode("utf-8", "surrogatepass"))))


def verify_key_proof(challenge_key: nacl.public.PrivateKey, public_key: str, nonce: str,
                     proof: str) -> bool:
    """Coordinator side: True only if ``proof`` was boxed with ``public_key``'s private half.

    A signature over the encryption key binds it to the signing key, but anyone can
    sign somebody else's public key: without this a provider could register another's
    key and, keys being unique, lock that provider out."""
    try:
        box = nacl.public.Box(challenge_key, load_public_key(public_key))
        return box.decrypt(_b64decode(proof)) == nonce.encode("utf-8", "surrogatepass")
    except (nacl.exceptions.CryptoError, ValueError):
        return False


def load_verify_key(text: str) -> nacl.signing.VerifyKey:
    """Parse a base64 Ed25519 public key, raising ``ValueError`` when it is not one."""
    raw = _b64decode(text)
    if len(raw) != nacl.bindings.crypto_sign_PUBLICKEYBYTES:
        raise ValueError(f"signing key must be {nacl.bindings.crypto_sign_PUBLICKEYBYTES} bytes")
    return nacl.signing.VerifyKey(raw)

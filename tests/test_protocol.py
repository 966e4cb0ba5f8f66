"""Wire protocol: round trips, strict decoding, and the NaCl/Ed25519 helpers."""

from __future__ import annotations

import base64

import nacl.public
import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.protocol import (
    AttestationChallenge,
    AttestationResponse,
    Cancel,
    DecryptError,
    EncryptedPayload,
    FrameError,
    Hardware,
    Heartbeat,
    InferenceAccepted,
    InferenceComplete,
    InferenceError,
    InferenceRequest,
    InferenceResponseChunk,
    ModelInfo,
    Register,
    RequestCipher,
    Usage,
    decode_frame,
    encode_frame,
    open_request,
    sign_challenge,
    verify_challenge,
)
from coordinator.protocol.crypto import challenge_key, challenge_text, prove_key, verify_key_proof

text = st.text(max_size=40)
ints = st.integers(min_value=0, max_value=2**53)
token_counts = st.integers(min_value=0, max_value=10**9)
floats = st.floats(allow_nan=False, allow_infinity=False, width=32)
payloads = st.builds(EncryptedPayload, text, text)
models = st.builds(ModelInfo, text, ints, text, text, st.none() | st.booleans(),
                   st.none() | st.booleans())
messages = st.one_of(
    st.builds(Register, st.builds(Hardware, text, text, floats), st.tuples(models, models),
              text, text, text, text, st.booleans(), floats, floats, st.none() | text,
              st.none() | text, st.none() | st.integers(1, 64)),
    st.builds(Heartbeat),
    st.builds(InferenceAccepted, text),
    st.builds(InferenceResponseChunk, text, st.none() | text, st.none() | payloads),
    st.builds(InferenceComplete, text, st.builds(Usage, token_counts, token_counts)),
    st.builds(InferenceError, text, text, st.integers(100, 599)),
    st.builds(AttestationResponse, text, text),
    st.builds(InferenceRequest, text, payloads),
    st.builds(Cancel, text),
    st.builds(AttestationChallenge, text, ints),
)


@given(messages)
def test_every_message_round_trips(message):
    assert decode_frame(encode_frame(message)) == message


def test_template_render_ok_is_tri_state_on_the_wire():
    assert '"template_render_ok":false' in encode_frame(_register(ModelInfo("m", template_render_ok=False)))
    assert "template_render_ok" not in encode_frame(_register(ModelInfo("m")))


def _register(model: ModelInfo) -> Register:
    return Register(Hardware(), (model,), "mlx", "0.6.5", "pk", "tok")


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("{", "malformed JSON"),
        ("[1]", "not a JSON object"),
        ('{"type":"launch_missiles"}', "unknown message type"),
        ('{"request_id":"x"}', "unknown message type"),
        ('{"type":"inference_error","request_id":7,"error":"x"}', "bad inference_error"),
        ('{"type":"inference_error","request_id":"r","error":"x","status_code":"500"}',
         "bad inference_error"),
        ('{"type":"inference_complete"}', "required field missing"),
        ('{"type":"register","hardware":{},"models":"no"}', "bad register"),
        ("[" * 1000, "malformed JSON"),
        ('{"type":"heartbeat","x":' + "[" * 5000 + "]" * 5000 + "}", "depth limit exceeded"),
        ('{"type":"heartbeat","x":NaN}', "malformed JSON"),
        ('{"type":"heartbeat","x":-Infinity}', "malformed JSON"),
        (b'{"type":"heartbeat","x":"\xff"}', "malformed JSON"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(frame, reason):
    with pytest.raises(FrameError, match=reason):
        decode_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"inference_complete","request_id":"r","usage":{"prompt_tokens":-1000}}',
        '{"type":"inference_complete","request_id":"r","usage":{"completion_tokens":'
        + "9" * 4300 + "}}",
        '{"type":"inference_complete","request_id":"r","usage":{"prompt_tokens":1e308}}',
        '{"type":"inference_error","request_id":"r","error":"x","status_code":' + "5" * 30 + "}",
        '{"type":"inference_error","request_id":"r","error":"x","status_code":99}',
        '{"type":"inference_response_chunk","request_id":"r","data":' + "[" * 2000 + "]" * 2000
        + "}",
    ],
)
def test_a_malformed_frame_naming_a_request_says_which(frame):
    with pytest.raises(FrameError) as caught:
        decode_frame(frame)
    assert caught.value.request_id in ("r", None)
    assert len(str(caught.value)) < 400
    if "[[" not in frame:
        assert caught.value.request_id == "r"


def test_oversized_frame_is_rejected():
    with pytest.raises(FrameError, match="exceeds"):
        decode_frame('{"type":"heartbeat","pad":"' + "x" * 2000 + '"}', max_bytes=1000)


@pytest.mark.parametrize("pad", ["x", "é", "\U0001f600"])
def test_the_frame_limit_is_exact_in_utf8_bytes(pad):
    head, tail = '{"type":"heartbeat","pad":"', '"}'
    room = 1000 - len(head) - len(tail)
    fits = head + pad * (room // len(pad.encode())) + "x" * (room % len(pad.encode())) + tail
    assert len(fits.encode()) == 1000
    assert decode_frame(fits, max_bytes=1000) == decode_frame('{"type":"heartbeat"}')
    with pytest.raises(FrameError, match="frame of 1001 bytes exceeds the 1000-byte limit"):
        decode_frame(fits[:-2] + "x" + tail, max_bytes=1000)
    assert decode_frame(fits.encode(), max_bytes=1000)  # bytes frames count the same


def test_unknown_fields_are_ignored_for_forward_compatibility():
    assert decode_frame('{"type":"cancel","request_id":"r","new_field":1}') == Cancel("r")


@given(st.binary(max_size=4096))
def test_box_round_trip(body):
    provider = nacl.public.PrivateKey.generate()
    cipher = RequestCipher(provider.public_key)
    sealed = cipher.seal_body(body)
    opened, sealer = open_request(provider, sealed)
    assert opened == body
    assert cipher.open_chunk(sealer.seal("chunk ✓")) == "chunk ✓"


def test_each_request_uses_a_fresh_ephemeral_key():
    provider = nacl.public.PrivateKey.generate()
    a = RequestCipher(provider.public_key).seal_body(b"x")
    b = RequestCipher(provider.public_key).seal_body(b"x")
    assert a.ephemeral_public_key != b.ephemeral_public_key


def test_tampered_ciphertext_is_rejected():
    provider = nacl.public.PrivateKey.generate()
    cipher = RequestCipher(provider.public_key)
    _, sealer = open_request(provider, cipher.seal_body(b"{}"))
    chunk = sealer.seal("hello")
    raw = bytearray(base64.b64decode(chunk.ciphertext))
    raw[-1] ^= 1
    tampered = EncryptedPayload(chunk.ephemeral_public_key, base64.b64encode(raw).decode())
    with pytest.raises(DecryptError):
        cipher.open_chunk(tampered)
    with pytest.raises(DecryptError):
        cipher.open_chunk(EncryptedPayload("x", "not base64!"))


def test_body_for_another_provider_does_not_open():
    cipher = RequestCipher(nacl.public.PrivateKey.generate().public_key)
    with pytest.raises(DecryptError):
        open_request(nacl.public.PrivateKey.generate(), cipher.seal_body(b"secret"))


def test_challenge_signature_covers_nonce_timestamp_and_encryption_key():
    key = nacl.signing.SigningKey.generate()
    verify = base64.b64encode(bytes(key.verify_key)).decode()
    signature = sign_challenge(key, "nonce", 12500, "pk")
    assert verify_challenge(verify, "nonce", 12500, "pk", signature)
    assert not verify_challenge(verify, "other", 12500, "pk", signature)
    assert not verify_challenge(verify, "nonce", 12501, "pk", signature)
    assert not verify_challenge(verify, "nonce", 12500, "another-pk", signature)
    other = nacl.signing.SigningKey.generate()
    assert not verify_challenge(verify, "nonce", 12500, "pk",
                                sign_challenge(other, "nonce", 12500, "pk"))
    assert not verify_challenge("garbage", "nonce", 12500, "pk", "garbage")


def test_a_key_proof_needs_the_private_half_of_the_registered_key():
    provider, stranger = nacl.public.PrivateKey.generate(), nacl.public.PrivateKey.generate()
    registered = base64.b64encode(bytes(provider.public_key)).decode()
    ours, ours_text = challenge_key()
    proof = prove_key(provider, "nonce", ours_text)
    assert verify_key_proof(ours, registered, "nonce", proof)
    assert not verify_key_proof(ours, registered, "other", proof)
    assert not verify_key_proof(ours, registered, "nonce", prove_key(stranger, "nonce", ours_text))
    assert not verify_key_proof(challenge_key()[0], registered, "nonce", proof)  # another challenge
    for junk in ("", "garbage", base64.b64encode(b"\0" * 64).decode(), "\ud800"):
        assert not verify_key_proof(ours, registered, "nonce", junk)


def test_challenge_text_is_language_neutral():
    # What a Go or Swift provider signs: plain decimal digits, no float formatting.
    assert challenge_text("ab12", 1733000000123, "S2V5") == b"ab12:1733000000123:S2V5"

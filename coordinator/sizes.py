"""Sizes: one contract from the consumer's body to the provider's socket. Pure.

Every size limit derives from two settings (docs/configuration.md, "Sizes"):

* ``max_body_bytes`` (B) — the largest consumer body. The HTTP edge answers 413
  above it, and the tool-schema normalizer works on every body up to it. The
  provider decrypts the body plus the ``"endpoint"`` field, so the largest
  ``inference_request`` frame the coordinator can send is
  :func:`request_frame_bound` of B + 64.
* ``max_frame_bytes`` (F) — the largest frame a provider may send. Frames up to
  2F are received and rejected one by one (the connection lives); the socket
  closes above that. A request's buffer (``request_buffer_bytes``) holds at
  least one frame, and frames before admission (``register_frame_bytes``) are
  far smaller.

Providers declare the largest ``inference_request`` frame they accept
(``max_request_bytes`` in ``register``; :data:`DEFAULT_PROVIDER_REQUEST_BYTES`
when they do not say). A request is routed only to providers whose limit its
frame fits, and gets 413 at once when no provider serving its model can ever
take it — sending it anyway would make the provider drop the whole socket.
"""

from __future__ import annotations

from typing import Final

from coordinator.protocol.crypto import request_frame_bytes

# What a provider that does not declare max_request_bytes is assumed to accept:
# trio-websocket's and many WebSocket libraries' default message limit.
DEFAULT_PROVIDER_REQUEST_BYTES: Final = 1024 * 1024
# The smallest limit a provider may declare, and the largest taken at its word.
MIN_PROVIDER_REQUEST_BYTES: Final = 1024
MAX_PROVIDER_REQUEST_BYTES: Final = 2**31
# Wire request ids are "<16 hex>.<serial>": 40 characters bound them.
_WIRE_ID_BOUND: Final = "x" * 40
# The plaintext is the body plus ,"endpoint":"/v1/chat/completions" and braces.
ENDPOINT_FIELD_BOUND: Final = 64


def request_frame_bound(plaintext_bytes: int) -> int:
    """An upper bound (exact but for the id) on the request frame for this plaintext."""
    return request_frame_bytes(_WIRE_ID_BOUND, plaintext_bytes)


def largest_request_frame(max_body_bytes: int) -> int:
    return request_frame_bound(max_body_bytes + ENDPOINT_FIELD_BOUND)


def provider_socket_limit(max_frame_bytes: int) -> int:
    """The WebSocket message limit after admission: frames up to here are read, then judged."""
    return 2 * max_frame_bytes


def check(max_frame_bytes: int, register_frame_bytes: int,
          request_buffer_bytes: int) -> list[str]:
    """What is inconsistent about a configuration's sizes (empty when all is well).

    Each size on its own (at least 1) is checked with every other setting."""
    problems = []
    if not 1024 <= register_frame_bytes <= max_frame_bytes:
        problems.append(f"register_frame_bytes: must be between 1024 and max_frame_bytes "
                        f"({max_frame_bytes}), not {register_frame_bytes}")
    if request_buffer_bytes < max_frame_bytes:
        problems.append(f"request_buffer_bytes: must hold at least one frame (>= "
                        f"max_frame_bytes, {max_frame_bytes}), not {request_buffer_bytes}")
    return problems


# Room for a link frame's own fields around the frame it carries.
PEER_FRAME_OVERHEAD: Final = 4096


def peer_socket_limit(max_body_bytes: int, max_frame_bytes: int) -> int:
    """The WebSocket message limit on links between instances, both ways.

    One way a link carries a whole sealed request; the other a provider's frame
    re-encoded as a JSON string, which escaping (``"`` and ``\\``) at most doubles
    (the relaying instance refuses to relay anything larger).
    """
    return max(largest_request_frame(max_body_bytes),
               2 * provider_socket_limit(max_frame_bytes)) + PEER_FRAME_OVERHEAD

"""What a backend answers a request with: a stream of actions, turned into frames.

A backend (scripted in the simulator, an inference engine behind the agent) yields
these; :mod:`.session` seals and sends each as its protocol frame.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Accepted:
    """``inference_accepted``: the request is taken, and the model is loading (a cold start)."""


@attrs.frozen
class Chunk:
    """One ``inference_response_chunk``: one event (bare JSON) or several (SSE-framed)."""

    text: str
    # Simulated faults only: a chunk the requester cannot use (plaintext from an
    # encrypting provider, or garbage that does not decrypt).
    corrupt: str | None = None


@attrs.frozen
class Error:
    """``inference_error``: the request ends with this status (docs/protocol.md)."""

    status: int
    message: str


@attrs.frozen
class Crash:
    """Simulated faults only: the provider's socket drops (close 1011)."""


@attrs.frozen
class Complete:
    """``inference_complete`` with the request's token usage."""

    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # everything said, for a whole (non-streaming) answer (simulator HTTP)


Action = Accepted | Chunk | Error | Crash | Complete

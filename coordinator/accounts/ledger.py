"""The usage ledger: one reservation per request, closed exactly once. Pure.

A request is admitted with a *reservation* of its token bound (the prompt estimate
plus ``max_tokens``). It is closed once, by the first of:

* :meth:`Ledger.settle` — the answer completed: the provider's reported usage, clamped
  (completion tokens to the request's ``max_tokens``, prompt tokens to a ceiling a
  prompt of that size cannot honestly pass): a provider cannot charge a consumer for
  more than it asked for;
* :meth:`Ledger.settle` with what was delivered — a stream broke after content, or the
  consumer left: the prompt and the content the consumer got;
* :meth:`Ledger.refund` — the request failed before any content reached the consumer
  (a refusal, every pre-content failover and race loss included): nothing is charged.

A second close of the same request id is a no-op that returns None (so no path can
charge twice), and the request's owner closes it in a ``finally`` (so no path leaves
it open). Each close is a :class:`Entry`: what the store keeps, by key and by provider.
"""

from __future__ import annotations

import enum

import attrs


class Close(enum.Enum):
    SETTLED = "settled"  # charged what the provider reported (clamped), or what was delivered
    REFUNDED = "refunded"  # nothing reached the consumer: nothing charged


# A prompt's tokens as a provider counts them can exceed the edge's estimate (a chat
# template adds tokens; a tokenizer splits finer than four characters), but not beyond
# this: every token is at least one character, and a template adds a few per message.
PROMPT_CEILING_FACTOR = 4
PROMPT_CEILING_ALLOWANCE = 256


def prompt_ceiling(estimate: int) -> int:
    """The most prompt tokens a request estimated at ``estimate`` can be charged."""
    return PROMPT_CEILING_FACTOR * estimate + PROMPT_CEILING_ALLOWANCE


def storable(text: str) -> str:
    """``text`` with lone surrogates (valid in JSON, not in UTF-8) replaced, so that
    every store can write what a consumer named."""
    return text.encode("utf-8", "replace").decode("utf-8")


@attrs.frozen
class Reservation:
    request_id: str
    key: str | None  # None: an unnamed key (COORDINATOR_API_KEYS)
    model: str = attrs.field(converter=storable)
    prompt_estimate: int
    completion_reserved: int  # max_tokens, or the default bound when the consumer gave none
    completion_ceiling: int  # max_tokens, or the largest the coordinator allows
    period: str  # the key's budget window at admission

    @property
    def bound(self) -> int:
        """What admission counts against the key's limits, corrected at settlement."""
        return self.prompt_estimate + self.completion_reserved


@attrs.frozen
class Entry:
    """One closed reservation: what it cost and who served it."""

    request_id: str
    key: str | None
    model: str
    provider: str | None
    bound: int
    prompt_tokens: int
    completion_tokens: int
    close: Close
    at: float  # wall-clock seconds

    @property
    def charged(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.define
class Ledger:
    open: dict[str, Reservation] = attrs.field(factory=dict)

    def reserve(self, reservation: Reservation) -> None:
        if reservation.request_id in self.open:
            raise ValueError(f"request {reservation.request_id} is already reserved")
        self.open[reservation.request_id] = reservation

    def settle(self, request_id: str, provider: str | None, prompt_tokens: int,
               completion_tokens: int, at: float) -> tuple[Reservation, Entry] | None:
        """Charge what was used, clamped; None if already closed."""
        reservation = self.open.pop(request_id, None)
        if reservation is None:
            return None
        prompt = min(max(0, prompt_tokens), prompt_ceiling(reservation.prompt_estimate))
        completion = min(max(0, completion_tokens), reservation.completion_ceiling)
        return reservation, Entry(request_id, reservation.key, reservation.model, provider,
                                  reservation.bound, prompt, completion, Close.SETTLED, at)

    def refund(self, request_id: str, at: float) -> tuple[Reservation, Entry] | None:
        """Charge nothing; None if already closed."""
        reservation = self.open.pop(request_id, None)
        if reservation is None:
            return None
        return reservation, Entry(request_id, reservation.key, reservation.model, None,
                                  reservation.bound, 0, 0, Close.REFUNDED, at)

"""Stay connected: one provider client, one or more coordinator URLs, backoff with jitter.

Each connection runs until its socket closes; then the client waits (doubling from
1 s to :data:`MAX_BACKOFF`, each wait drawn between half and all of it, so a fleet
refused together does not return together) and tries the next URL — in a cluster
every instance serves every consumer, so any URL will do. A connection that was
admitted resets the backoff. Why a connection failed is said in one line; a refusal
of the provider's identity (another key holds its id) is said once and then waited
out at the longest backoff: it will not cure itself in a second.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence

import trio

from coordinator.untrusted import printable

from .client import ProviderClient

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
POLICY_VIOLATION = 1008
# Refusals that are about who the provider is, not about now.
_IDENTITY_REFUSALS = ("bound to another key", "in use by another key",
                      "public_key is registered by another provider", "derived from another key")


def describe(exc: BaseException) -> str:
    """An exception's message and the first underlying error that says why.

    trio's "all attempts to connect ... failed" wraps the operating system's reasons
    (one per address) in its cause.
    """
    text = str(exc) or type(exc).__name__
    seen, cause = {id(exc)}, exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]  # its message only repeats the wrapper's
            continue
        if str(cause) and str(cause) not in text:
            text += f" ({cause})"
        cause = cause.__cause__ or cause.__context__
    return printable(text, 300)


async def keep_connected(
    client: ProviderClient,
    urls: Sequence[str],
    *,
    reconnect: bool = True,
    rng: random.Random | None = None,
    connection_budget: float = float("inf"),
    pause_after_budget: float = 0.0,
) -> None:
    """Serve ``client`` through ``urls`` until cancelled (or once, without ``reconnect``).

    ``connection_budget`` ends each connection after that long, and
    ``pause_after_budget`` is the wait before the next: the simulator's churn.
    """
    jitter = rng or random.Random()
    failures = 0
    refused_for: str | None = None
    for url in itertools.cycle(urls):
        with trio.move_on_after(connection_budget) as budget:
            client.closed_with = None
            admitted_before = client.admissions
            try:
                await client.run(url)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                log.warning("%s: cannot connect to %s: %s", client.name, printable(url),
                            describe(exc))
            except Exception as exc:  # the handshake library raises its own types
                log.warning("%s: connection to %s failed: %s", client.name, printable(url),
                            describe(exc))
            else:
                refused_for = _closed(client, refused_for)
        if not reconnect:
            return
        # It answered a challenge and was not refused for who it is: admitted.
        admitted = client.admissions > admitted_before and \
            client.closed_with != POLICY_VIOLATION
        failures = 0 if admitted else failures + 1
        if admitted:
            refused_for = None
        if budget.cancelled_caught and admitted:
            await trio.sleep(pause_after_budget)
            continue
        wait = MAX_BACKOFF if refused_for is not None else min(MAX_BACKOFF, 2.0 ** failures)
        await trio.sleep(wait * jitter.uniform(0.5, 1.0))


def _closed(client: ProviderClient, refused_for: str | None) -> str | None:
    """Say why the coordinator closed the connection; the identity refusal it was, if any."""
    if client.closed_with is None:
        return refused_for
    reason = client.closed_reason or "(no reason given)"
    identity = client.closed_with == POLICY_VIOLATION and any(
        phrase in reason for phrase in _IDENTITY_REFUSALS)
    if identity and refused_for == reason:
        return refused_for  # said already: a collision is said once
    if identity:
        log.warning("%s: refused: %s — another provider holds this id with its own key; "
                    "retrying every %gs (an operator can unpin the id)", client.name,
                    printable(reason), MAX_BACKOFF)
        return reason
    log.warning("%s: the coordinator closed the connection: %d %s", client.name,
                client.closed_with, printable(reason))
    return None

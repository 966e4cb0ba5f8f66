"""Stopping a simulator, agent or load run on SIGINT/SIGTERM: quietly, without a traceback."""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio


async def until_signalled(function: Callable[..., Awaitable[Any]], *args: Any,
                          ready: str | None = None) -> Any:
    """Run ``function`` until it returns or SIGINT/SIGTERM arrives; then stop quietly.

    ``ready`` is printed once the signals are caught here, not before: whoever reads it
    and sends a signal at once (an operator, a test) gets a quiet stop, never trio's
    KeyboardInterrupt.
    """
    result: list[Any] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        if ready is not None:
            print(ready, flush=True)
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                result.append(await function(*args))
                nursery.cancel_scope.cancel(reason="done")

            nursery.start_soon(run)
            async for signum in signals:
                print(f"\n{signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel(reason="signalled")
                break
    return result[0] if result else None


def run_until_signalled(function: Callable[..., Awaitable[Any]], *args: Any,
                        ready: str | None = None) -> Any:
    """``trio.run`` of :func:`until_signalled`; a SIGINT that comes while trio starts,
    before the signals are caught, stops as quietly."""
    try:
        return trio.run(partial(until_signalled, function, *args, ready=ready))
    except KeyboardInterrupt:
        print("\nSIGINT: stopping", file=sys.stderr, flush=True)
        return None

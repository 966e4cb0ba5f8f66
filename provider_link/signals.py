"""Stopping a simulator or load run on SIGINT/SIGTERM: quietly, without a traceback."""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio


async def until_signalled(function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``function`` until it returns or SIGINT/SIGTERM arrives; then stop quietly."""
    async with trio.open_nursery() as nursery:
        result: list[Any] = []

        async def run() -> None:
            result.append(await function(*args))
            nursery.cancel_scope.cancel(reason="done")

        nursery.start_soon(run)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                print(f"\n{signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel(reason="signalled")
                break
    return result[0] if result else None

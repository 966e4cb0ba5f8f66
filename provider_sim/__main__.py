"""``provider-sim``: simulated providers, an OpenAI-compatible mode and a load generator."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .behaviours import parse_behaviour
from .fleet import FleetMember, demo_fleet, load_fleet, run_fleet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="provider-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fleet = sub.add_parser("fleet", help="run simulated providers against a coordinator")
    fleet.add_argument("--coordinator", default="ws://127.0.0.1:8001/")
    fleet.add_argument("--file", help="a TOML fleet file (see provider_sim/fleet.py)")
    fleet.add_argument("--n", type=int, default=4, help="providers, without --file")
    fleet.add_argument("--token", default=None, help="provider token (demo-provider-token)")
    fleet.add_argument("--behaviour", default="healthy",
                       help="fault[:key=value,...], e.g. role_then_error:status=500")
    fleet.add_argument("--seed", type=int, default=0)

    http = sub.add_parser("http", help="one simulated provider as an OpenAI-compatible server")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=9000)
    http.add_argument("--behaviour", default="healthy")
    http.add_argument("--tokens", type=int, default=16)

    load = sub.add_parser("load", help="drive an OpenAI-compatible URL with concurrent consumers")
    from .load import add_arguments

    add_arguments(load)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command != "load" else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if args.command == "fleet":
        members: list[FleetMember]
        if args.file:
            members, _ = load_fleet(args.file, token=args.token)
        else:
            members = [FleetMember(p) for p in demo_fleet(
                args.n, args.token or "demo-provider-token",
                parse_behaviour(args.behaviour), args.seed)]
        print(f"{len(members)} simulated providers connecting to {args.coordinator} "
              "(Ctrl-C to stop)", flush=True)
        trio.run(until_signalled, run_fleet, members, args.coordinator)
    elif args.command == "http":
        from .http import serve_http

        async def serve_and_say() -> None:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(serve_http, args.host, args.port,
                                          parse_behaviour(args.behaviour), args.tokens)
                print(f"simulated provider (OpenAI-compatible) on {url}", flush=True)

        trio.run(until_signalled, serve_and_say)
    else:
        from .load import run_from_args

        run_from_args(args)


async def until_signalled(function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run ``function`` until it returns or SIGINT/SIGTERM arrives; then stop quietly."""
    async with trio.open_nursery() as nursery:
        result: list[Any] = []

        async def run() -> None:
            result.append(await function(*args))
            nursery.cancel_scope.cancel()

        nursery.start_soon(run)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                print(f"\n{signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()
                break
    return result[0] if result else None


if __name__ == "__main__":
    main()

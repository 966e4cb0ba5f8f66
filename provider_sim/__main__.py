"""``provider-sim``: simulated providers, and one simulated provider as an OpenAI-compatible server.

The consumer side (a load generator) is ``coordinator load``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from coordinator.untrusted import line_safe_handler

from .behaviours import parse_behaviour
from .fleet import FleetMember, demo_fleet, load_fleet, run_fleet
from .signals import until_signalled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="provider-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fleet = sub.add_parser("fleet", help="run simulated providers against a coordinator")
    fleet.add_argument("--coordinator", default="ws://127.0.0.1:8001/",
                       help="provider URL of the coordinator; several, comma-separated, for "
                       "several instances (providers spread over them and move on failure)")
    fleet.add_argument("--file", help="a TOML fleet file (see provider_sim/fleet.py)")
    fleet.add_argument("--n", type=int, default=4, help="providers, without --file")
    fleet.add_argument("--token", default=None, help="provider token (demo-provider-token)")
    fleet.add_argument("--behaviour", default="healthy",
                       help="fault[:key=value,...], e.g. role_then_error:status=500")
    fleet.add_argument("--seed", type=int, default=0)
    fleet.add_argument("--sse-chunks", action="store_true",
                       help="frame chunk payloads as SSE events, as some backends do")
    fleet.add_argument("--events-per-frame", type=int, default=1,
                       help="put up to this many ready events in one frame (SSE-framed)")
    fleet.add_argument("--max-request-bytes", type=int, default=None,
                       help="the largest request frame to accept and declare (1 MiB)")

    http = sub.add_parser("http", help="one simulated provider as an OpenAI-compatible server")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=9000)
    http.add_argument("--behaviour", default="healthy")
    http.add_argument("--tokens", type=int, default=16)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command != "load" else logging.WARNING,
                        handlers=[line_safe_handler(sys.stderr, "%(asctime)s %(name)s %(message)s")])
    if args.command == "fleet":
        members: list[FleetMember]
        try:
            if args.file:
                members, _ = load_fleet(args.file, token=args.token)
            else:
                members = [FleetMember(p) for p in demo_fleet(
                    args.n, args.token or "demo-provider-token",
                    parse_behaviour(args.behaviour), args.seed)]
        except (ValueError, TypeError, KeyError, OSError) as exc:
            parser.error(str(exc))  # one line and exit 2, not a traceback
        for member in members:
            member.provider.sse_chunks = member.provider.sse_chunks or args.sse_chunks
            member.provider.events_per_frame = max(member.provider.events_per_frame,
                                                   args.events_per_frame)
            if args.max_request_bytes is not None:
                member.provider.max_request_bytes = args.max_request_bytes
        print(f"{len(members)} simulated providers connecting to {args.coordinator} "
              "(Ctrl-C to stop)", flush=True)
        trio.run(until_signalled, run_fleet, members, args.coordinator.split(","))
    else:
        from .http import serve_http

        try:
            behaviour = parse_behaviour(args.behaviour)
        except ValueError as exc:
            parser.error(str(exc))

        async def serve_and_say() -> None:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(serve_http, args.host, args.port, behaviour,
                                          args.tokens)
                print(f"simulated provider (OpenAI-compatible) on {url}", flush=True)

        trio.run(until_signalled, serve_and_say)


if __name__ == "__main__":
    main()

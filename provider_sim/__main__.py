"""``provider-sim``: simulated providers, and one simulated provider as an OpenAI-compatible server.

The consumer side (a load generator) is ``coordinator load``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from urllib.parse import urlsplit

import trio

from coordinator.untrusted import line_safe_handler
from provider_link.cli import OneLineParser, at_least
from provider_link.keys import KeyFileError, default_key_directory, keys_in_directory, lock_directory
from provider_link.signals import run_until_signalled

from .behaviours import parse_behaviour
from .fleet import FleetMember, demo_fleet, load_fleet, run_fleet


def _ws_urls(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    for url in urls or [text]:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise argparse.ArgumentTypeError(
                f"{url!r} is not a coordinator's provider URL (ws://HOST:PORT/ or wss://…)")
    return urls


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="provider-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    fleet = sub.add_parser("fleet", help="run simulated providers against a coordinator")
    fleet.add_argument("--coordinator", default="ws://127.0.0.1:8001/", type=_ws_urls,
                       help="provider URL of the coordinator; several, comma-separated, for "
                       "several instances (providers spread over them and move on failure)")
    fleet.add_argument("--file", help="a TOML fleet file (see provider_sim/fleet.py)")
    fleet.add_argument("--n", type=at_least(1), default=4,
                       help="how many providers, without --file (default: 4)")
    fleet.add_argument("--token", default=None,
                       help="provider token (default: demo-provider-token, or the file's)")
    fleet.add_argument("--keys", default=None, metavar="DIR",
                       help="directory of the providers' key files, one per provider id, made "
                       "on first use, so a restarted fleet proves the same keys (default: "
                       f"{default_key_directory()}); one fleet per directory")
    fleet.add_argument("--ephemeral-keys", action="store_true",
                       help="fresh keys every run instead (a coordinator started for this "
                       "run only: a new key cannot take an id another key holds)")
    fleet.add_argument("--behaviour", default="healthy",
                       help="fault[:key=value,...], e.g. role_then_error:status=500 "
                       "(default: healthy)")
    fleet.add_argument("--seed", type=int, default=0,
                       help="seed for the providers' random choices (default: 0)")
    fleet.add_argument("--sse-chunks", action="store_true",
                       help="frame chunk payloads as SSE events, as some backends do")
    fleet.add_argument("--events-per-frame", type=at_least(1), default=1,
                       help="put up to this many ready events in one frame, SSE-framed "
                       "(default: 1)")
    fleet.add_argument("--max-request-bytes", type=at_least(1024), default=None,
                       help="the largest request frame to accept and declare (default: 1 MiB)")

    http = sub.add_parser("http", help="one simulated provider as an OpenAI-compatible server")
    http.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    http.add_argument("--port", type=at_least(0), default=9000,
                      help="port, 0 for any free one (default: 9000)")
    http.add_argument("--behaviour", default="healthy",
                      help="fault[:key=value,...] (default: healthy)")
    http.add_argument("--tokens", type=at_least(1), default=16,
                      help="words per answer (default: 16)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
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
            if not args.ephemeral_keys:
                _use_key_directory(members, Path(args.keys) if args.keys
                                   else default_key_directory())
        except (ValueError, TypeError, KeyError, OSError, KeyFileError) as exc:
            parser.error(str(exc))  # one line and exit 2, not a traceback
        for member in members:
            member.provider.sse_chunks = member.provider.sse_chunks or args.sse_chunks
            member.provider.events_per_frame = max(member.provider.events_per_frame,
                                                   args.events_per_frame)
            if args.max_request_bytes is not None:
                member.provider.max_request_bytes = args.max_request_bytes
        count = len(members)
        run_until_signalled(run_fleet, members, args.coordinator,
                            ready=f"{count} simulated provider{'' if count == 1 else 's'} "
                                  f"connecting to {','.join(args.coordinator)} (Ctrl-C to stop)")
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

        run_until_signalled(serve_and_say)


def _use_key_directory(members: list[FleetMember], directory: Path) -> None:
    """Give each provider its keys from ``directory`` (made on first use), held by this
    fleet alone for as long as it runs."""
    lock_directory(directory)  # released when the process ends
    for member in members:
        member.provider.use_keys(keys_in_directory(directory, member.provider.provider_id))


if __name__ == "__main__":
    main()

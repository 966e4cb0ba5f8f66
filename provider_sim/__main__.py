"""``provider-sim``: run simulated providers against a coordinator."""

from __future__ import annotations

import argparse
import contextlib
import logging

import trio

from .behaviours import parse_behaviour
from .fleet import demo_fleet, run_fleet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="provider-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fleet = sub.add_parser("fleet", help="run N simulated providers")
    fleet.add_argument("--n", type=int, default=4)
    fleet.add_argument("--coordinator", default="ws://127.0.0.1:8001/")
    fleet.add_argument("--token", default="demo-provider-token")
    fleet.add_argument("--behaviour", default="healthy",
                       help="fault[:key=value,...], e.g. role_then_error:status=500")
    fleet.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    providers = demo_fleet(args.n, args.token, parse_behaviour(args.behaviour), args.seed)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run_fleet, providers, args.coordinator)


if __name__ == "__main__":
    main()

"""``coordinator keys add|list|show|revoke``: named keys from the command line.

The commands change the store directly (the keys file, or Redis with ``--redis-url``);
a coordinator running on it sees the change within half a second, as it would an
admin API call. A secret is printed once, when its key is made; only its hash is kept.
Exit status: 0; 1 for a key that does not exist or a name taken; 2 for a flag that
cannot be used or a store that cannot be opened.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import attrs
import trio

from coordinator.config import Config

from .keys import BudgetWindow, KeyRecord, KeySpecError, KeyState, check_name, limits_from
from .service import Accounts
from .store import Store
from .stores import open_store

NOT_FOUND = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys-db", default=None, metavar="PATH",
                        help="the keys file (default: COORDINATOR_KEYS_DB, else the one "
                        "`coordinator serve` uses: $XDG_STATE_HOME/trio-inference-coordinator/"
                        "keys.db)")
    parser.add_argument("--redis-url", default=None, metavar="URL",
                        help="the cluster's Redis instead of a file (COORDINATOR_REDIS_URL)")
    # --json before or after the command
    parser.add_argument("--json", action="store_true", help="print JSON")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print JSON")
    sub = parser.add_subparsers(dest="keys_command", required=True,
                                metavar="{add,list,show,revoke}")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, parents=[as_json])

    add = command("add", "make a key and print its secret (shown this once)")
    add.add_argument("name", help="1-64 characters of [A-Za-z0-9._-]")
    add.add_argument("--rpm", type=int, default=None, help="requests per minute")
    add.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    add.add_argument("--concurrent", type=int, default=None, help="requests in flight")
    add.add_argument("--budget", type=int, default=None, help="tokens per budget window")
    add.add_argument("--budget-window", default="none",
                     choices=[w.value for w in BudgetWindow],
                     help="when the budget resets (UTC; default: none, never)")
    add.add_argument("--models", default=None, metavar="ID,ID",
                     help="the models the key may use (default: any)")
    command("list", "every key, never a secret")
    show = command("show", "one key")
    show.add_argument("name")
    revoke = command("revoke", "refuse a key from now on (every instance, within a second)")
    revoke.add_argument("name")


def run_from_args(args: argparse.Namespace, fail: Any) -> int:
    """Run a ``keys`` command; its exit status. ``fail(message)`` for a usage error."""
    try:
        # The command reads Redis but never joins the cluster: it needs no cluster token.
        config = Config.from_env(keys_db=args.keys_db, redis_url=args.redis_url,
                                 cluster_token=os.environ.get("COORDINATOR_CLUSTER_TOKEN")
                                 or "(not used by the keys command)")
        config = with_default_keys_db(config)
        spec = _spec(args) if args.keys_command == "add" else None
    except (KeySpecError, ValueError) as exc:
        fail(str(exc))
    return trio.run(_run, config, args, spec)


def with_default_keys_db(config: Config) -> Config:
    """``coordinator serve``'s keys file, unless one is set or Redis holds the keys."""
    if config.keys_db or config.redis_url or not config.accounts:
        return config
    from .sqlite import default_path

    return attrs.evolve(config, keys_db=str(default_path()))


def _spec(args: argparse.Namespace) -> tuple[str, Any, frozenset[str] | None]:
    name = check_name(args.name)
    key_limits = limits_from({
        "requests_per_minute": args.rpm, "tokens_per_minute": args.tpm,
        "concurrent_requests": args.concurrent, "token_budget": args.budget,
        "budget_window": args.budget_window})
    models = None
    if args.models is not None:
        models = frozenset(m.strip() for m in args.models.split(",") if m.strip())
        if not models:
            raise KeySpecError("--models: at least one model id")
    return name, key_limits, models


async def _run(config: Config, args: argparse.Namespace, spec: Any) -> int:
    async with trio.open_nursery() as nursery:
        store, _ = await open_store(nursery, config)
        try:
            return await _command(store, args, spec)
        finally:
            await store.aclose()
            nursery.cancel_scope.cancel()


async def _command(store: Store, args: argparse.Namespace, spec: Any) -> int:
    accounts = Accounts(store)
    await accounts.load()
    match args.keys_command:
        case "add":
            try:
                record, secret = await accounts.create(*spec)
            except KeySpecError as exc:
                print(f"coordinator keys: {exc}", file=sys.stderr)
                return NOT_FOUND
            _print(args, record, secret)
            if not args.json:
                print("The secret is shown this once; only its hash is kept.",
                      file=sys.stderr)
        case "list":
            records = accounts.all_keys()
            if args.json:
                print(json.dumps([r.as_json() for r in records], indent=2))
            else:
                for record in records:
                    print(_line(record))
        case "show" | "revoke":
            found = accounts.key(args.name)
            if found is None:
                print(f"coordinator keys: no key named {args.name!r}", file=sys.stderr)
                return NOT_FOUND
            if args.keys_command == "revoke":
                found = await accounts.change(attrs.evolve(found, state=KeyState.REVOKED))
            _print(args, found)
    return 0


def _print(args: argparse.Namespace, record: KeyRecord, secret: str | None = None) -> None:
    shown = record.as_json() | ({"secret": secret} if secret is not None else {})
    if args.json:
        print(json.dumps(shown, indent=2))
        return
    print(_line(record))
    if secret is not None:
        print(f"secret: {secret}")


def _line(record: KeyRecord) -> str:
    set_limits = {k: v for k, v in record.limits.as_json().items()
                  if v is not None and v != BudgetWindow.NONE.value}
    limits = " ".join(f"{k}={v}" for k, v in set_limits.items()) or "unlimited"
    models = ",".join(sorted(record.models)) if record.models is not None else "any model"
    created = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(record.created))
    return f"{record.name}  {record.state.value}  {limits}  {models}  created {created}"

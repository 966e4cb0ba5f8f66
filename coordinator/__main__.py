"""``coordinator serve`` runs the coordinator; ``coordinator demo`` adds a simulated fleet."""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import sys
from typing import Any

import attrs
import trio

from coordinator.app import Running, serve
from coordinator.config import Config


def _config_from(args: argparse.Namespace, **extra: Any) -> Config:
    return Config.from_env(
        http_host=args.host,
        http_port=args.port,
        provider_host=args.provider_host,
        provider_port=args.provider_port,
        **extra,
    )


def _generated_secrets(config: Config) -> Config:
    """Never serve open: make up any missing key or token, and say so once."""
    generated: dict[str, Any] = {}
    if not config.api_keys:
        generated["api_keys"] = ("key-" + secrets.token_hex(16),)
    if not config.provider_tokens:
        generated["provider_tokens"] = ("provider-" + secrets.token_hex(16),)
    for name, (value,) in generated.items():
        print(f"no COORDINATOR_{name.upper()} set; generated one for this run: {value}",
              flush=True)
    return attrs.evolve(config, **generated) if generated else config


async def _serve(config: Config) -> None:
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(serve, config)
        print(f"coordinator: HTTP on {running.http_url}, providers on {running.provider_url}",
              flush=True)


async def _demo(config: Config, providers: int) -> None:
    from provider_sim.behaviours import Behaviour
    from provider_sim.fleet import demo_fleet, run_fleet

    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(serve, config)
        # Paced like a real model (about 30 tokens/s) so the stream is visible.
        fleet = demo_fleet(providers, token=config.provider_tokens[0],
                           behaviour=Behaviour(token_interval=0.03, tokens=40))
        nursery.start_soon(run_fleet, fleet, running.provider_url)
        state = running.registry.state
        while len(state.providers) < providers:
            await state.changed.wait()
        key = config.api_keys[0]
        print(
            f"\nCoordinator ready with {providers} simulated providers "
            f"(models: sim-chat-small, sim-vision-large).\n"
            f"  HTTP API   {running.http_url}\n"
            f"  providers  {running.provider_url}\n"
            f"  API key    {key}\n"
            f"  admin key  {config.admin_keys[0]}\n\n"
            "Stream tokens:\n\n"
            f"  curl -N {running.http_url}/v1/chat/completions \\\n"
            f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
            "    -d '{\"model\": \"sim-chat-small\", \"stream\": true, "
            "\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'\n\n"
            f"Status: curl {running.http_url}/v1/admin/providers "
            f"-H 'Authorization: Bearer {config.admin_keys[0]}'\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="coordinator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "demo"):
        p = sub.add_parser(name)
        p.add_argument("--host", default=None, help="HTTP bind address (127.0.0.1)")
        p.add_argument("--port", type=int, default=None, help="HTTP port (8000)")
        p.add_argument("--provider-host", default=None, help="provider WebSocket bind address")
        p.add_argument("--provider-port", type=int, default=None, help="provider port (8001)")
        p.add_argument("--log-level", default="INFO")
        if name == "demo":
            p.add_argument("--providers", type=int, default=4)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        if args.command == "demo":
            config = _config_from(
                args,
                api_keys=("demo-" + secrets.token_hex(8),),
                admin_keys=("admin-" + secrets.token_hex(8),),
                provider_tokens=("demo-provider-token",),
            )
            trio.run(_demo, config, args.providers)
        else:
            config = _generated_secrets(_config_from(args))
            trio.run(_serve, config)


if __name__ == "__main__":
    main()

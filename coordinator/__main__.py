"""``coordinator serve`` runs the coordinator; ``coordinator demo`` adds a simulated fleet.

SIGTERM or SIGINT drains: new requests get 503, requests in flight have
``drain_timeout`` seconds to finish, providers are closed with 1001, and the
process exits 0. A second signal stops at once. A setting that cannot be used
(a bad ``COORDINATOR_*`` value, a port in use) is one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
from typing import Any, NoReturn

import attrs
import trio

from coordinator.accounts.cli import add_arguments as add_keys_arguments
from coordinator.accounts.cli import run_from_args as run_keys
from coordinator.accounts.cli import with_default_keys_db
from coordinator.accounts.store import StoreError, StoreUnavailable
from coordinator.api.transport import ListenError
from coordinator.app import Running, serve
from coordinator.config import Config, ConfigError, unknown_variables
from coordinator.providers.pinfile import PinFileError
from coordinator.untrusted import line_safe_handler

log = logging.getLogger("coordinator")

USAGE_ERROR = 2
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line naming the flag at fault, not the usage block."""
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="coordinator", description="An inference coordinator: OpenAI- and Anthropic-style "
        "HTTP in front of a fleet of WebSocket providers.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{serve,demo,load,keys}")
    for name, text in (("serve", "run the coordinator"),
                       ("demo", "run the coordinator with simulated providers on loopback")):
        keys = ("COORDINATOR_API_KEYS, COORDINATOR_ADMIN_KEYS, COORDINATOR_PROVIDER_TOKENS, "
                if name == "serve" else "")
        secrets_note = ("" if name == "serve" else " The demo makes its own API key and admin "
                        "key each run and prints them, and its simulated providers use the "
                        "token demo-provider-token; those variables are not used.")
        p = sub.add_parser(
            name, help=text, description=text + ". Every setting also comes from a "
            "COORDINATOR_<NAME> environment variable (docs/configuration.md), e.g. " + keys +
            "COORDINATOR_MAX_BODY_BYTES, COORDINATOR_QUEUE_MAX, COORDINATOR_DRAIN_TIMEOUT; "
            "flags win over variables." + secrets_note)
        p.add_argument("--host", default=None, metavar="ADDR",
                       help="HTTP bind address (default: 127.0.0.1, COORDINATOR_HTTP_HOST)")
        p.add_argument("--port", type=_port, default=None,
                       help="HTTP port, 0 for any free one (default: 8000, "
                       "COORDINATOR_HTTP_PORT)")
        p.add_argument("--provider-host", default=None, metavar="ADDR",
                       help="provider WebSocket bind address (default: 127.0.0.1, "
                       "COORDINATOR_PROVIDER_HOST)")
        p.add_argument("--provider-port", type=_port, default=None,
                       help="provider WebSocket port (default: 8001, "
                       "COORDINATOR_PROVIDER_PORT)")
        p.add_argument("--log-level", default="INFO", type=str.upper, choices=_LOG_LEVELS,
                       help="log level (default: INFO)")
        if name == "serve":
            p.add_argument("--redis-url", default=None, metavar="URL",
                           help="share state with other instances through this Redis "
                           "(docs/scale-out.md; default: none, one instance alone; "
                           "COORDINATOR_REDIS_URL)")
            p.add_argument("--instance-id", default=None, metavar="NAME",
                           help="this instance's name in the cluster (default: "
                           "hostname-pid, COORDINATOR_INSTANCE_ID)")
            p.add_argument("--cluster-port", type=_port, default=None,
                           help="port for other instances' links (default: 8002, "
                           "COORDINATOR_CLUSTER_PORT)")
        if name == "demo":
            p.add_argument("--providers", type=_positive, default=4,
                           help="simulated providers to start (default: 4)")
            p.add_argument("--engine", default=None, metavar="URL",
                           help="instead of the simulated providers, a provider agent for the "
                           "OpenAI-compatible engine at URL (e.g. `provider-agent "
                           "tiny-engine`'s http://127.0.0.1:8080)")
    from coordinator.loadgen.cli import add_arguments

    add_arguments(sub.add_parser(
        "load", help="drive an OpenAI-compatible URL with concurrent consumers (loopback only)",
        description="Concurrent keep-alive consumers against any OpenAI-compatible URL on "
        "loopback, bounded in count and time; without --url, an embedded coordinator and a "
        "simulated fleet. Exit status: 0; 1 when more than --max-error-rate of the requests "
        "failed; 2 for a flag that cannot be used; 130 after Ctrl-C and 143 after SIGTERM, "
        "which stop the run and print the partial report of what completed."))
    add_keys_arguments(sub.add_parser(
        "keys", help="add, list, show or revoke named API keys (docs/accounts.md)",
        description="Named API keys, in the keys file `coordinator serve` uses (or Redis): "
        "a running coordinator sees a change within half a second. Exit status: 0; 1 for "
        "a key that does not exist or a name taken; 2 for a flag that cannot be used or a "
        "store that cannot be opened."))
    return parser


def _config_from(args: argparse.Namespace, **extra: Any) -> Config:
    return Config.from_env(
        http_host=args.host,
        http_port=args.port,
        provider_host=args.provider_host,
        provider_port=args.provider_port,
        redis_url=getattr(args, "redis_url", None),
        instance_id=getattr(args, "instance_id", None),
        cluster_port=getattr(args, "cluster_port", None),
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


def _signals() -> Any:
    """SIGINT and SIGTERM as a stream, from before anything is served (no KeyboardInterrupt)."""
    return trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)


async def _until_signalled(running: Running, signals: Any) -> None:
    """Serve until SIGTERM/SIGINT, then drain; a second signal stops at once."""
    async for signum in signals:
        print(f"\n{signal.Signals(signum).name}: draining for up to "
              f"{running.coordinator.config.drain_timeout:g}s "
              "(send it again to stop at once)", flush=True)
        break
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_second_signal, signals, running)
        await running.shutdown()
        nursery.cancel_scope.cancel(reason="drained")
    print("coordinator stopped", flush=True)


async def _stop_on_second_signal(signals: Any, running: Running) -> None:
    async for _ in signals:
        running.stop()
        return


async def _serve(config: Config) -> None:
    with _signals() as signals:
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(serve, config)
            print(f"coordinator: HTTP on {running.http_url}, providers on "
                  f"{running.provider_url}", flush=True)
            await _until_signalled(running, signals)


async def _demo(config: Config, providers: int, engine: str | None) -> None:
    with _signals() as signals:
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(serve, config)
            if engine is None:
                ready = await _simulated_fleet(nursery, running, config, providers)
            else:
                ready = await _engine_agent(nursery, running, config, engine)
            print(_demo_banner(running, config, ready), flush=True)
            await _until_signalled(running, signals)
            nursery.cancel_scope.cancel(reason="the demo is over")  # its providers


async def _simulated_fleet(nursery: trio.Nursery, running: Running, config: Config,
                           providers: int) -> tuple[str, str]:
    """Start the simulated fleet; (what serves, the model for the curl)."""
    from provider_sim.behaviours import Behaviour
    from provider_sim.fleet import demo_fleet, run_fleet

    # Paced like a real model (about 30 tokens/s) so the stream is visible.
    fleet = demo_fleet(providers, token=config.provider_tokens[0],
                       behaviour=Behaviour(token_interval=0.03, tokens=40))
    nursery.start_soon(run_fleet, fleet, running.provider_url)
    await running.registry.wait_for_providers(providers)
    return (f"{providers} simulated provider{'' if providers == 1 else 's'} "
            "(models: sim-chat-small, sim-vision-large)", "sim-chat-small")


async def _engine_agent(nursery: trio.Nursery, running: Running, config: Config,
                        engine: str) -> tuple[str, str]:
    """Start a provider agent (fresh keys: the demo's coordinator is new) for ``engine``."""
    from provider_agent.agent import AgentConfig, run_agent
    from provider_link.keys import ProviderKeys

    agent = AgentConfig(engine, (running.provider_url,), config.provider_tokens[0],
                        ProviderKeys.generate(), "demo-agent")
    print(f"waiting for the engine at {engine} …", flush=True)
    provider = await nursery.start(run_agent, agent)
    await running.registry.wait_for_provider("demo-agent")
    models = ", ".join(m.id for m in provider.catalog.models)
    return f"a provider agent for the engine at {engine} (models: {models})", \
        provider.catalog.models[0].id


def _demo_banner(running: Running, config: Config, ready: tuple[str, str]) -> str:
    key, admin = config.api_keys[0], config.admin_keys[0]
    serving, model = ready
    return (
        f"\nCoordinator ready with {serving}.\n"
        f"  HTTP API   {running.http_url}\n"
        f"  providers  {running.provider_url}\n"
        f"  API key    {key}\n"
        f"  admin key  {admin}\n\n"
        "Stream tokens:\n\n"
        f"  curl -N {running.http_url}/v1/chat/completions \\\n"
        f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\": \"{model}\", \"stream\": true, "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'\n\n"
        f"Status page: {running.http_url}/status (sign in with the admin key)\n"
        f"Providers:   curl {running.http_url}/v1/admin/providers "
        f"-H 'Authorization: Bearer {admin}'\n"
        "Press Ctrl-C to stop (it drains first).")


def _fail(message: str) -> NoReturn:
    print(f"coordinator: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "load":
        from coordinator.loadgen.cli import run_from_args

        status = run_from_args(args)  # it routes log records itself, above its progress bar
        if status:
            sys.exit(status)
        return
    if args.command == "keys":
        try:
            status = run_keys(args, _fail)
        except* (StoreError, StoreUnavailable) as group:
            _fail("; ".join(str(exc) for exc in _leaves(group)))
        if status:
            sys.exit(status)
        return
    logging.basicConfig(level=args.log_level, handlers=[line_safe_handler(
        sys.stderr, "%(asctime)s %(levelname)s %(name)s %(message)s")])
    for warning in unknown_variables():
        log.warning("%s", warning)
    try:
        if args.command == "demo":
            config = _config_from(
                args,
                api_keys=("demo-" + secrets.token_hex(8),),
                admin_keys=("admin-" + secrets.token_hex(8),),
                provider_tokens=("demo-provider-token",),
            )
        else:
            config = with_default_keys_db(_generated_secrets(_config_from(args)))
    except ConfigError as exc:
        _fail(str(exc))
    try:
        if args.command == "demo":
            trio.run(_demo, config, args.providers, args.engine)
        else:
            trio.run(_serve, config)
    except* (ListenError, PinFileError, StoreError) as group:
        _fail("; ".join(str(exc) for exc in _leaves(group)))


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in ``group``, however deeply nurseries nested them."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


if __name__ == "__main__":
    main()

"""``provider-agent``: serve a local inference engine's models through a coordinator.

    provider-agent init [--keys PATH]          make this machine's provider keys (once)
    provider-agent --engine URL --coordinator ws://HOST:PORT/ --token TOKEN [...]
    provider-agent tiny-engine [--port 8080]   a tiny model made on the spot, served by
                                               llama.cpp (needs the [engine] extra)

Exit status: 0 after SIGINT/SIGTERM; 2 for a flag or key file that cannot be used.
docs/provider-agent.md says how to run it next to each engine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from coordinator.untrusted import line_safe_handler
from provider_link.cli import USAGE_ERROR, OneLineParser, at_least
from provider_link.keys import KeyFileError, create_keys, default_key_file, load_keys
from provider_link.signals import run_until_signalled

from .agent import AgentConfig, run_agent
from .catalog import Wanted

TOKEN_VARIABLE = "PROVIDER_AGENT_TOKEN"


def _url(schemes: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        urls = [u.strip() for u in text.split(",") if u.strip()]
        for url in urls or [text]:
            parts = urlsplit(url)
            if parts.scheme not in schemes or not parts.hostname:
                raise argparse.ArgumentTypeError(
                    f"{url!r} is not a {' or '.join(s + '://' for s in schemes)} URL")
        return urls
    return parse


def run_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="provider-agent", description="Serve a local inference engine's "
                     "models (llama.cpp, vLLM, SGLang, Ollama, mlx_lm: anything OpenAI-"
                     "compatible) through a coordinator. Other commands: `provider-agent init` "
                     "makes the key file; `provider-agent tiny-engine` runs a tiny real engine.")
    parser.add_argument("--engine", required=True, type=_url(("http", "https")),
                        metavar="URL", help="the engine's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--coordinator", required=True, type=_url(("ws", "wss")),
                        metavar="URL", help="the coordinator's provider URL (ws:// or wss://); "
                        "several, comma-separated: the next is tried when one is gone")
    parser.add_argument("--token", default=None, help="the coordinator's provider token "
                        f"(default: ${TOKEN_VARIABLE}; a flag shows in `ps`, the variable "
                        "does not)")
    parser.add_argument("--keys", default=None, metavar="PATH",
                        help=f"this provider's key file (default: {default_key_file()}); "
                        "make it once with `provider-agent init`")
    parser.add_argument("--id", default=None, dest="provider_id",
                        help="an explicit provider id (pinned to the keys by the coordinator); "
                        "default: one derived from the keys")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="serve this model (repeatable); default: every model the "
                        "engine's /v1/models lists")
    parser.add_argument("--model-dir", default=None, metavar="DIR",
                        help="a Hugging Face snapshot directory with the model's chat template "
                        "(tokenizer_config.json or chat_template.jinja), when the engine does "
                        "not show it (llama.cpp does, in /props)")
    parser.add_argument("--max-concurrency", type=at_least(1), default=None,
                        help="requests at once (default: the engine's slots where it says, "
                        "llama.cpp's /props, else 1)")
    parser.add_argument("--events-per-frame", type=at_least(1), default=16,
                        help="engine events already received that go in one frame (default: 16)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="declare no speed instead of timing one short request at start")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level (default: INFO)")
    return parser


def init_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="provider-agent init",
                     description="Make this provider's keys and write them to a key file "
                     "(mode 0600). Do it once: a new key is a new identity.")
    parser.add_argument("--keys", default=None, metavar="PATH",
                        help=f"where (default: {default_key_file()})")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tiny-engine"]:
        from .tiny import main as tiny_main

        tiny_main(argv[1:])
        return
    if argv[:1] == ["init"]:
        args = init_parser().parse_args(argv[1:])
        path = Path(args.keys) if args.keys else default_key_file()
        try:
            keys = create_keys(path)
        except KeyFileError as exc:
            _fail(str(exc))
        print(f"keys written to {path} (signing key {keys.signing_public_key})")
        return
    if argv[:1] == ["run"]:
        argv = argv[1:]
    parser = run_parser()
    args = parser.parse_args(argv)
    token = args.token or os.environ.get(TOKEN_VARIABLE, "")
    if not token:
        parser.error(f"no provider token: --token, or ${TOKEN_VARIABLE}")
    try:
        keys = load_keys(Path(args.keys) if args.keys else default_key_file())
    except KeyFileError as exc:
        _fail(str(exc))
    logging.basicConfig(level=args.log_level, handlers=[
        line_safe_handler(sys.stderr, "%(asctime)s %(name)s %(message)s")])
    wanted = Wanted(models=tuple(args.model),
                    model_dir=Path(args.model_dir) if args.model_dir else None,
                    max_concurrency=args.max_concurrency, calibrate=not args.no_calibrate)
    config = AgentConfig(engine_url=args.engine[0], coordinators=tuple(args.coordinator),
                         token=token, keys=keys, provider_id=args.provider_id, wanted=wanted,
                         events_per_frame=args.events_per_frame)
    run_until_signalled(run_agent, config)


def _fail(message: str) -> NoReturn:
    print(f"provider-agent: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


if __name__ == "__main__":
    main()

"""``coordinator load`` on the command line: flags, the embedded fleet, signals, exit status.

Exit status: 0 when the run's error rate is at most ``--max-error-rate``; 1 past
it (or when no request completed, or the report could not be written), with one
line saying why; 2 for a flag that cannot be used (one line naming it);
128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM) when a signal
stopped the run, after writing the partial report of what completed so far.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import attrs
import trio

from .load import CHAT, PATHS, Mix, first_of, loopback_address, run_load, summary, write_cdf
from .progress import ProgressBar, bar_for, logging_above

# The embedded fleet fails 5 % of requests right after the role chunk with a 500.
# The coordinator retries each on another provider before any content reaches
# the consumer, so a plain run shows the invisible failover at work: the report
# has them only in the coordinator's counters (retry_precontent, cooldowns) and
# the consumers see 100 % success. Faults that cannot be hidden (a provider
# dropping its socket mid-stream) are opt-in; docs/simulator.md measures them.
DEFAULT_FAULT_MIX = "role_then_error=0.05"

# Past this share of failed requests the run exits 1. A half is far above what
# the documented fault mixes make visible (about 10 % with role_then_disconnect),
# so deliberate fault runs pass, while a run that mostly fails (a wrong key, URL
# or model, nothing listening) is a broken set-up, not a measurement.
DEFAULT_MAX_ERROR_RATE = 0.5

MAX_DURATION = 600.0
MAX_CONCURRENCY = 10_000  # one socket each
MAX_TOKENS = 100_000
MAX_EMBEDDED = 1_000
MAX_REQUESTS = 10**9


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be a whole number from {low} to {high:,}, not {text!r}")
        return value
    return parse


def _loopback_url(text: str) -> str:
    try:
        loopback_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= MAX_DURATION:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_DURATION:g} seconds, not {text!r}")
    return value


@attrs.frozen
class FaultMix:
    text: str
    entries: tuple[tuple[float, Any], ...]  # (probability, provider_sim Behaviour)


def parse_fault_mix(text: str) -> FaultMix:
    """``behaviour=probability,...``; a bad entry is one line naming it (argparse's type)."""
    from provider_sim.behaviours import parse_behaviour

    entries = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        spec, equals, probability = part.rpartition("=")
        if not equals or not spec:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected BEHAVIOUR=PROBABILITY, e.g. role_then_error=0.05")
        try:
            share = float(probability)
        except ValueError:
            share = math.nan
        if not 0.0 <= share <= 1.0:
            raise argparse.ArgumentTypeError(
                f"{part!r}: the probability must be a fraction from 0 to 1, not {probability!r}")
        try:
            entries.append((share, parse_behaviour(spec)))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{part!r}: {exc}") from None
    total = sum(share for share, _ in entries)
    if total > 1.0 + 1e-9:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the probabilities add up to {total:g}, more than 1")
    return FaultMix(text, tuple(entries))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", type=_loopback_url, default=None,
                        help="target, loopback only (default: an embedded coordinator and fleet)")
    parser.add_argument("--key", default="", help="API key for --url (default: none)")
    parser.add_argument("--model", default="sim-chat-small", help="model (default: %(default)s)")
    parser.add_argument("--path", default=CHAT, choices=PATHS,
                        help="endpoint; bodies take its shape (default: %(default)s)")
    parser.add_argument("--concurrency", type=_int_in(1, MAX_CONCURRENCY), default=16,
                        help=f"concurrent consumers, 1 to {MAX_CONCURRENCY:,}, each with "
                        "one keep-alive connection (default: %(default)s)")
    parser.add_argument("--duration", type=_seconds, default=10.0,
                        help=f"seconds, more than 0 and at most {MAX_DURATION:g} "
                        "(default: %(default)s)")
    parser.add_argument("--requests", type=_int_in(1, MAX_REQUESTS), default=None,
                        help="stop after this many, at least 1 (default: no limit but "
                        "--duration)")
    parser.add_argument("--stream", type=_fraction, default=0.8,
                        help="fraction streaming, 0 to 1 (default: %(default)s)")
    parser.add_argument("--tools", type=_fraction, default=0.1,
                        help="fraction with tools, 0 to 1 (default: %(default)s)")
    parser.add_argument("--images", type=_fraction, default=0.0,
                        help="fraction with an image, 0 to 1; needs a vision model such as "
                        "sim-vision-large (default: %(default)s)")
    parser.add_argument("--tokens", type=_int_in(1, MAX_TOKENS), default=16,
                        help="max_tokens per request (default: %(default)s)")
    parser.add_argument("--embedded", type=_int_in(1, MAX_EMBEDDED), default=4,
                        help="providers of the embedded fleet, without --url "
                        "(default: %(default)s)")
    parser.add_argument("--fault-mix", type=parse_fault_mix, default=DEFAULT_FAULT_MIX,
                        metavar="BEHAVIOUR=P,...",
                        help="what the embedded fleet does with a share of requests, e.g. "
                        "role_then_error=0.05,role_then_disconnect=0.02 (behaviours: "
                        "docs/simulator.md); '' for a healthy fleet (default: %(default)s)")
    parser.add_argument("--max-error-rate", type=_fraction, default=DEFAULT_MAX_ERROR_RATE,
                        metavar="FRACTION",
                        help="exit 1 when more than this fraction of requests fail, 0 to 1 "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write the report here (default: no)")
    parser.add_argument("--cdf", default=None, metavar="FILE",
                        help="write a latency CDF PNG here; needs matplotlib (default: no)")


def failure_reason(report: dict[str, Any], max_error_rate: float) -> str | None:
    """Why this run failed (one line), or None when its error rate is acceptable."""
    requests = report["requests"]
    if not requests:
        return "no request completed"
    rate = (requests - report["ok"]) / requests
    if rate <= max_error_rate:
        return None
    common = sorted(report["errors"].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    kinds = ", ".join(f"{kind} x{count}" for kind, count in common)
    return (f"{rate:.1%} of {requests} requests failed ({kinds}), more than "
            f"--max-error-rate {max_error_rate:g}")


async def run_embedded(args: argparse.Namespace, stop: trio.Event,
                       bar: ProgressBar | None) -> dict[str, Any] | None:
    """A coordinator and a simulated fleet in this process, then the load; None if
    ``stop`` is set before the fleet is up."""
    from coordinator.app import serve
    from coordinator.config import Config
    from provider_sim.behaviours import Behaviour
    from provider_sim.fleet import demo_fleet, run_fleet

    config = Config(http_port=0, provider_port=0, api_keys=("load",),
                    provider_tokens=("demo-provider-token",), seed=args.seed)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(serve, config)
        fleet = demo_fleet(args.embedded, behaviour=Behaviour(tokens=args.tokens), seed=args.seed)
        for provider in fleet:
            provider.fault_mix = args.fault_mix.entries
        nursery.start_soon(run_fleet, fleet, running.provider_url)
        everyone = partial(running.registry.wait_for_providers, len(fleet))
        report = None
        if not await first_of(stop, everyone):
            report = await _run(args, running.http_url, "load", stop, bar)
        nursery.cancel_scope.cancel(reason="load run over")
    return report


async def _run(args: argparse.Namespace, url: str, key: str, stop: trio.Event,
               bar: ProgressBar | None) -> dict[str, Any]:
    return await run_load(
        url, key=key, model=args.model, concurrency=args.concurrency,
        duration=args.duration, requests=args.requests,
        mix=Mix(args.stream, args.tools, args.images), tokens=args.tokens, seed=args.seed,
        path=args.path, stop=stop, bar=bar, show_progress=bar is not None)


async def _watch_signals(signals: AsyncIterator[int], stop: trio.Event, caught: list[int],
                         everything: trio.CancelScope, bar: ProgressBar | None) -> None:
    """The first signal ends the load (the partial report follows); a second, everything."""
    async for signum in signals:
        name = signal.Signals(signum).name
        caught.append(signum)
        if len(caught) == 1:
            _say(bar, f"{name}: stopping; the partial report follows "
                      "(send it again to stop at once)")
            stop.set()
            continue
        _say(bar, f"{name} again: stopping at once")
        everything.cancel(reason="signalled twice")
        return


def _say(bar: ProgressBar | None, text: str) -> None:
    if bar is None:
        print(text, file=sys.stderr, flush=True)
        return
    with bar.lifted():
        print(text, file=sys.stderr)


async def _interruptible(args: argparse.Namespace,
                         bar: ProgressBar | None) -> tuple[dict[str, Any] | None, int | None]:
    """The run's report (None if it never got one) and the signal that stopped it, if any."""
    stop = trio.Event()
    caught: list[int] = []
    report = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, stop, caught, nursery.cancel_scope, bar)
            report = await (run_embedded(args, stop, bar) if args.url is None
                            else _run(args, args.url, args.key, stop, bar))
            nursery.cancel_scope.cancel(reason="the run is over")
    return report, (caught[0] if caught else None)


def _describe_start(args: argparse.Namespace) -> str:
    target = args.url or (f"an embedded coordinator with {args.embedded} simulated "
                          f"provider(s), fault mix {args.fault_mix.text or 'none'}")
    budget = f"{args.duration:g}s" + (f" or {args.requests} requests" if args.requests else "")
    return (f"load: {args.concurrency} consumer(s) for {budget} against {target} "
            "(Ctrl-C stops early with a partial report)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run, print and write the report; the exit status (module docstring)."""
    bar = bar_for(sys.stderr)
    print(_describe_start(args), file=sys.stderr, flush=True)
    with logging_above(bar, sys.stderr):
        try:
            report, signum = trio.run(_interruptible, args, bar)
        except KeyboardInterrupt:  # Ctrl-C before the signal receiver was open
            report, signum = None, signal.SIGINT
    interrupted = 128 + signum if signum is not None else None
    if report is None:  # stopped before the load began, or a second signal
        print("stopped: no report", file=sys.stderr)
        return interrupted or 1
    if signum is not None:
        report["interrupted_by"] = signal.Signals(signum).name
    print(summary(report))
    status = _write_outputs(report, args)
    if interrupted is not None:
        return interrupted
    reason = failure_reason(report, args.max_error_rate)
    if reason is not None:
        print(f"coordinator load: failed: {reason}", file=sys.stderr)
        return 1
    return status


def _write_outputs(report: dict[str, Any], args: argparse.Namespace) -> int:
    try:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump({k: v for k, v in report.items() if not k.startswith("_")}, out,
                          indent=2)
            print(f"report written to {args.json}")
        if args.cdf:
            print(write_cdf(report, args.cdf))
    except OSError as exc:
        print(f"coordinator load: cannot write the report: {exc}", file=sys.stderr)
        return 1
    return 0

"""Fleets of simulated providers: the demo fleet, TOML fleet files, churn.

A fleet file::

    seed = 7
    token = "demo-provider-token"

    [[provider]]
    id = "old-gemma"          # with count > 1: old-gemma-0, old-gemma-1, ...
    count = 2
    version = "0.6.2"
    decode_tps = 40.0
    prefill_tps = 800.0
    pace = true               # delays follow the rates
    sse_chunks = false        # frame chunk payloads as SSE ("data: {...}\\n\\n")
    max_request_bytes = 1048576  # the largest request frame accepted (declared in register)
    max_concurrency = 8       # declared in register
    memory_gb = 64.0
    events_per_frame = 1      # up to this many ready events in one frame (SSE-framed)
    behaviour = "healthy"     # fault[:key=value,...]
    script = ["role_then_error:status=500"]   # consumed one per request first
    churn = { every = 60.0, down_for = 5.0 }  # drop the socket and come back

    [[provider.model]]
    id = "gemma-3-4b"
    snapshot = "provider_sim/snapshots/gemma-upper"  # template + template_render_ok
    vision = false
    size_bytes = 4000000000
    model_type = "chat"
    quantization = "4bit"
    template_render_ok = true # without a snapshot
    behaviour = "stall"       # this model's default

    [provider.fault_mix]      # per request, with these probabilities (seeded)
    "role_then_error:status=500" = 0.05
    "stall_after_role" = 0.01

Any other key is an error (a misspelled one would otherwise be ignored in silence).
"""

from __future__ import annotations

import itertools
import logging
import random
import tomllib
from collections import deque
from pathlib import Path
from typing import Any

import attrs
import trio

from coordinator.protocol import ModelInfo
from coordinator.untrusted import printable

from .behaviours import HEALTHY, Behaviour, parse_behaviour
from .provider import SimProvider
from .template_check import check_snapshot, collect_templates, is_vision_snapshot

log = logging.getLogger(__name__)


def _describe(exc: BaseException) -> str:
    """An exception's message, and the first underlying error that says why.

    trio-websocket's HandshakeError wraps trio's "all attempts to connect ...
    failed", which wraps the operating system's reasons (one per address).
    """
    text = str(exc) or type(exc).__name__
    seen, cause = {id(exc)}, exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]  # its message only repeats the wrapper's
            continue
        if str(cause) and str(cause) not in text:
            text += f" ({cause})"
        cause = cause.__cause__ or cause.__context__
    return text


DEMO_MODELS = (
    ModelInfo("sim-chat-small", size_bytes=4 * 1024**3, model_type="chat", quantization="4bit"),
    ModelInfo("sim-vision-large", size_bytes=20 * 1024**3, model_type="chat",
              quantization="4bit", is_vision=True, template_render_ok=True),
)


@attrs.frozen
class Churn:
    every: float
    down_for: float = 1.0


@attrs.define
class FleetMember:
    provider: SimProvider
    churn: Churn | None = None


def demo_fleet(n: int = 4, token: str = "demo-provider-token",
               behaviour: Behaviour = HEALTHY, seed: int = 0) -> list[SimProvider]:
    """``n`` providers serving the two demo models, on mixed versions."""
    versions = ("0.7.0", "0.6.4", "0.7.0", "0.6.5")
    return [
        SimProvider(
            provider_id=f"sim-{i}",
            models=DEMO_MODELS,
            token=token,
            version=versions[i % len(versions)],
            behaviour=behaviour,
            decode_tps=150.0 + 25 * i,
            seed=seed + i,
        )
        for i in range(n)
    ]


_FILE_KEYS = frozenset({"seed", "token", "provider"})
_PROVIDER_KEYS = frozenset({
    "id", "count", "version", "decode_tps", "prefill_tps", "pace", "sse_chunks",
    "max_request_bytes", "max_concurrency", "memory_gb", "events_per_frame", "behaviour",
    "script", "churn", "model", "fault_mix"})
_MODEL_KEYS = frozenset({"id", "snapshot", "vision", "size_bytes", "model_type",
                         "quantization", "template_render_ok", "behaviour"})


def _known(spec: dict[str, Any], keys: frozenset[str], where: str) -> None:
    unknown = sorted(set(spec) - keys)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(sorted(keys))})")


def _model(spec: dict[str, Any], base: Path) -> tuple[ModelInfo, str | None, Behaviour | None]:
    _known(spec, _MODEL_KEYS, f"model {spec.get('id', '?')!r}")
    template = None
    render_ok = spec.get("template_render_ok")
    vision = spec.get("vision")
    if "snapshot" in spec:
        snapshot = Path(spec["snapshot"])
        snapshot = snapshot if snapshot.is_absolute() else base / snapshot
        render_ok = check_snapshot(snapshot)
        templates = collect_templates(snapshot)
        template = next(iter(templates.values()), None)
        vision = vision if vision is not None else is_vision_snapshot(snapshot)
    info = ModelInfo(str(spec["id"]), size_bytes=int(spec.get("size_bytes", 4 * 1024**3)),
                     model_type=str(spec.get("model_type", "chat")),
                     quantization=str(spec.get("quantization", "4bit")),
                     is_vision=bool(vision) or None, template_render_ok=render_ok)
    behaviour = parse_behaviour(spec["behaviour"]) if "behaviour" in spec else None
    return info, template, behaviour


def load_fleet(path: Path | str, *, token: str | None = None) -> tuple[list[FleetMember], dict[str, Any]]:
    """Members described by a TOML fleet file, and its top-level settings.

    Raises ``ValueError`` (or ``OSError``) saying what in the file is wrong."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not TOML ({exc})") from None
    _known(doc, _FILE_KEYS, str(path))
    base = Path.cwd()
    seed = int(doc.get("seed", 0))
    token = token or str(doc.get("token", "demo-provider-token"))
    members: list[FleetMember] = []
    for p_index, spec in enumerate(doc.get("provider", [])):
        _known(spec, _PROVIDER_KEYS, f"provider {spec.get('id', p_index)!r}")
        models = [_model(m, base) for m in spec.get("model", [])] or [
            (m, None, None) for m in DEMO_MODELS]
        count = int(spec.get("count", 1))
        name = str(spec.get("id", f"p{p_index}"))
        churn = spec.get("churn")
        for i in range(count):
            provider = SimProvider(
                provider_id=name if count == 1 else f"{name}-{i}",
                models=tuple(m for m, _, _ in models),
                token=token,
                version=str(spec.get("version", "0.7.0")),
                behaviour=parse_behaviour(spec.get("behaviour", "healthy")),
                script=deque(parse_behaviour(s) for s in spec.get("script", [])),
                decode_tps=float(spec.get("decode_tps", 200.0)),
                prefill_tps=float(spec.get("prefill_tps", 2000.0)),
                memory_gb=float(spec.get("memory_gb", 64.0)),
                max_concurrency=int(spec.get("max_concurrency", 8)),
                max_request_bytes=int(spec.get("max_request_bytes", 1024 * 1024)),
                sse_chunks=bool(spec.get("sse_chunks", False)),
                events_per_frame=int(spec.get("events_per_frame", 1)),
                pace=bool(spec.get("pace", False)),
                fault_mix=tuple((float(p), parse_behaviour(b))
                                for b, p in spec.get("fault_mix", {}).items()),
                model_behaviours={m.id: b for m, _, b in models if b is not None},
                templates={m.id: t for m, t, _ in models if t is not None},
                seed=seed * 1000 + p_index * 100 + i,
            )
            members.append(FleetMember(provider, Churn(**churn) if churn else None))
    return members, {k: v for k, v in doc.items() if k != "provider"}


MAX_BACKOFF = 30.0


async def run_fleet(providers: list[SimProvider] | list[FleetMember], url: str | list[str], *,
                    reconnect: bool = True) -> None:
    """Run every provider against ``url`` until cancelled, reconnecting after drops.

    With several URLs (coordinator instances), each provider starts at a
    different one and moves to the next when its connection fails or drops.
    """
    urls = [url] if isinstance(url, str) else list(url)
    members = [m if isinstance(m, FleetMember) else FleetMember(m) for m in providers]
    async with trio.open_nursery() as nursery:
        for i, member in enumerate(members):
            nursery.start_soon(_keep_connected, member, urls[i % len(urls):] + urls[:i % len(urls)],
                               reconnect)


async def _keep_connected(member: FleetMember, urls: list[str], reconnect: bool) -> None:
    provider = member.provider
    failures = 0
    jitter = random.Random(provider.seed)  # reproducible, like everything a fleet draws
    for url in itertools.cycle(urls):
        # Churn is a budget on the connection: a cancel scope, then a pause.
        with trio.move_on_after(member.churn.every if member.churn else float("inf")):
            provider.closed_with = None
            admitted_before = provider.admissions
            try:
                await provider.run(url)
            except (OSError, trio.BrokenResourceError) as exc:
                log.warning("%s: cannot connect to %s: %s", provider.provider_id, url,
                            printable(_describe(exc), 300))
            except Exception as exc:  # the handshake library raises its own types
                # A refused handshake quotes the coordinator's answer: outside text.
                log.warning("%s: connection to %s failed: %s", provider.provider_id, url,
                            printable(_describe(exc), 300))
            else:
                if provider.closed_with is not None:
                    log.warning("%s: the coordinator closed the connection: %d %s",
                                provider.provider_id, provider.closed_with,
                                printable(provider.closed_reason, 120) or "(no reason given)")
        if not reconnect:
            return
        failures = 0 if provider.admissions > admitted_before else failures + 1
        if member.churn and not failures:
            await trio.sleep(member.churn.down_for)
        else:
            # Back off, with jitter, so a fleet refused together does not return together.
            await trio.sleep(min(MAX_BACKOFF, 2.0 ** failures) * jitter.uniform(0.5, 1.0))

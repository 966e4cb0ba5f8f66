"""What the agent tells the coordinator: its models, what each can do, its capacity and speed.

Read from the engine at start-up and each time it comes back (:func:`discover`):

* **models** — the engine's ``/v1/models`` (or ``--model`` names);
* **endpoints** per model — which inference endpoints the engine has routes for
  (``engine.probe_endpoints``), so the coordinator routes nothing it cannot serve;
* **the chat template** — llama.cpp's ``/props`` ``chat_template``, or a Hugging Face
  snapshot given with ``--model-dir`` — rendered against the canonical fixtures in a
  sandbox (``provider_link.template_check``): ``template_render_ok`` is True, False
  (tool requests, and every other, route elsewhere: the engine never sees them) or
  None (no template to judge);
* **vision** — llama.cpp's ``/props`` ``modalities``;
* **capacity** — llama.cpp's ``/props`` ``total_slots``, else ``--max-concurrency``;
* **speed** — one short greedy request, timed (:func:`calibrate`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from pathlib import Path
from typing import Any

import attrs
import trio

from coordinator.protocol import Hardware, ModelInfo
from coordinator.protocol.endpoints import Endpoint
from coordinator.untrusted import printable
from provider_link.template_check import check_snapshot, check_templates

from .engine import Engine, EngineRefused, probe_endpoints
from .sse import EventSplitter, event_data

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 1


@attrs.frozen
class Catalog:
    models: tuple[ModelInfo, ...]
    max_concurrency: int
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    backend: str = "openai-compatible"


@attrs.frozen
class Wanted:
    """What the operator said (flags); the rest is read from the engine."""

    models: tuple[str, ...] = ()
    model_dir: Path | None = None
    max_concurrency: int | None = None
    calibrate: bool = True


async def discover(engine: Engine, wanted: Wanted) -> Catalog:
    """The catalog, read from the engine now. Raises ``EngineDown``/``EngineRefused``."""
    listed = await engine.get("/v1/models")
    names = wanted.models or _model_names(listed)
    if not names:
        raise EngineRefused(502, "the engine lists no models (name one with --model)")
    props = await engine.get("/props")  # llama.cpp's; None elsewhere
    endpoints = await probe_endpoints(engine)
    backend = _backend_of(props, listed)
    sizes = _sizes(listed)
    models = tuple(_model_info(name, props, endpoints, wanted, sizes.get(name, 0))
                   for name in names)
    slots = props.get("total_slots") if isinstance(props, dict) else None
    concurrency = wanted.max_concurrency or (slots if isinstance(slots, int) and slots > 0
                                             else DEFAULT_CONCURRENCY)
    catalog = Catalog(models, concurrency, backend=backend)
    if wanted.calibrate:
        decode, prefill = await calibrate(engine, names[0])
        catalog = attrs.evolve(catalog, decode_tps=decode, prefill_tps=prefill)
    return catalog


def _model_names(listed: Any) -> tuple[str, ...]:
    data = listed.get("data") if isinstance(listed, dict) else None
    names = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
    return tuple(dict.fromkeys(n for n in names if isinstance(n, str) and n))


def _sizes(listed: Any) -> dict[str, int]:
    """Model file sizes, where the engine says (llama.cpp: ``meta.size``)."""
    data = listed.get("data") if isinstance(listed, dict) else None
    sizes = {}
    for entry in data if isinstance(data, list) else ():
        meta = entry.get("meta") if isinstance(entry, dict) else None
        size = meta.get("size") if isinstance(meta, dict) else None
        if isinstance(entry.get("id"), str) and isinstance(size, int) and 0 <= size < 2**50:
            sizes[entry["id"]] = size
    return sizes


def _backend_of(props: Any, listed: Any) -> str:
    if isinstance(props, dict) and "total_slots" in props:
        build = props.get("build_info")
        return f"llama.cpp {printable(build, 40)}" if isinstance(build, str) else "llama.cpp"
    data = listed.get("data") if isinstance(listed, dict) else None
    owner = data[0].get("owned_by") if isinstance(data, list) and data and isinstance(
        data[0], dict) else None
    return printable(owner, 64) if isinstance(owner, str) and owner else "openai-compatible"


def _model_info(name: str, props: Any, endpoints: tuple[str, ...], wanted: Wanted,
                size: int) -> ModelInfo:
    props = props if isinstance(props, dict) else {}
    modalities = props.get("modalities")
    vision = bool(modalities.get("vision")) if isinstance(modalities, dict) else False
    verdict = template_verdict(props, wanted.model_dir, vision)
    return ModelInfo(name, size_bytes=size, model_type="chat",
                     is_vision=vision or None, template_render_ok=verdict,
                     endpoints=endpoints or (Endpoint.CHAT.value,))


def template_verdict(props: dict[str, Any], model_dir: Path | None, vision: bool) -> bool | None:
    """The self-check's verdict: the snapshot's templates if given, else the engine's."""
    if model_dir is not None:
        return check_snapshot(model_dir)
    template = props.get("chat_template")
    if not isinstance(template, str) or not template:
        return None
    tokens = {k: v for k in ("bos_token", "eos_token")
              if isinstance(v := props.get(k), str)}
    return check_templates({"engine /props": template}, tokens, vision)


async def calibrate(engine: Engine, model: str, tokens: int = 32) -> tuple[float, float]:
    """(decode, prefill) tokens per second from one short greedy request, timed here.

    0.0 for what could not be measured (the coordinator then learns from real requests).
    """
    prompt = "Count to ten. " * 16
    body = {"model": model, "stream": True, "max_tokens": tokens, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}
    splitter = EventSplitter(1024 * 1024)
    started = trio.current_time()
    first: float | None = None
    usage: dict[str, Any] = {}
    try:
        async with engine.stream(Endpoint.CHAT.value, body) as stream:
            async for data in stream:
                for event in splitter.feed(data):
                    parsed = event_data(event)
                    if not isinstance(parsed, dict):
                        continue
                    if first is None and any(
                            (c.get("delta") or {}).get("content")
                            for c in parsed.get("choices") or () if isinstance(c, dict)):
                        first = trio.current_time()
                    if isinstance(parsed.get("usage"), dict):
                        usage = parsed["usage"]
    except EngineRefused as exc:
        log.warning("calibration request refused (%s); declaring no speed", exc)
        return 0.0, 0.0
    ended = trio.current_time()
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    if first is None or not isinstance(completion_tokens, int) or completion_tokens < 2:
        return 0.0, 0.0
    decode = (completion_tokens - 1) / max(ended - first, 1e-3)
    prefill = (prompt_tokens / max(first - started, 1e-3)
               if isinstance(prompt_tokens, int) else 0.0)
    return round(decode, 1), round(prefill, 1)


def hardware() -> Hardware:
    """What this machine is, as the coordinator's status page shows it."""
    memory_gb = 0.0
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    chip = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                chip = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return Hardware(printable(platform.node() or "agent", 64), printable(chip, 64),
                    round(memory_gb, 1))

"""A fleet of simulated providers in one process."""

from __future__ import annotations

import logging

import trio

from coordinator.protocol import ModelInfo

from .behaviours import HEALTHY, Behaviour
from .provider import SimProvider

log = logging.getLogger(__name__)

DEMO_MODELS = (
    ModelInfo("sim-chat-small", size_bytes=4 * 1024**3, model_type="chat", quantization="4bit"),
    ModelInfo("sim-vision-large", size_bytes=20 * 1024**3, model_type="chat",
              quantization="4bit", is_vision=True, template_render_ok=True),
)


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


async def run_fleet(providers: list[SimProvider], url: str, *, reconnect: bool = True) -> None:
    """Run every provider against ``url`` until cancelled, reconnecting after drops."""
    async with trio.open_nursery() as nursery:
        for provider in providers:
            nursery.start_soon(_keep_connected, provider, url, reconnect)


async def _keep_connected(provider: SimProvider, url: str, reconnect: bool) -> None:
    while True:
        try:
            await provider.run(url)
        except (OSError, trio.BrokenResourceError) as exc:
            log.warning("%s: connection failed: %s", provider.provider_id, exc)
        except Exception as exc:  # the handshake library raises its own types
            log.warning("%s: connection error: %s", provider.provider_id, exc)
        if not reconnect:
            return
        await trio.sleep(1.0)

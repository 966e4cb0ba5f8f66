"""The status page, structured logs, and the page in a real headless browser."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import httpx
import pytest
import trio

from provider_sim.behaviours import Behaviour, Fault

from .harness import ADMIN_KEY, MODEL, model, open_harness
from .live import live_coordinator


async def test_status_page_shows_fleet_cooldowns_and_failovers(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("sick", model(template_render_ok=True), version="0.6.4",
                             behaviour=Behaviour(Fault.ROLE_THEN_ERROR), decode_tps=1000)
        await h.add_provider("well", version="0.7.0", decode_tps=10)
        for _ in range(2):
            assert (await h.chat()).status == 200
        page = (await h.request("/status", method="GET",
                                headers={"authorization": f"Bearer {ADMIN_KEY}"})).body.decode()
        assert 'http-equiv="refresh"' in page
        assert "sick" in page and "well" in page and "0.6.4" in page
        assert "m1/base:" in page and "left" in page  # the cooldown, with time left
        assert "simulated provider failure" in page  # a recent failover
        assert 'id="queue-depth">0<' in page


async def test_status_page_needs_the_admin_key_even_from_loopback(autojump_clock):
    # Behind a reverse proxy on the same host every request comes from loopback.
    from .harness import asgi_call

    async with open_harness() as h:
        async def get(path: str, headers: dict[str, str]) -> int:
            return (await asgi_call(h.coordinator.asgi, "GET", path, headers, b"")).status

        assert await get("/status", {}) == 401
        assert await get("/status?key=wrong", {}) == 401
        assert await get("/status", {"authorization": "Bearer é"}) == 401
        assert await get("/status", {"authorization": f"Bearer {ADMIN_KEY}"}) == 200
    async with open_harness(status_public=True) as h:
        assert (await asgi_call(h.coordinator.asgi, "GET", "/status", {}, b"")).status == 200


async def test_one_json_log_line_per_outcome_without_content(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="coordinator.requests")
    async with open_harness() as h:
        await h.add_provider("p")
        secret = "my secret prompt text"
        await h.request("/v1/chat/completions", {"model": MODEL, "stream": True,
                                                 "messages": [{"role": "user", "content": secret}]})
        await h.request("/v1/chat/completions", {"model": "nope", "messages": [{"content": secret}]})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "coordinator.requests"]
    assert [line["result"] for line in lines] == ["success", "error"]
    assert lines[0]["providers_tried"] == ["p"] and lines[0]["attempts"] == 1
    assert lines[1]["status"] == 404
    assert all(secret not in r.getMessage() for r in caplog.records)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _dump_dom(url: str) -> str:
    chromium = _chromium()
    assert chromium is not None
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--user-data-dir=/tmp/chromium-status-test", "--dump-dom", url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (the nox tests "
                    "session installs Debian's chromium where it can)")
async def test_status_page_in_headless_chromium():
    async with live_coordinator(providers=3) as (running, fleet):
        url = f"{running.http_url}/status?key={ADMIN_KEY}"
        first = await trio.to_thread.run_sync(_dump_dom, url)
        for provider in fleet:
            assert provider.provider_id in first
        assert "cooldowns" in first and "left</span>" not in first
        # Make sim-0 sick and drive it into cooldown: two 500s, pinned to it.
        fleet[0].behaviour = Behaviour(Fault.ERROR, status=500)
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as client:
            for _ in range(2):
                sick = await client.post(
                    "/v1/chat/completions", headers={"authorization": "Bearer test-key"},
                    json={"model": "sim-chat-small", "provider_ids": ["sim-0"],
                          "messages": [{"role": "user", "content": "x"}]})
                assert sick.status_code == 503
        assert ("sim-0", "sim-chat-small", "base") in running.registry.state.breaker.cooldowns(
            trio.current_time())
        second = await trio.to_thread.run_sync(_dump_dom, url)
        assert "sim-chat-small/base:" in second and "left</span>" in second

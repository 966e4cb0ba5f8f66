"""End to end over real loopback sockets: hypercorn, trio-websocket, sim providers."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from coordinator.app import serve
from provider_sim.fleet import demo_fleet, run_fleet

from .harness import API_KEY, TOKEN, make_config

pytestmark = pytest.mark.slow  # real sockets in real time (docs/testing.md)


async def test_stream_and_non_stream_over_real_sockets():
    config = make_config(http_port=0, provider_port=0)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(serve, config)
        fleet = demo_fleet(2, token=TOKEN)
        nursery.start_soon(run_fleet, fleet, running.provider_url)
        for provider in fleet:
            await provider.registered.wait()
        registry = running.registry
        await registry.wait_for(lambda state: len(state.providers) >= 2)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": "sim-chat-small", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient(base_url=running.http_url, headers=headers,
                                     timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions",
                                     json={**body, "stream": True}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = [line async for line in response.aiter_lines() if line]
            assert lines[-1] == "data: [DONE]"
            text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                           for line in lines[:-1] if json.loads(line[6:])["choices"])
            assert text.startswith("Hello from sim-chat-small")
            plain = await client.post("/v1/chat/completions", json=body)
            assert plain.status_code == 200
            assert plain.json()["choices"][0]["message"]["content"].startswith("Hello")
            bad = await client.post("/v1/chat/completions", content=b"{nope")
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        snapshot = await registry.snapshot()
        assert snapshot.leases == 0
        nursery.cancel_scope.cancel()

"""provider-agent in front of a real engine (llama.cpp, tiny models made at test time).

The coordinator and the agents run in this process on real loopback sockets; each engine
is its own process (killable like a crash). Consumers use the official ``openai`` SDK.
Real time, bounded: each test takes a few seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from coordinator.app import Running, serve
from provider_agent.agent import AgentConfig, run_agent
from provider_agent.catalog import Wanted
from provider_agent.provider import EngineProvider
from provider_agent.tiny import BREAKS_ON_NULLABLE
from provider_link.keys import ProviderKeys, create_keys, load_keys

from .engines import EngineProcess, engine_process, needs_engine
from .harness import ADMIN_KEY, API_KEY, TOKEN, make_config, poll

pytestmark = [pytest.mark.slow, needs_engine]  # a real engine, in real time (docs/testing.md)
CHAT = {"model": "tiny-chatml", "max_tokens": 24, "temperature": 0, "seed": 7,
        "messages": [{"role": "user", "content": "Say hello to the world."}]}
NULLABLE_TOOL = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"city": {"type": ["string", "null"]}}}}}]


@asynccontextmanager
async def coordinator(**config: Any) -> AsyncIterator[Running]:
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(
            serve, make_config(http_port=0, provider_port=0, heartbeat_timeout=90.0, **config))
        yield running
        nursery.cancel_scope.cancel()


async def start_agent(nursery: trio.Nursery, running: Running, engine: EngineProcess,
                      provider_id: str, keys: ProviderKeys | None = None,
                      **wanted: Any) -> EngineProvider:
    config = AgentConfig(engine.url, (running.provider_url,), TOKEN,
                         keys or ProviderKeys.generate(), provider_id, Wanted(**wanted),
                         health_interval=0.5)
    provider: EngineProvider = await nursery.start(run_agent, config)
    with trio.fail_after(30):
        await running.registry.wait_for(lambda state: provider_id in state.providers)
    return provider


def sdk(base_url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat_text(client: openai.OpenAI, body: dict[str, Any]) -> str:
    return client.chat.completions.create(**body).choices[0].message.content or ""


def streamed_text(client: openai.OpenAI, body: dict[str, Any]) -> str:
    parts = []
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
    return "".join(parts)


async def test_answers_through_the_coordinator_are_the_engine_s_own():
    with engine_process("tiny-chatml") as engine:
        async with coordinator() as running, trio.open_nursery() as nursery:
            await start_agent(nursery, running, engine, "agent-a")
            for text_of in (chat_text, streamed_text):
                direct = await trio.to_thread.run_sync(text_of, sdk(engine.url, "x"), CHAT)
                through = await trio.to_thread.run_sync(text_of, sdk(running.http_url), CHAT)
                assert direct and through == direct, (text_of.__name__, direct, through)
            reply = await trio.to_thread.run_sync(lambda: sdk(
                running.http_url).chat.completions.with_raw_response.create(**CHAT))
            assert reply.headers["x-provider-id"] == "agent-a"
            completion = reply.parse()
            usage = completion.usage
            assert usage is not None and 0 < usage.completion_tokens <= 24  # the engine's own
            assert usage.prompt_tokens > 10
            nursery.cancel_scope.cancel()


async def test_a_consumer_who_leaves_mid_stream_leaves_the_engine_idle():
    # A model slow enough (about 200 tokens a second) that 400 tokens take two seconds.
    with engine_process("tiny-chatml", width=512, layers=8) as engine:
        async with coordinator() as running, trio.open_nursery() as nursery:
            await start_agent(nursery, running, engine, "agent-a")
            # llama.cpp's ignore_eos: a random model may well say its end-of-text early.
            body = {**CHAT, "max_tokens": 400, "stream": True, "ignore_eos": True}
            async with httpx.AsyncClient(timeout=30) as client, client.stream(
                    "POST", running.http_url + "/v1/chat/completions", json=body,
                    headers={"authorization": f"Bearer {API_KEY}"}) as reply:
                async for line in reply.aiter_lines():
                    if '"content":"' in line:
                        break  # the first token: then the consumer goes
                assert engine.slots_busy() == 1
            left = time.monotonic()
            while engine.slots_busy():
                assert time.monotonic() - left < 1.5, "the engine kept generating"
                await trio.sleep(0.02)  # polling another process
            print(f"\nengine slot idle {time.monotonic() - left:.2f} s after the consumer left")
            nursery.cancel_scope.cancel()


async def test_an_engine_killed_before_content_fails_over_to_another_agent_invisibly():
    with engine_process("tiny-chatml") as first, engine_process("tiny-chatml") as second:
        async with coordinator() as running, trio.open_nursery() as nursery:
            await start_agent(nursery, running, first, "agent-a")
            await start_agent(nursery, running, second, "agent-b")
            client = sdk(running.http_url)
            first.kill()
            killed = time.monotonic()
            seen = []
            for _ in range(20):
                reply = await trio.to_thread.run_sync(
                    lambda: client.chat.completions.with_raw_response.create(**CHAT))
                seen.append((reply.headers["x-provider-id"], reply.headers["x-attempts"]))
                assert reply.parse().choices[0].message.content  # every answer whole
                if reply.headers["x-attempts"] != "1":
                    print(f"\nfirst failover {time.monotonic() - killed:.3f} s after the kill")
                    break
            assert all(provider == "agent-b" for provider, _ in seen), seen
            with trio.fail_after(10):  # and the agent leaves until its engine is back
                await running.registry.wait_for(lambda state: "agent-a" not in state.providers)
            nursery.cancel_scope.cancel()


async def test_an_agent_restarted_with_its_key_file_keeps_its_id(tmp_path: Path):
    key_file = tmp_path / "agent.json"
    create_keys(key_file)
    with engine_process("tiny-chatml") as engine:
        async with coordinator() as running:
            for _ in range(2):
                async with trio.open_nursery() as nursery:
                    await start_agent(nursery, running, engine, "pinned",
                                      keys=load_keys(key_file), calibrate=False)
                    nursery.cancel_scope.cancel()
                with trio.fail_after(10):
                    await running.registry.wait_for(lambda state: "pinned" not in state.providers)
            # A new key under that id is refused: the pin holds.
            async with trio.open_nursery() as nursery:
                config = AgentConfig(engine.url, (running.provider_url,), TOKEN,
                                     ProviderKeys.generate(), "pinned", Wanted(calibrate=False))
                provider = await nursery.start(run_agent, config)
                with trio.fail_after(10):
                    await poll(lambda: provider.closed_with is not None)
                assert provider.closed_with == 1008 and "bound to another key" in \
                    provider.closed_reason
                nursery.cancel_scope.cancel()


async def test_a_model_whose_template_breaks_on_nullable_tools_gets_no_tool_requests():
    with engine_process("tiny-broken", broken_template=True) as broken, \
            engine_process("tiny-chatml") as good:
        async with coordinator() as running, trio.open_nursery() as nursery:
            await start_agent(nursery, running, broken, "agent-broken", calibrate=False)
            await start_agent(nursery, running, good, "agent-good", calibrate=False)
            async with httpx.AsyncClient(timeout=30) as client:
                admin = (await client.get(running.http_url + "/v1/admin/providers", headers={
                    "authorization": f"Bearer {ADMIN_KEY}"})).json()
                refused = await client.post(
                    running.http_url + "/v1/chat/completions", json={
                        **CHAT, "model": "tiny-broken", "tools": NULLABLE_TOOL},
                    headers={"authorization": f"Bearer {API_KEY}"})
            verdicts = {p["id"]: [m["template_render_ok"] for m in p["models"]]
                        for p in admin["providers"]}
            assert verdicts == {"agent-broken": [False], "agent-good": [True]}
            assert refused.status_code in (400, 503), refused.text
            served = await trio.to_thread.run_sync(lambda: sdk(running.http_url)
                                                   .chat.completions.create(
                                                       **CHAT, tools=NULLABLE_TOOL))
            assert served.choices[0].message is not None
            assert broken.tasks_run() == 0  # the broken template's engine never saw a request
            nursery.cancel_scope.cancel()


def test_the_broken_template_really_breaks_in_the_engine():
    """The fixture is honest: llama.cpp itself refuses tools with this template."""
    with engine_process("tiny-broken", broken_template=True) as broken:
        reply = httpx.post(broken.url + "/v1/chat/completions", timeout=30, json={
            **CHAT, "model": "tiny-broken", "tools": [{"type": "function", "function": {
                "name": "lookup", "parameters": {"type": "object", "properties": {
                    "city": {"type": "string", "nullable": True}}}}}]})
        assert reply.status_code >= 400, reply.text
        assert "nullable" in BREAKS_ON_NULLABLE and json.loads(reply.text)

"""Identity pins in each store: a refused key never becomes the pin (issue 22, item 3);
Redis restarted empty gets the pins of live providers back (item 4); a hung Redis reads
"degraded" and refuses explicit ids quickly (item 5).

The file and Redis stores in real time: the file store writes from a worker thread and
Redis is a real process, neither of which virtual time can wait for. Each test is bounded.
The store in memory has neither, so its test runs in virtual time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from provider_sim.provider import SimProvider

from .harness import ADMIN_KEY, TOKEN, Harness, model, open_harness
from .redis_server import RedisServer, needs_redis

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
FAST_CLUSTER = dict(cluster_token="c", instance_id="a", cluster_refresh=0.1, cluster_ttl=1.0,
                    redis_timeout=0.5)


async def _pin_in_file(path: Path, provider_id: str) -> str | None:
    pins: dict[str, str | None] = {}
    for line in (await trio.Path(path).read_text()).splitlines():
        change = json.loads(line)
        pins[change["id"]] = change["key"]
    return pins.get(provider_id)


async def _pin_in_redis(h: Harness, provider_id: str) -> str | None:
    client = h.coordinator.shared._client  # type: ignore[attr-defined]
    bound = await client.hget("coord:pins", provider_id)
    return None if bound is None else bytes(bound).decode()


async def _refused_rival_leaves_the_pin_free(h: Harness, pin_of: Any) -> None:
    owner = await h.add_provider("own")
    unpinned = await h.request("/v1/admin/providers/own/pin", method="DELETE", headers=ADMIN)
    assert unpinned.status == 200, unpinned.body
    rival = SimProvider("own", (model(),), token=TOKEN)  # another key, while the owner is live
    await h.connect(rival, wait=False)
    await h.until(lambda: rival.closed_with is not None)
    assert rival.closed_with == 1008 and "in use by another key" in rival.closed_reason
    assert await pin_of("own") is None  # the refused key was not written down
    assert h.coordinator.edge.identities.bound_key("own") is None
    h.kill(owner)
    await h.wait_gone("own")
    back = SimProvider("own", (model(),), token=TOKEN, signing=owner.signing_key)
    await h.connect(back)  # the rightful key, restarted: admitted (it was locked out)
    assert (await h.chat(provider_ids=["own"])).status == 200


async def test_a_refused_rival_key_never_becomes_the_pin_in_memory(autojump_clock):
    with trio.fail_after(30):
        async with open_harness() as h:
            async def pin_of(provider_id: str) -> str | None:
                return h.coordinator.edge.identities.bound_key(provider_id)
            await _refused_rival_leaves_the_pin_free(h, pin_of)


async def test_a_refused_rival_key_never_becomes_the_pin_in_the_file(tmp_path):
    path = tmp_path / "pins.jsonl"
    with trio.fail_after(30):
        async with open_harness(identity_pins_file=str(path)) as h:
            await _refused_rival_leaves_the_pin_free(
                h, lambda provider_id: _pin_in_file(path, provider_id))


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_a_refused_rival_key_never_becomes_the_pin_in_redis(redis_server: RedisServer):
    with trio.fail_after(30):
        async with open_harness(redis_url=redis_server.url, **FAST_CLUSTER) as h:
            await h.until_cluster_ok()
            await _refused_rival_leaves_the_pin_free(
                h, lambda provider_id: _pin_in_redis(h, provider_id))


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_redis_restarted_empty_gets_the_pins_of_live_providers_back(
        redis_server: RedisServer):
    with trio.fail_after(60):
        async with open_harness(redis_url=redis_server.url, **FAST_CLUSTER) as h:
            await h.until_cluster_ok()
            owner = await h.add_provider("own")
            key = await _pin_in_redis(h, "own")
            assert key is not None
            redis_server.stop()
            await h.until_cluster(lambda status: status == "degraded")
            redis_server.start()  # empty: it kept nothing
            await h.until_cluster_ok()
            for _ in range(200):  # polling Redis, another process
                if await _pin_in_redis(h, "own") == key:
                    break
                await trio.sleep(0.05)
            assert await _pin_in_redis(h, "own") == key
            # The owner is offline for a moment; another key cannot take its id.
            h.kill("own")
            await h.wait_gone("own")
            rival = SimProvider("own", (model(),), token=TOKEN)
            await h.connect(rival, wait=False)
            await h.until(lambda: rival.closed_with is not None)
            assert rival.closed_with == 1008 and "bound to another key" in rival.closed_reason
            back = SimProvider("own", (model(),), token=TOKEN, signing=owner.signing_key)
            await h.connect(back)


@pytest.mark.slow  # a redis-server, in real time
@needs_redis
async def test_a_hung_redis_reads_degraded_and_explicit_ids_are_refused_quickly(
        redis_server: RedisServer):
    with trio.fail_after(60):
        async with open_harness(redis_url=redis_server.url, **FAST_CLUSTER) as h:
            await h.until_cluster_ok()
            redis_server.freeze()
            try:
                start = trio.current_time()
                await h.until_cluster(lambda status: status == "degraded")
                assert trio.current_time() - start < 3.0
                waiting = SimProvider("explicit", (model(),), token=TOKEN)
                start = trio.current_time()
                await h.connect(waiting, wait=False)
                await h.until(lambda: waiting.closed_with is not None)
                assert waiting.closed_with == 1008
                assert "identity store is unavailable" in waiting.closed_reason
                assert trio.current_time() - start < 2.0  # redis_timeout, not 10 s
                derived = SimProvider(None, (model(),), token=TOKEN)  # type: ignore[arg-type]
                await h.connect(derived, wait=False)  # an id from the key needs no store
                await h.registry.wait_for(
                    lambda state: any(p.startswith("p-") for p in state.providers))
            finally:
                redis_server.thaw()
            await h.until_cluster_ok()


@pytest.fixture(autouse=True)
def _quiet_redis_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("CRITICAL", logger="coredis")

"""Routing health: breaker, floors, gates, version diversity, fail-fast and the queue."""

from __future__ import annotations

import pytest
import trio

from coordinator.dispatch.attempt import Dispatcher
from coordinator.registry.actor import RegistryClient
from coordinator.registry.table import CANCELLED, Grant, Job
from provider_sim.behaviours import HEALTHY, Behaviour, Fault

from .harness import ADMIN_KEY, MODEL, VISION_MODEL, model, open_harness

FAIL_500 = Behaviour(Fault.ERROR, status=500)
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
IMAGE = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                      {"type": "image_url", "image_url": {"url": "data:x"}}]}]


async def tool_chat(h, **extra):
    return await h.chat(tools=TOOLS, **extra)


async def test_two_strikes_cool_a_pair_then_it_expires(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        sick = await h.add_provider("sick", behaviour=FAIL_500, decode_tps=1000)
        await h.add_provider("ok", decode_tps=10)
        for _ in range(2):
            result = await h.chat()
            assert result.status == 200 and result.headers["x-provider-id"] == "ok"
        assert len(sick.received) == 2
        assert h.coordinator.metrics.cooldown_entered._value.get() == 1
        # Cooling: the next request goes straight to the healthy provider.
        result = await h.chat()
        assert result.headers["x-attempts"] == "1" and len(sick.received) == 2
        admin = await h.request("/v1/admin/providers", method="GET",
                                headers={"authorization": f"Bearer {ADMIN_KEY}"})
        [cooldown] = next(p for p in admin.json()["providers"] if p["id"] == "sick")["cooldowns"]
        assert cooldown["shape"] == "base" and 299 < cooldown["seconds_left"] <= 300
        await trio.sleep(301)  # virtual: the cooldown runs out
        sick.behaviour = HEALTHY
        result = await h.chat()
        assert result.headers["x-provider-id"] == "sick"


async def test_tool_failures_are_not_cleared_by_plain_successes(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        # "p" fails every tool request and serves plain chat fine.
        p = await h.add_provider("p", decode_tps=1000,
                                 script=[FAIL_500, HEALTHY, FAIL_500])
        await h.add_provider("q", decode_tps=10)
        assert (await tool_chat(h)).headers["x-provider-id"] == "q"  # strike 1 on (p, tools)
        assert (await h.chat()).headers["x-provider-id"] == "p"  # success on (p, base)
        assert (await tool_chat(h)).headers["x-provider-id"] == "q"  # strike 2: cooling
        assert ("p", MODEL, "tools") in h.state.breaker.cooldowns(trio.current_time())
        assert (await tool_chat(h)).headers["x-attempts"] == "1"
        assert (await h.chat()).headers["x-provider-id"] == "p"  # base shape still routes
        assert len(p.received) == 4


async def test_cooled_pair_fails_fast_instead_of_queueing(autojump_clock):
    async with open_harness(speculative_backup=False, max_attempts=1) as h:
        await h.add_provider("only", behaviour=FAIL_500)
        for _ in range(2):
            assert (await h.chat()).status == 503
        start = trio.current_time()
        result = await h.chat()
        assert trio.current_time() - start < 0.1
        assert result.status == 503
        assert "cooling down" in result.json()["error"]["message"]
        assert "retry-after" in result.headers


async def test_tools_floor_fails_fast_with_a_specific_message(autojump_clock):
    async with open_harness() as h:
        old = await h.add_provider("old", version="0.6.2")
        start = trio.current_time()
        result = await tool_chat(h)
        assert trio.current_time() - start < 0.1
        assert result.status == 400  # no provider of m1 has ever met the floor
        assert "does not support tool calls" in result.json()["error"]["message"]
        assert old.received == []
        assert (await h.chat()).status == 200  # plain chat still fine on the old binary
        await h.add_provider("new", version="0.6.3")
        assert (await tool_chat(h)).headers["x-provider-id"] == "new"


async def test_floor_is_configurable(autojump_clock):
    async with open_harness(capability_floors={}) as h:
        await h.add_provider("old", version="0.5.0")
        assert (await tool_chat(h)).status == 200


async def test_template_gate_fences_every_shape(autojump_clock):
    async with open_harness() as h:
        broken = await h.add_provider("broken", model(template_render_ok=False), decode_tps=1000)
        await h.add_provider("fine", model(template_render_ok=True), decode_tps=10)
        for _ in range(3):
            assert (await h.chat()).headers["x-provider-id"] == "fine"
            assert (await tool_chat(h)).headers["x-provider-id"] == "fine"
        assert broken.received == []
        h.kill("fine")
        await h.wait_gone("fine")
        result = await h.chat()
        assert result.status == 503
        assert "template" in result.json()["error"]["message"]


async def test_vision_gate(autojump_clock):
    async with open_harness() as h:
        text_only = await h.add_provider("text", model(VISION_MODEL), decode_tps=1000)
        result = await h.request("/v1/chat/completions", {"model": VISION_MODEL, "messages": IMAGE})
        assert result.status == 400  # no provider of v1 has ever taken images
        assert "image or video" in result.json()["error"]["message"]
        await h.add_provider("eyes", model(VISION_MODEL, is_vision=True), decode_tps=10)
        result = await h.request("/v1/chat/completions", {"model": VISION_MODEL, "messages": IMAGE})
        assert result.status == 200 and result.headers["x-provider-id"] == "eyes"
        assert text_only.received == []


async def test_images_stay_retryable_while_a_vision_provider_that_left_is_remembered(
        autojump_clock):
    """"Ever" is what the coordinator knows: a capable provider that left a moment ago
    may come back (503, retry); once it is forgotten, images are refused for good."""
    async with open_harness(model_forget_after=600.0) as h:
        await h.add_provider("text", model(VISION_MODEL), decode_tps=1000)
        await h.add_provider("eyes", model(VISION_MODEL, is_vision=True), decode_tps=10)
        h.kill("eyes")
        await h.wait_gone("eyes")
        image = {"model": VISION_MODEL, "messages": IMAGE}
        result = await h.request("/v1/chat/completions", image)
        assert result.status == 503 and result.headers["retry-after"] == "5"
        await trio.sleep(599)  # scripted: still remembered
        assert (await h.request("/v1/chat/completions", image)).status == 503
        await trio.sleep(1)  # model_forget_after has passed since eyes left
        result = await h.request("/v1/chat/completions", image)
        assert result.status == 400 and "retry-after" not in result.headers
        assert "image or video" in result.json()["error"]["message"]
        await h.add_provider("new-eyes", model(VISION_MODEL, is_vision=True), decode_tps=10)
        result = await h.request("/v1/chat/completions", image)
        assert result.status == 200 and result.headers["x-provider-id"] == "new-eyes"


async def test_a_model_whose_providers_are_away_queues_only_what_they_could_serve(
        autojump_clock):
    async with open_harness() as h:
        await h.add_provider("old", version="0.6.0")
        h.kill("old")
        await h.wait_gone("old")
        # Remembered while away: plain chat waits for it; tools never could be served.
        start = trio.current_time()
        result = await tool_chat(h)
        assert result.status == 400 and trio.current_time() - start < 0.1
        assert "tool calls" in result.json()["error"]["message"]
        assert not h.state.queue
        async with trio.open_nursery() as nursery:
            results: list = []

            async def plain() -> None:
                results.append(await h.chat())

            nursery.start_soon(plain)
            await h.until(lambda: h.state.queue)
            await h.add_provider("back", version="0.6.0")
        assert results[0].status == 200
        await h.assert_quiescent()


async def test_retry_prefers_a_different_version(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("a", version="0.6.4", behaviour=FAIL_500, decode_tps=1000)
        same = await h.add_provider("b", version="0.6.4", decode_tps=900)
        await h.add_provider("c", version="0.7.0", decode_tps=10)
        result = await h.chat()
        assert result.headers["x-provider-id"] == "c"
        assert same.received == []


async def test_version_diversity_never_fails_closed(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("a", version="0.6.4", behaviour=FAIL_500, decode_tps=1000)
        await h.add_provider("b", version="0.6.4", decode_tps=10)
        assert (await h.chat()).headers["x-provider-id"] == "b"


async def test_allowlist_constrains_routing_and_fail_fast(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("old", version="0.6.0")
        new = await h.add_provider("new", version="0.7.0")
        # Tool-capable providers exist, but not inside the allowlist: fail fast.
        result = await tool_chat(h, provider_ids=["old"])
        assert result.status == 503
        assert "tool calls" in result.json()["error"]["message"]
        result = await h.chat(provider_ids=["nobody"])
        assert result.status == 503 and "allowlist" in result.json()["error"]["message"]
        result = await h.chat(provider_ids=["new"])
        assert result.headers["x-provider-id"] == "new"
        assert "provider_ids" not in new.received[-1]


async def test_too_large_model_is_an_immediate_error(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("small", model(size_bytes=500 * 1024**3))
        start = trio.current_time()
        result = await h.chat()
        assert result.status == 503 and trio.current_time() - start < 0.1
        assert "too large" in result.json()["error"]["message"]


async def test_queued_request_is_served_when_the_slot_frees(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("one", max_concurrency=1,
                             behaviour=Behaviour(token_interval=5.0, tokens=4))
        done: dict[str, tuple[int, float]] = {}

        async def run(name: str) -> None:
            result = await h.chat()
            done[name] = (result.status, trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "first")
            await h.until(lambda: len(h.providers["one"].received) == 1)
            nursery.start_soon(run, "second")
            await h.until(lambda: h.state.queue)
        assert done["first"][0] == done["second"][0] == 200
        assert done["second"][1] >= done["first"][1] + 15.0
        await h.assert_quiescent()


async def test_queue_answered_by_a_provider_registering(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("early")
        h.kill("early")
        await h.wait_gone("early")
        results = []

        async def run() -> None:
            results.append(await h.chat())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await h.until(lambda: h.state.queue)
            await trio.sleep(30)  # scripted: nobody serves the model for a while
            await h.add_provider("late")
        [result] = results
        assert result.status == 200 and result.headers["x-provider-id"] == "late"


async def test_queue_full_is_429_and_waiting_for_providers_that_left_is_503(autojump_clock):
    async with open_harness(queue_max=1, queue_timeout=120.0) as h:
        await h.add_provider("gone")
        h.kill("gone")
        await h.wait_gone("gone")
        outcomes: list = []

        async def run() -> None:
            outcomes.append((await h.chat(), trio.current_time()))

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await h.until(lambda: h.state.queue)
            nursery.start_soon(run)
        [(full, t_full), (expired, t_expired)] = sorted(outcomes, key=lambda o: o[1])
        assert full.status == 429 and t_full - start < 0.1
        assert "queue is full" in full.json()["error"]["message"]
        # Not "no slot became free" (429): no provider of the model was there to free one.
        assert expired.status == 503 and 120.0 <= t_expired - start < 120.5
        assert "went offline" in expired.json()["error"]["message"]
        assert expired.headers["retry-after"]
        await h.assert_quiescent()


async def test_waiting_for_a_busy_provider_in_vain_is_429(autojump_clock):
    async with open_harness(queue_timeout=120.0, speculative_backup=False) as h:
        await h.add_provider("busy", behaviour=Behaviour(token_interval=60.0, tokens=4),
                             max_concurrency=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.chat)
            await h.until(lambda: any(r.leases for r in h.state.providers.values()))
            start = trio.current_time()
            expired = await h.chat()
            assert expired.status == 429 and 120.0 <= trio.current_time() - start < 120.5
            assert "no provider slot became free" in expired.json()["error"]["message"]
            nursery.cancel_scope.cancel()


@pytest.fixture
def backup_granted_during_the_commit(monkeypatch):
    """The registry's answer to the hedge reaches it only once the primary has committed."""
    committed = trio.Event()
    real_commit, real_try_acquire = Dispatcher._commit, RegistryClient.try_acquire

    def commit(self, attempt, racer, decision):
        outcome = real_commit(self, attempt, racer, decision)
        committed.set()
        return outcome

    async def try_acquire_answered_late(self, *args, **kwargs):
        # The actor grants at once; its answer reaches the hedge only after the
        # primary committed (what a busy actor or scheduler does to a real race).
        grant = await real_try_acquire(self, *args, **kwargs)
        with trio.CancelScope(shield=True):
            await committed.wait()
        return grant

    monkeypatch.setattr(Dispatcher, "_commit", commit)
    monkeypatch.setattr(RegistryClient, "try_acquire", try_acquire_answered_late)


async def _primary_and_backup(h):
    """A primary whose first content comes after the hedge point (TTFT/2) and before
    its TTFT deadline, and a backup (the faster decoder is routed to first)."""
    ttft = h.coordinator.config.ttft_base
    await h.add_provider("primary", decode_tps=1000,
                         behaviour=Behaviour(first_token_delay=0.75 * ttft))
    return ttft, await h.add_provider("backup", decode_tps=10)


async def test_backup_grant_racing_a_commit_is_released(
        autojump_clock, backup_granted_during_the_commit):
    """The backup's grant is still on its way back when the primary commits: the late
    grant is released (no slot leaks), and nothing is started on the backup."""
    async with open_harness() as h:
        audit: list[tuple[str, float, dict]] = []
        h.state.observer = lambda event, now, details: audit.append((event, now, details))
        ttft, backup = await _primary_and_backup(h)
        start = trio.current_time()
        result = await h.chat()
        assert result.status == 200 and result.headers["x-provider-id"] == "primary"
        assert result.text and result.headers["x-attempts"] == "1"
        # The backup was granted at the hedge point, before the commit ...
        [(_, granted_at, granted)] = [a for a in audit if a[0] == "backup"]
        assert granted["lease"].provider_id == "backup"
        assert granted_at - start < 0.75 * ttft <= result.started_at - start
        assert h.coordinator.metrics.speculative._value.get() == 1
        # ... and given back, with no verdict on its health, once the grant came back late.
        [(_, released_at, released)] = [
            a for a in audit if a[0] == "release" and a[2]["lease"] == granted["lease"]]
        assert released["outcome"] == CANCELLED and released_at >= result.started_at
        assert backup.received == []  # the race was decided: nothing to start there
        await h.assert_quiescent()


async def test_a_queued_request_is_refused_at_once_when_the_last_usable_provider_leaves(
        autojump_clock):
    """Issue 22 item 6: a departure re-checks the queue (it once waited 120 s for a 429)."""
    async with open_harness(queue_timeout=120.0, speculative_backup=False) as h:
        await h.add_provider("busy", max_concurrency=1, decode_tps=1000)
        await h.add_provider("cooling", decode_tps=1)
        h.state.breaker.cool(("cooling", MODEL, "base"), 10_000.0)
        # The slot is held by something whose release does not follow the departure
        # (a request of another instance, say): only the departure can wake the queue.
        held = await h.registry.acquire(Job("held", MODEL))
        assert isinstance(held, Grant) and held.lease.provider_id == "busy"
        outcomes: list = []
        answered = trio.Event()

        async def queued() -> None:
            outcomes.append(await h.chat())
            answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(queued)
            await h.until(lambda: h.state.queue)
            start = trio.current_time()
            h.kill("busy")
            await answered.wait()
        [refused] = outcomes
        assert refused.status == 503 and trio.current_time() - start < 1.0
        assert "cooling down" in refused.json()["error"]["message"]
        await h.registry.release(held.lease, CANCELLED)
        await h.assert_quiescent()


async def test_a_cooldown_from_another_instance_refuses_queued_requests_at_once(autojump_clock):
    """Issue 22 item 6: a cooldown announced by the shared breaker re-checks the queue."""
    async with open_harness(queue_timeout=120.0, speculative_backup=False) as h:
        await h.add_provider("only", behaviour=Behaviour(token_interval=60.0, tokens=4),
                             max_concurrency=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h.chat)
            await h.until(lambda: h.state.providers["only"].leases)
            outcomes: list = []
            answered = trio.Event()

            async def queued() -> None:
                outcomes.append(await h.chat())
                answered.set()

            nursery.start_soon(queued)
            await h.until(lambda: h.state.queue)
            start = trio.current_time()
            await h.registry.shared(cool=(("only", MODEL, "base"), 300.0))
            await answered.wait()
            [refused] = outcomes
            assert refused.status == 503 and trio.current_time() - start < 1.0
            assert "cooling down" in refused.json()["error"]["message"]
            nursery.cancel_scope.cancel()


async def test_a_late_backup_whose_request_never_left_is_no_evidence(
        autojump_clock, backup_granted_during_the_commit):
    async with open_harness() as h:
        _, backup = await _primary_and_backup(h)
        assert (await h.chat()).headers["x-provider-id"] == "primary"
        assert backup.received == []
        assert h.coordinator.metrics.outpaced._value.get() == 0  # lost no race: never ran
        assert backup.cancelled == []  # nothing to cancel


async def test_a_model_is_routed_only_to_providers_that_serve_its_endpoint(autojump_clock):
    """A provider declares per model which endpoints it serves (an engine without
    /v1/responses, say); requests to the others go elsewhere, or get a 400 saying so."""
    async with open_harness() as h:
        chat_only = await h.add_provider("chat-only", model(endpoints=("/v1/chat/completions",)))
        assert (await h.chat()).headers["x-provider-id"] == "chat-only"
        refused = await h.request("/v1/responses", {"model": MODEL, "input": "hi"})
        assert refused.status == 400 and "retry-after" not in refused.headers
        assert refused.json()["error"]["message"] == (
            f"model {MODEL} is not served on /v1/responses by any of its providers")
        everything = await h.add_provider("everything")
        served = await h.request("/v1/responses", {"model": MODEL, "input": "hi"})
        assert served.status == 200 and served.headers["x-provider-id"] == "everything"
        assert len(chat_only.received) == 1 and len(everything.received) == 1
        await h.assert_quiescent()

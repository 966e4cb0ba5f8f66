"""The dispatch engine: deferred commit, invisible failover, the backup race, budgets.

Every test runs in virtual time and asserts what the consumer saw *and* what
each provider received, then that nothing is left behind.
"""

from __future__ import annotations

import trio
import trio.testing

from provider_sim.behaviours import Behaviour, Fault

from .harness import MODEL, open_harness

ROLE_THEN_500 = Behaviour(Fault.ROLE_THEN_ERROR, status=500)


async def test_stream_commits_on_content_and_ends_with_one_done(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("a")
        result = await h.chat()
        assert result.status == 200
        assert result.headers["x-provider-id"] == "a"
        assert result.headers["x-attempts"] == "1"
        assert result.text.startswith("Hello from m1 on a.")
        assert [d for _, d in result.sse].count("[DONE]") == 1
        assert result.sse[-1][1] == "[DONE]"
        await h.assert_quiescent()


async def test_error_after_role_chunk_fails_over_invisibly(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        bad = await h.add_provider("bad", behaviour=ROLE_THEN_500, decode_tps=1000)
        good = await h.add_provider("good", decode_tps=10)
        result = await h.chat()
        assert result.status == 200
        assert result.headers["x-provider-id"] == "good"
        assert result.headers["x-attempts"] == "2"
        # The consumer sees exactly one role delta: the winner's, none of the loser's.
        roles = [e for e in result.sse_json if e["choices"] and "role" in e["choices"][0]["delta"]]
        assert len(roles) == 1 and "on bad" not in result.text
        assert "error" not in result.body.decode()
        assert len(bad.received) == 1 and len(good.received) == 1
        await h.assert_quiescent()


async def test_error_after_role_chunk_non_stream(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("bad", behaviour=ROLE_THEN_500, decode_tps=1000)
        await h.add_provider("good", decode_tps=10)
        result = await h.chat(stream=False)
        assert result.status == 200
        body = result.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"].startswith("Hello from m1 on good")
        assert body["usage"]["completion_tokens"] > 0
        await h.assert_quiescent()


async def test_disconnect_after_role_chunk_fails_over(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("bad", behaviour=Behaviour(Fault.ROLE_THEN_DISCONNECT),
                             decode_tps=1000)
        await h.add_provider("good", decode_tps=10)
        result = await h.chat()
        assert result.status == 200
        assert result.headers["x-provider-id"] == "good"
        assert "disconnected" not in result.body.decode()
        await h.wait_gone("bad")
        await h.assert_quiescent()


async def test_post_content_error_is_in_band_and_never_retried(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("bad", behaviour=Behaviour(Fault.ERROR_AFTER_CONTENT, after_chunks=2),
                             decode_tps=1000)
        good = await h.add_provider("good", decode_tps=10)
        result = await h.chat()
        assert result.status == 200
        assert result.headers["x-provider-id"] == "bad"
        events = result.sse
        errors = [d for _, d in events if '"error"' in d]
        assert len(errors) == 1 and '"provider_error"' in errors[0]
        assert events[-1][1] == "[DONE]" and [d for _, d in events].count("[DONE]") == 1
        assert result.text == "Hello from"
        assert good.received == []
        assert h.coordinator.metrics.inband_errors.labels("provider_error")._value.get() == 1
        await h.assert_quiescent()


async def test_role_then_clean_close_is_an_empty_completion(autojump_clock):
    async with open_harness() as h:
        other = await h.add_provider("close", behaviour=Behaviour(Fault.ROLE_THEN_CLOSE))
        result = await h.chat()
        assert result.status == 200
        assert result.text == ""
        assert [d for _, d in result.sse].count("[DONE]") == 1
        assert len(other.received) == 1
        stream_false = await h.chat(stream=False)
        assert stream_false.status == 200
        assert stream_false.json()["choices"][0]["message"]["content"] == ""
        await h.assert_quiescent()


async def test_slow_primary_loses_to_backup_and_is_cancelled(autojump_clock):
    async with open_harness() as h:
        # TTFT budget is 5 s + prompt; the backup starts at half of it.
        slow = await h.add_provider("slow", behaviour=Behaviour(first_token_delay=4.0),
                                    decode_tps=1000)
        fast = await h.add_provider("fast", decode_tps=10)
        start = trio.current_time()
        result = await h.chat()
        assert result.status == 200
        assert result.headers["x-provider-id"] == "fast"
        assert result.headers["x-attempts"] == "1"
        assert 2.5 <= result.started_at - start < 4.0
        assert len(slow.received) == 1 and len(fast.received) == 1
        assert len(slow.cancelled) == 1
        metrics = h.coordinator.metrics
        assert metrics.speculative._value.get() == 1
        assert metrics.speculative_wins._value.get() == 1
        await h.assert_quiescent()


async def test_boilerplate_does_not_win_the_race(autojump_clock):
    async with open_harness() as h:
        # "stall" sends role then nothing; the backup has real content later.
        staller = await h.add_provider("staller", behaviour=Behaviour(Fault.STALL_AFTER_ROLE,
                                       first_token_delay=0.0), decode_tps=1000)
        await h.add_provider("slowish", behaviour=Behaviour(first_token_delay=1.0),
                             decode_tps=10)
        result = await h.chat()
        assert result.status == 200
        assert result.headers["x-provider-id"] == "slowish"
        assert len(staller.cancelled) == 1
        await h.assert_quiescent()


async def test_both_racers_stall_then_timeout_and_retry(autojump_clock):
    async with open_harness(max_attempts=2) as h:
        s1 = await h.add_provider("s1", behaviour=Behaviour(Fault.STALL), decode_tps=1000)
        s2 = await h.add_provider("s2", behaviour=Behaviour(Fault.STALL), decode_tps=900)
        spare = await h.add_provider("spare", decode_tps=10)  # routed to last
        start = trio.current_time()
        result = await h.chat()
        # Attempt 1 races s1 and its backup s2 until the TTFT deadline; both time out,
        # and attempt 2 goes to the one provider that has not failed this request.
        assert result.status == 200 and result.text.startswith("Hello from m1 on spare.")
        assert result.headers["x-provider-id"] == "spare"
        assert result.headers["x-attempts"] == "2"
        assert 5.0 <= result.started_at - start < 5.5
        for stalled in (s1, s2):
            assert len(stalled.received) == 1 and len(stalled.cancelled) == 1
        assert len(spare.received) == 1
        assert h.coordinator.metrics.dispatches.labels("timeout")._value.get() == 1
        await h.assert_quiescent()


async def test_both_racers_stall_and_nobody_is_left_is_a_504(autojump_clock):
    async with open_harness(max_attempts=2) as h:
        await h.add_provider("s1", behaviour=Behaviour(Fault.STALL), decode_tps=1000)
        await h.add_provider("s2", behaviour=Behaviour(Fault.STALL), decode_tps=900)
        start = trio.current_time()
        result = await h.chat()
        # Attempt 1 races s1 and s2 until the TTFT deadline; attempt 2 has no
        # provider left that has not failed this request.
        assert result.status == 504
        assert result.json()["error"]["code"] == "timeout"
        elapsed = trio.current_time() - start
        assert 5.0 <= elapsed < 5.5
        for p in h.providers.values():
            assert len(p.cancelled) == 1
        await h.assert_quiescent()


async def test_preamble_extends_budget_once(autojump_clock):
    # /v1/responses streams boilerplate first: response.created and .in_progress with
    # an empty output item at once, an empty content part one token_interval later,
    # then text. Boilerplate moves the racer's budget from TTFT (5 s) to TTFT plus
    # preamble_timeout (95 s), once: later boilerplate does not move it again.
    async with open_harness(speculative_backup=False, max_attempts=1) as h:
        p = await h.add_provider("p", behaviour=Behaviour(token_interval=30.0, tokens=2))
        body = {"model": MODEL, "stream": True, "input": "hello"}
        start = trio.current_time()
        result = await h.request("/v1/responses", body)
        assert result.status == 200 and "output_text.delta" in result.body.decode()
        assert 60.0 <= result.started_at - start < 60.5  # text at 60 s, inside 95 s
        # Boilerplate at 0 s and at 60 s, text at 120 s: past the budget the first set.
        p.behaviour = Behaviour(token_interval=60.0, tokens=2)
        start = trio.current_time()
        result = await h.request("/v1/responses", body)
        assert result.status == 504 and 95.0 <= trio.current_time() - start < 95.5
        assert len(p.cancelled) == 1  # told to stop at the deadline
        await h.assert_quiescent()


async def test_preamble_then_stall_times_out_at_ttft_plus_90s(autojump_clock):
    async with open_harness(speculative_backup=False, max_attempts=1) as h:
        await h.add_provider("p", behaviour=Behaviour(Fault.STALL_AFTER_ROLE))
        start = trio.current_time()
        result = await h.chat()
        assert result.status == 504
        elapsed = trio.current_time() - start
        assert 95.0 <= elapsed < 95.5
        # Preamble-then-stall is sickness: it feeds the breaker.
        assert h.state.breaker._recent[("p", MODEL, "base")]
        await h.assert_quiescent()


async def test_accepted_extends_to_inference_timeout(autojump_clock):
    async with open_harness(speculative_backup=False, max_attempts=1) as h:
        await h.add_provider("cold", behaviour=Behaviour(accepted_delay=550.0))
        start = trio.current_time()
        result = await h.chat()
        assert result.status == 200
        assert 550.0 <= result.started_at - start < 551.0
        await h.assert_quiescent()



async def test_accepted_then_silent_times_out_at_600s(autojump_clock):
    async with open_harness(speculative_backup=False, max_attempts=1) as h:
        await h.add_provider("cold", behaviour=Behaviour(Fault.STALL, accepted_delay=0.0))
        start = trio.current_time()
        result = await h.chat()
        assert result.status == 504
        assert 600.0 <= trio.current_time() - start < 601.0
        assert h.state.breaker._recent[("cold", MODEL, "base")]
        await h.assert_quiescent()


async def test_client_disconnect_mid_race_cancels_everyone(autojump_clock):
    async with open_harness() as h:
        p1 = await h.add_provider("p1", behaviour=Behaviour(Fault.STALL_AFTER_ROLE),
                                  decode_tps=1000)
        p2 = await h.add_provider("p2", behaviour=Behaviour(Fault.STALL_AFTER_ROLE),
                                  decode_tps=900)
        hangup = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: h.request(
                "/v1/chat/completions",
                {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]},
                disconnect=hangup))
            # Both racers are running once the backup has been dispatched.
            await h.until(lambda: len(p1.received) + len(p2.received) == 2)
            hangup.set()
        assert len(p1.cancelled) == 1 and len(p2.cancelled) == 1
        await h.assert_quiescent()


async def test_client_disconnect_mid_stream_cancels_provider(autojump_clock):
    async with open_harness() as h:
        p = await h.add_provider("p", behaviour=Behaviour(token_interval=10.0, tokens=50))
        hangup = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: h.request(
                "/v1/chat/completions",
                {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]},
                disconnect=hangup))
            # The consumer reads a few tokens (one every 10 s), then leaves.
            await trio.sleep(35)
            hangup.set()
        assert len(p.cancelled) == 1
        assert p.completed == []
        await h.assert_quiescent()


async def test_all_attempts_exhausted(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        for name in ("a", "b", "c", "d"):
            await h.add_provider(name, behaviour=Behaviour(Fault.ERROR, status=500,
                                                          error_message=f"boom {name}"))
        result = await h.chat()
        assert result.status == 503
        error = result.json()["error"]
        assert error["type"] == "provider_error"
        assert "boom" in error["message"] and "3 provider" in error["message"]
        assert "retry-after" in result.headers
        assert sum(len(p.received) for p in h.providers.values()) == 3
        await h.assert_quiescent()


async def test_capacity_errors_exhaust_to_429(autojump_clock):
    async with open_harness(speculative_backup=False, max_attempts=2) as h:
        await h.add_provider("a", behaviour=Behaviour(Fault.ERROR, status=503))
        await h.add_provider("b", behaviour=Behaviour(Fault.ERROR, status=503))
        result = await h.chat()
        assert result.status == 429
        assert result.headers["retry-after"]
        # 503 is capacity, not sickness: no strikes.
        assert not h.state.breaker._recent
        await h.assert_quiescent()



async def test_content_containing_lifecycle_text_is_content(autojump_clock):
    """A delta whose text is 'response.created' commits: a later error is in-band, not retried."""
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("literal", decode_tps=1000, behaviour=Behaviour(
            Fault.ERROR_AFTER_CONTENT, after_chunks=1, text="response.created response.in_progress"))
        other = await h.add_provider("other", decode_tps=10)
        result = await h.chat()
        assert result.status == 200
        assert result.headers["x-provider-id"] == "literal"
        assert result.text == "response.created"
        assert len([d for _, d in result.sse if '"error"' in d]) == 1
        assert other.received == []
        await h.assert_quiescent()


async def test_decrypt_failure_is_a_provider_error_and_fails_over(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("garbage", behaviour=Behaviour(Fault.GARBAGE_CHUNK),
                             decode_tps=1000)
        await h.add_provider("plain", behaviour=Behaviour(Fault.PLAINTEXT_CHUNKS),
                             decode_tps=500)
        await h.add_provider("good", decode_tps=10)
        result = await h.chat()
        assert result.status == 200
        assert result.headers["x-provider-id"] == "good"
        assert result.headers["x-attempts"] == "3"
        assert "\\u0000" not in result.body.decode()
        await h.assert_quiescent()


async def test_timing_header_present(autojump_clock):
    async with open_harness() as h:
        await h.add_provider("a")
        result = await h.chat()
        fields = dict(part.split("=") for part in result.headers["x-timing"].split(","))
        assert set(fields) == {"parse", "route", "queue", "encrypt", "dispatch", "first_content"}
        assert result.headers["x-provider-version"] == "0.7.0"
        await h.assert_quiescent()


async def test_each_racer_keeps_its_own_budget(autojump_clock):
    """A backup's cold load must not keep a silent primary (and its slot) alive.

    With one shared budget the primary below held its slot, and the consumer
    waited, 602.5 s: the backup's ``inference_accepted`` moved the deadline for
    both racers.
    """
    async with open_harness(max_attempts=1) as h:
        silent = await h.add_provider("silent", behaviour=Behaviour(Fault.STALL),
                                      decode_tps=1000)
        await h.add_provider("cold", behaviour=Behaviour(Fault.STALL, accepted_delay=0.0),
                             decode_tps=10)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            results = []

            async def ask() -> None:
                results.append(await h.chat())

            nursery.start_soon(ask)
            await h.until(lambda: bool(silent.cancelled))
            released_at = trio.current_time() - start
            assert h.state.providers["silent"].free_slots == silent.max_concurrency
        # The primary is cut at its own TTFT deadline; the backup runs its 600 s.
        assert 5.0 <= released_at < 5.5
        [result] = results
        assert result.status == 504
        assert 602.5 <= trio.current_time() - start < 603.5
        await h.assert_quiescent()

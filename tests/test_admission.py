"""Provider admission and the robustness of a provider connection."""

from __future__ import annotations

import base64
import errno
import functools

import nacl.signing
import orjson
import pytest
import trio
import trio.testing
import trio_websocket

from coordinator.config import ConfigError
from coordinator.protocol import InferenceResponseChunk, encode_frame
from coordinator.providers import pinfile
from coordinator.providers.identity import PinClaim, PinStoreUnavailable, SharedPins
from coordinator.providers.pinfile import PinFile, PinFileError
from provider_sim.behaviours import Behaviour
from provider_sim.provider import SimProvider

from .harness import ADMIN_KEY, MODEL, make_config, model, open_harness


async def test_bad_token_is_closed_with_policy_violation(autojump_clock):
    async with open_harness() as h:
        provider = SimProvider("intruder", (model(),), token="wrong")
        await h.connect(provider, wait=False)
        await h.until(lambda: provider.closed_with is not None)
        assert provider.closed_with == 1008
        assert "intruder" not in h.state.providers


async def test_wrong_signing_key_is_never_registered(autojump_clock):
    async with open_harness() as h:
        provider = SimProvider("forger", (model(),), token="provider-token",
                               sign_with=nacl.signing.SigningKey.generate())
        await h.connect(provider, wait=False)
        await h.until(lambda: provider.closed_with is not None)
        assert provider.closed_with == 1008
        assert "forger" not in h.state.providers


async def test_silent_socket_is_closed_after_register_timeout(autojump_clock):
    async with open_harness(register_timeout=10.0) as h:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(h._serve_edge, nursery, server_stream)
            ws = await trio_websocket.wrap_client_stream(nursery, client_stream, "c", "/")
            start = trio.current_time()
            try:
                await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                assert exc.reason.code == 1008
            assert 10.0 <= trio.current_time() - start < 11.0
            nursery.cancel_scope.cancel()
        assert not h.state.providers


async def test_periodic_challenge_failure_removes_provider(autojump_clock):
    async with open_harness(challenge_interval=60.0) as h:
        provider = await h.add_provider("p")
        provider.sign_with = nacl.signing.SigningKey.generate()  # loses its key
        start = trio.current_time()
        await h.wait_gone("p")
        assert 60.0 <= trio.current_time() - start < 61.0
        assert provider.closed_with == 1008


async def test_malformed_frames_do_not_kill_the_connection(autojump_clock):
    async with open_harness() as h:
        provider = await h.add_provider("p", behaviour=Behaviour(token_interval=1.0))
        ws = provider.current_ws
        assert ws is not None
        for junk in ["{", "[]", '{"type":"nope"}', '{"type":"inference_error","request_id":5}',
                     encode_frame(InferenceResponseChunk("no-such-request", data="x")),
                     '{"type":"register","hardware":{}}']:
            await ws.send_message(junk)
        result = await h.chat()
        assert result.status == 200 and result.text.startswith("Hello")
        rejected = h.coordinator.metrics.frames_rejected
        assert rejected.labels("malformed")._value.get() == 5
        assert rejected.labels("unknown_request")._value.get() == 1
        assert "p" in h.state.providers


async def test_disconnect_mid_request_completes_pending_exactly_once(autojump_clock):
    async with open_harness(speculative_backup=False, max_attempts=1) as h:
        await h.add_provider("p", behaviour=Behaviour(token_interval=10.0, tokens=20))
        async with trio.open_nursery() as nursery:
            results = []

            async def consume() -> None:
                results.append(await h.chat())

            nursery.start_soon(consume)
            await trio.sleep(25)  # scripted: a few tokens have streamed
            h.kill("p")
        [result] = results
        assert result.status == 200
        errors = [d for _, d in result.sse if '"error"' in d]
        assert len(errors) == 1 and "disconnected" in errors[0]
        assert [d for _, d in result.sse].count("[DONE]") == 1
        await h.wait_gone("p")
        await h.assert_quiescent()


async def test_reregistration_supersedes_old_session(autojump_clock):
    async with open_harness() as h:
        first = await h.add_provider("p")
        session = h.state.providers["p"].session
        # A new session proving the same signing key (a restart with new X25519 keys).
        second = SimProvider("p", (model(),), token="provider-token", signing=first.signing_key)
        await h.connect(second, wait=False)
        await h.until(lambda: "p" in h.state.providers
                      and h.state.providers["p"].session != session)
        await h.until(lambda: first.closed_with is not None)
        result = await h.chat()
        assert result.status == 200
        assert len(second.received) == 1 and first.received == []
        assert MODEL in h.state.by_model


async def test_silent_provider_is_dropped_after_the_liveness_budget(autojump_clock):
    async with open_harness(heartbeat_timeout=90.0) as h:
        chatty = await h.add_provider("chatty", heartbeat_interval=20.0)
        quiet = await h.add_provider("quiet", heartbeat_interval=10_000.0)
        start = trio.current_time()
        await h.wait_gone("quiet")
        assert 90.0 <= trio.current_time() - start < 91.0
        await trio.sleep(200)  # scripted: heartbeats keep the other one alive
        assert "chatty" in h.state.providers
        assert quiet.closed_with is not None and chatty.closed_with is None


class FlakyPinStore:
    """Fleet-wide pins as RedisShared keeps them (first key wins), with an outage switch."""

    def __init__(self) -> None:
        self.pins: dict[str, str] = {}
        self.down = False
        self.removing = trio.Event()
        self.remove_when = trio.Event()  # a removal waits for this, once set
        self.remove_when.set()

    async def claim_pin(self, provider_id: str, signing_key: str,
                        max_pins: int) -> PinClaim | None:
        if self.down:
            raise PinStoreUnavailable("connection refused")
        created = provider_id not in self.pins
        return PinClaim(self.pins.setdefault(provider_id, signing_key), created)

    async def release_pin(self, provider_id: str, signing_key: str) -> None:
        if self.pins.get(provider_id) == signing_key:
            del self.pins[provider_id]

    async def remove_pin(self, provider_id: str) -> bool:
        self.removing.set()
        await self.remove_when.wait()
        return self.pins.pop(provider_id, None) is not None


async def test_during_a_pin_store_outage_explicit_ids_wait_and_derived_ones_are_admitted(
        autojump_clock):
    store = FlakyPinStore()
    async with open_harness(pins=store) as h:
        first = await h.add_provider("own")
        h.kill("own")
        await h.wait_gone("own")
        store.down = True
        # Not even the key this instance saw bound to the id: it may have been unpinned
        # elsewhere since. The provider retries; the store answers again; it is back.
        again = SimProvider("own", (model(),), token="provider-token", signing=first.signing_key)
        await h.connect(again, wait=False)
        await h.until(lambda: again.closed_with is not None)
        assert again.closed_with == 1008 and "own" not in h.state.providers
        derived = SimProvider(None, (model(),), token="provider-token")  # type: ignore[arg-type]
        await h.connect(derived, wait=False)  # an id derived from the key needs no store
        await h.registry.wait_for(lambda state: any(p.startswith("p-") for p in state.providers))
        store.down = False
        back = SimProvider("own", (model(),), token="provider-token", signing=first.signing_key)
        await h.connect(back)
        assert (await h.chat(provider_ids=["own"])).status == 200 and len(back.received) == 1


async def test_an_unpin_leaves_no_pin_behind_a_registration_that_raced_it(autojump_clock):
    store = FlakyPinStore()
    async with open_harness(pins=store) as h:
        first = await h.add_provider("own")
        store.remove_when = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                h.request, "/v1/admin/providers/own/pin", method="DELETE",
                headers={"authorization": f"Bearer {ADMIN_KEY}"}))
            await store.removing.wait()
            # While the store removes it, the old key comes back and adopts the old pin.
            again = SimProvider("own", (model(),), token="provider-token",
                                signing=first.signing_key)
            await h.connect(again, wait=False)
            await h.until(lambda: again.admissions == 1)
            store.remove_when.set()
        assert "own" not in store.pins
        assert h.coordinator.edge.identities.bound_key("own") is None


# ---- identity pins kept in a file (one instance, across restarts) ----------------------


async def test_a_pin_kept_in_the_file_outlives_a_restart(tmp_path):
    """Real time: the file is written from a worker thread, which virtual time would skip."""
    pins = str(tmp_path / "pins.jsonl")
    async with open_harness(identity_pins_file=pins) as h:
        owner = await h.add_provider("own")
    async with open_harness(identity_pins_file=pins) as h:  # a restart
        thief = SimProvider("own", (model(),), token="provider-token")
        await h.connect(thief, wait=False)
        await h.until(lambda: thief.closed_with is not None)
        assert thief.closed_with == 1008 and "own" not in h.state.providers
        back = SimProvider("own", (model(),), token="provider-token", signing=owner.signing_key)
        await h.connect(back)
        unpinned = await h.request("/v1/admin/providers/own/pin", method="DELETE",
                                   headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert unpinned.status == 200
    async with open_harness(identity_pins_file=pins) as h:  # the removal was kept too
        await h.add_provider("own")  # a new key, once the operator removed the pin


async def test_the_pins_file_replays_changes_and_skips_what_is_not_one(tmp_path):
    path = tmp_path / "pins.jsonl"
    a, b = (base64.b64encode(bytes([n]) * 32).decode() for n in (1, 2))
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in (
        {"id": "x", "key": a}, {"id": "y", "key": a}, {"id": "x", "key": None},
        {"id": "z", "key": "not a key"}, [1, 2], {"id": 5, "key": a})) + b'{"id": "w", "ke')
    store = await PinFile.open(path)
    assert await _bound(store, "y", b, 10) == a  # kept: the first key still holds it
    assert await _bound(store, "x", b, 10) == b  # removed, so free again
    assert await _bound(store, "w", b, 2) is None  # no room beyond max_pins
    reopened = await PinFile.open(path)
    assert await _bound(reopened, "x", a, 10) == b
    assert await reopened.remove_pin("y") and not await reopened.remove_pin("y")
    assert await _bound((await PinFile.open(path)), "y", b, 10) == b


async def test_the_pins_file_is_compacted_when_mostly_history(tmp_path):
    path = tmp_path / "pins.jsonl"
    store = await PinFile.open(path)
    key = base64.b64encode(bytes(32)).decode()
    for n in range(100):
        await _bound(store, f"p{n}", key, 1000)
        await store.remove_pin(f"p{n}")
    await _bound(store, "kept", key, 1000)
    assert len(path.read_bytes().splitlines()) == 201
    reopened = await PinFile.open(path)
    assert path.read_bytes().splitlines() == [orjson.dumps({"id": "kept", "key": key})]
    assert await _bound(reopened, "kept", "other", 1000) == key


async def test_a_pins_file_that_cannot_be_written_refuses_new_ids_and_keeps_no_half_line(
        tmp_path, monkeypatch):
    key = base64.b64encode(bytes(32)).decode()
    with pytest.raises(PinFileError, match="identity_pins_file"):
        await PinFile.open(tmp_path / "no-such-directory" / "pins.jsonl")  # said at start-up
    with pytest.raises(PinFileError, match="identity_pins_file"):
        await PinFile.open(tmp_path)  # a directory
    path = tmp_path / "pins.jsonl"
    store = await PinFile.open(path)

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pinfile.os, "fsync", disk_full)  # the line is written, not kept
    with pytest.raises(PinStoreUnavailable):
        await _bound(store, "lost", key, 10)
    assert path.read_bytes() == b""  # the half-kept line was taken back
    monkeypatch.undo()
    other = base64.b64encode(bytes([7]) * 32).decode()
    assert await _bound(store, "kept", key, 10) == key
    assert await _bound(store, "lost", other, 10) == other  # the failed claim held nothing
    reopened = await PinFile.open(path)
    assert await _bound(reopened, "kept", other, 10) == key
    assert await _bound(reopened, "lost", key, 10) == other


async def test_concurrent_claims_of_a_new_id_agree_on_the_first_key(tmp_path):
    store = await PinFile.open(tmp_path / "pins.jsonl")
    answers: list[str | None] = []
    async with trio.open_nursery() as nursery:
        for key in ("first", "second", "third"):
            nursery.start_soon(lambda k: _claim_into(store, k, answers), key)
    assert len(answers) == 3 and len(set(answers)) == 1  # whichever came first
    assert len((tmp_path / "pins.jsonl").read_bytes().splitlines()) == 1


async def _claim_into(store: PinFile, key: str, answers: list[str | None]) -> None:
    answers.append(await _bound(store, "same", key, 10))


async def _bound(store: SharedPins, provider_id: str, key: str, max_pins: int) -> str | None:
    """The key ``provider_id`` is bound to after claiming it for ``key``."""
    claim = await store.claim_pin(provider_id, key, max_pins)
    return None if claim is None else claim.key


def test_a_pins_file_and_redis_are_not_configured_together():
    with pytest.raises(ConfigError, match="identity_pins_file"):
        make_config(redis_url="redis://127.0.0.1:1", cluster_token="t",
                    identity_pins_file="/tmp/pins.jsonl")

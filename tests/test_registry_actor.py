"""The registry actor's boundary: typed asks, the outbox, watches, the published gauge,
and nobody outside the registry touching its state."""

from __future__ import annotations

import ast
import pathlib

import pytest
import trio

from coordinator.capabilities import parse_version
from coordinator.metrics import Metrics
from coordinator.protocol import ModelInfo
from coordinator.registry.actor import (
    RegistryClient,
    RegistryStopped,
    _Actor,
    _Watch,
    serve_registry,
)
from coordinator.registry.mirror import Renewed, SharedEvent
from coordinator.registry.state import RegistryState
from coordinator.registry.table import SUCCESS, Census, Grant, Job, ProviderRecord

from .harness import make_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRODUCTION = ("coordinator", "provider_sim", "provider_link", "provider_agent")


def record(pid: str, *models: str, instance: str = "") -> ProviderRecord:
    return ProviderRecord(pid, 1, "0.7.0", parse_version("0.7.0"),
                          {m: ModelInfo(m) for m in models or ("m",)}, max_slots=1,
                          signing_key="k", instance=instance)


async def test_reads_are_typed_asks_answered_between_two_messages(autojump_clock):
    async with trio.open_nursery() as nursery:
        registry: RegistryClient = await nursery.start(serve_registry, make_config(), Metrics())
        await registry.register(record("a", "m", "n"))
        await registry.mirror("other", [record("far", "o", instance="other")])
        assert await registry.census() == Census(providers=2, queued=0)
        assert await registry.models() == ("m", "n", "o")
        assert await registry.serves("o") and not await registry.serves("nope")
        grant = await registry.acquire(Job("r", "m"))
        assert isinstance(grant, Grant)
        assert await registry.lease_of("a", grant.lease.request_id) == grant.lease
        assert await registry.local_providers(lambda r: (r.provider_id, len(r.leases))) == [
            ("a", 1)]  # only this instance's own, as the caller's value
        await registry.release(grant.lease, SUCCESS)
        assert await registry.lease_of("a", grant.lease.request_id) is None
        nursery.cancel_scope.cancel()


async def test_shared_events_go_to_the_connected_outbox(autojump_clock):
    offered: list[SharedEvent] = []
    async with trio.open_nursery() as nursery:
        registry: RegistryClient = await nursery.start(serve_registry, make_config(), Metrics())
        await registry.register(record("before"))  # nothing connected yet: nowhere to go
        await registry.connect_outbox(offered.append)
        await registry.register(record("after"))
        assert offered == [Renewed("after")]
        nursery.cancel_scope.cancel()


async def test_a_watch_returns_once_its_condition_holds(autojump_clock):
    async with trio.open_nursery() as nursery:
        registry: RegistryClient = await nursery.start(serve_registry, make_config(), Metrics())
        with trio.move_on_after(1.0):
            await registry.wait_for_provider("never")
        async with trio.open_nursery() as waiters:
            waiters.start_soon(registry.wait_for_providers, 2)
            await registry.register(record("a"))
            await trio.sleep(1.0)
            assert waiters.child_tasks  # one provider: still waiting
            await registry.register(record("b"))
        await registry.wait_for_provider("a")  # already true: at once
        nursery.cancel_scope.cancel()


def test_an_abandoned_watch_is_dropped_and_a_failing_one_answered_with_a_fault():
    actor = _Actor(RegistryState(make_config(), Metrics()))
    gone, abandoned = trio.open_memory_channel[object](1)
    broken, hears = trio.open_memory_channel[object](1)
    actor.watchers = [_Watch(lambda state: False, gone),  # type: ignore[arg-type]
                      _Watch(lambda state: 1 / 0 > 0, broken)]  # type: ignore[arg-type]
    abandoned.close()
    actor.after_batch()
    assert actor.watchers == []
    assert "ZeroDivisionError" in str(hears.receive_nowait())


async def test_the_cooldown_gauge_counts_what_the_actor_published(autojump_clock):
    metrics = Metrics()
    async with trio.open_nursery() as nursery:
        registry: RegistryClient = await nursery.start(
            serve_registry, make_config(breaker_cooldown=10.0), metrics)
        await registry.register(record("a"))
        await registry.shared(cool=(("a", "m", "base"), 10.0))
        await registry.census()  # the cooldown is in, and published after its batch
        assert b"coordinator_cooldowns_active 1.0" in metrics.render()
        await trio.sleep(11.0)  # ended meanwhile: no message needed to see it
        assert b"coordinator_cooldowns_active 0.0" in metrics.render()
        nursery.cancel_scope.cancel()


async def test_an_ask_after_the_actor_stopped_ends_cancelled_or_says_so(autojump_clock):
    """A request handler cancelled with the coordinator asked the stopped actor for the
    census (/healthz) before its next checkpoint and died of BrokenResourceError."""
    async with trio.open_nursery() as nursery:
        registry: RegistryClient = await nursery.start(serve_registry, make_config(), Metrics())
        nursery.cancel_scope.cancel()
    with trio.CancelScope() as scope:
        scope.cancel()
        await registry.census()
    assert scope.cancelled_caught
    with pytest.raises(RegistryStopped):
        await registry.census()
    await registry.unregister("a", 1)  # a tell to a stopped actor is no news: no error


# ---- the guard: only the registry touches its state ----------------------------------


def _state_reads(source: str) -> list[int]:
    """The lines where ``source`` reaches into a registry's state: ``<x>.registry.state``,
    ``registry.state``, or the tests' handle ``_state_for_tests``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        named_registry = (isinstance(owner, ast.Name) and owner.id == "registry") or (
            isinstance(owner, ast.Attribute) and owner.attr == "registry")
        if node.attr == "_state_for_tests" or (named_registry and node.attr == "state"):
            found.append(node.lineno)
    return sorted(found)


def test_no_production_code_touches_the_registry_state():
    """Other tasks ask the actor (docs/architecture.md, "Who may touch what")."""
    allowed = {ROOT / "coordinator" / "registry" / "actor.py"}  # where the handle is made
    reads = [f"{path.relative_to(ROOT)}:{line}"
             for package in PRODUCTION for path in sorted((ROOT / package).rglob("*.py"))
             if path not in allowed for line in _state_reads(path.read_text())]
    assert reads == []
    assert not hasattr(RegistryClient, "state")


def test_the_guard_finds_what_it_looks_for():
    assert _state_reads("def f(app, registry, racer):\n    app.registry.state.providers\n"
                        "    registry.state\n    registry._state_for_tests\n"
                        "    racer.state.phase\n") == [2, 3, 4]

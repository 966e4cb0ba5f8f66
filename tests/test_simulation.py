"""Hypothesis-driven fault schedules over the whole system, in virtual time."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from provider_sim.behaviours import Behaviour, Fault

from .simulation import ProviderSpec, RequestSpec, Scenario, check_invariants, play, to_json

pytestmark = pytest.mark.slow  # a long property run: whole-system fault schedules (docs/testing.md)

EXAMPLES = int(os.environ.get("SIMULATION_EXAMPLES", "200"))

behaviours = st.one_of(
    st.just(Behaviour()),
    st.builds(Behaviour, st.just(Fault.ERROR), st.sampled_from([500, 502, 503, 400, 429])),
    st.builds(Behaviour, st.sampled_from([Fault.ROLE_THEN_ERROR, Fault.ROLE_THEN_CLOSE,
                                          Fault.STALL, Fault.STALL_AFTER_ROLE,
                                          Fault.ERROR_AFTER_CONTENT, Fault.ROLE_THEN_DISCONNECT,
                                          Fault.DISCONNECT_AFTER_CONTENT,
                                          Fault.GARBAGE_CHUNK])),
    st.builds(Behaviour, first_token_delay=st.sampled_from([1.0, 3.0, 8.0])),
    st.builds(Behaviour, accepted_delay=st.sampled_from([0.0, 30.0, 700.0])),
    st.builds(Behaviour, token_interval=st.sampled_from([1.0, 20.0]),
              ignore_cancel=st.booleans()),
)


@st.composite
def providers(draw: st.DrawFn) -> tuple[ProviderSpec, ...]:
    count = draw(st.integers(1, 4))
    out = []
    for i in range(count):
        drop = draw(st.none() | st.floats(0, 40))
        out.append(ProviderSpec(
            provider_id=f"p{i}",
            version=draw(st.sampled_from(["0.6.0", "0.6.3", "0.6.4", "0.7.0", "garbage"])),
            vision=draw(st.booleans()),
            template_render_ok=draw(st.sampled_from([None, None, True, False])),
            decode_tps=draw(st.sampled_from([50.0, 100.0, 400.0])),
            script=tuple(draw(st.lists(behaviours, max_size=4))),
            drop_at=drop,
            back_after=draw(st.none() | st.floats(0, 30)) if drop is not None else None,
        ))
    return tuple(out)


requests = st.builds(
    RequestSpec,
    at=st.floats(0, 30),
    endpoint=st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/messages",
                              "/v1/completions"]),
    stream=st.booleans(),
    tools=st.booleans(),
    media=st.booleans(),
    hang_up_after=st.none() | st.floats(0, 20),
)

scenarios = st.builds(Scenario, providers(), st.lists(requests, min_size=1, max_size=5).map(tuple),
                      st.integers(0, 2**16), st.booleans())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_every_fault_schedule_keeps_every_promise(scenario):
    note(f"replay: python -m tests.simulation '{to_json(scenario)}'")
    check_invariants(play(scenario))

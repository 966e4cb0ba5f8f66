"""The hostile-input fuzz campaign (strategies and drivers: tests/fuzz.py).

One test per target; each keeps one world alive across its examples and checks,
after every example: no 500 (only the provider outcomes 502/503/504 may pass
500), error bodies in the family's shape, no ERROR log or traceback from
``coordinator.*``, nothing escaped (the coordinator and the provider edge are
alive), the next normal chat completion succeeds, nothing leaked.

``FUZZ_EXAMPLES`` sets the examples per target (150 by default; ``nox -s fuzz``
runs 100,000). ``FUZZ_SURVEY=1`` keeps going after a violation and reports one
example per distinct origin at the end. ``FUZZ_DB=none`` disables the example
database (``.hypothesis/fuzz``), which otherwise replays past failures first.

The ``@example`` cases are the campaign's first findings, minimized: they run
before anything is generated, so the default run catches them every time.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from provider_sim.behaviours import Behaviour

from .fuzz import (
    CHAT,
    EXAMPLES,
    POST_ROUTES,
    RESPONSES,
    AdmissionCase,
    Body,
    Campaign,
    Frame,
    HttpCase,
    InflightCase,
    RawCase,
    Rid,
    Sealed,
    admission_cases,
    admission_scenario,
    base_body,
    body_scenario,
    digits,
    head_scenario,
    http_bodies,
    http_cases,
    in_process,
    inflight_cases,
    inflight_scenario,
    live_server,
    nested,
    raw_cases,
    raw_scenario,
    valid_register,
)
from .fuzz_h2 import H2Case, h2_cases, h2_scenario, h2_world
from .fuzz_peer import (
    FarCase,
    LinkCase,
    Send,
    peer_cases,
    peer_scenario,
    peer_world,
    relay_to_p,
)

pytestmark = pytest.mark.slow  # long property runs, some over real sockets (docs/testing.md)

_DB = os.environ.get("FUZZ_DB", ".hypothesis/fuzz")

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    print_blob=True,
    database=None if _DB.lower() in ("", "none") else DirectoryBasedExampleDatabase(_DB),
    # One world is shared by the examples of a test on purpose (function_scoped_fixture);
    # the bodies are big on purpose (data_too_large, large_base_example).
    suppress_health_check=list(HealthCheck),
)


def _campaign(request: pytest.FixtureRequest, world: object, **kw: object) -> Iterator[Campaign]:
    with Campaign(request.node.name, world, **kw).running() as campaign:  # type: ignore[arg-type]
        yield campaign


@pytest.fixture
def plain_world(request: pytest.FixtureRequest) -> Iterator[Campaign]:
    """The in-process coordinator with one healthy simulated provider (m1, v1)."""
    yield from _campaign(request, in_process())


@pytest.fixture
def puppet_world(request: pytest.FixtureRequest) -> Iterator[Campaign]:
    """Plus a hand-driven provider serving ``fz``; the simulated one streams a token a second."""
    yield from _campaign(request, in_process(sim_behaviour=Behaviour(token_interval=1.0), puppet=True))


@pytest.fixture
def link_world(request: pytest.FixtureRequest) -> Iterator[Campaign]:
    """Plus the peer server, and a link to a hostile far instance whose provider serves ``fm``."""
    yield from _campaign(request, peer_world())


@pytest.fixture
def http2_world(request: pytest.FixtureRequest) -> Iterator[Campaign]:
    """The coordinator's real HTTP stack (hypercorn, in memory) and a provider whose
    behaviour each stream draws."""
    yield from _campaign(request, h2_world())


@pytest.fixture
def live_world(request: pytest.FixtureRequest) -> Iterator[Campaign]:
    """A real coordinator on loopback sockets (hypercorn, trio-websocket), real clock."""
    yield from _campaign(request, live_server(), virtual_time=False)


def _register(**fields: object) -> Frame:
    return Frame(valid_register(provider_id="fz-adm", **fields))


def _sealed(endpoint: str, payload: object, stream: bool = False) -> InflightCase:
    frame = Frame({"type": "inference_response_chunk", "request_id": Rid("puppet"),
                   "encrypted_data": Sealed(payload)})
    return InflightCase(endpoint, stream, True, (("puppet", frame),), "content_complete", False)


_JSON = (b"content-type", b"application/json")
_WS = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


@pytest.mark.parametrize("route", POST_ROUTES)
@fuzz
@given(data=st.data())
def test_hostile_bodies(plain_world: Campaign, route: str, data: st.DataObject) -> None:
    body = data.draw(http_bodies(route), label="body")
    plain_world.example(body_scenario(route, body), f"POST {route} with {body!r}")


@fuzz
@given(case=http_cases())
@example(HttpCase("POST", CHAT, headers=((b"authorization", b"Bearer \xe9"), _JSON),
                  body=Body(base_body(CHAT)).encode()))
@example(HttpCase("GET", "/status", b"key=%C3%A9", client=("10.1.2.3", 5555)))
@example(HttpCase("GET", "/healthz", headers=((b"host", b"a..b"),)))
def test_hostile_heads(plain_world: Campaign, case: HttpCase) -> None:
    plain_world.example(head_scenario(case), repr(case))


@fuzz
@given(case=admission_cases())
@example(AdmissionCase(Frame("[" * 1000), "sign"))
@example(AdmissionCase(_register(auth_token="é"), "sign"))
@example(AdmissionCase(_register(version="0.7.0\r\nX-Injected: 1"), "sign"))
@example(AdmissionCase(_register(public_key=base64.b64encode(bytes(32)).decode()), "sign"))
def test_hostile_frames_before_admission(plain_world: Campaign, case: AdmissionCase) -> None:
    plain_world.example(admission_scenario(case), repr(case))


@fuzz
@given(case=inflight_cases())
@example(InflightCase(CHAT, False, False, (("puppet", Frame(nested(1105, "mixed"))),),
                      "content_complete", False))
@example(_sealed(RESPONSES, nested(2000, "mixed"), stream=True))
@example(_sealed(CHAT, {"choices": [1]}))
@example(InflightCase(CHAT, False, True, (("puppet", Frame(
    {"type": "inference_complete", "request_id": Rid("puppet"),
     "usage": {"prompt_tokens": digits(4300), "completion_tokens": digits(4300)}})),),
    "silence", False))
def test_hostile_frames_after_admission(puppet_world: Campaign, case: InflightCase) -> None:
    puppet_world.example(inflight_scenario(case), repr(case))


@fuzz
@given(case=raw_cases())
@example(RawCase((b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + _WS + b"Sec-WebSocket-Version: 13\r\n\r\n",)))
@example(RawCase((b"G", b"ET /healthz HTTP/1.0\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
                 reset=True, read=False))
@example(RawCase((b"POST /v1/chat/completions HTTP/1.1\r\nHost: fuzz\r\nAuthorization: Bearer test-key\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 84\r\n\r\n\x00\"model\": \"m1\", "
                  b"\"messages\": [{\"role\": \"user\", \"content\": \"hello\"}], \"stream\": false}",),
                 read=False))
def test_hostile_http_bytes(live_world: Campaign, case: RawCase) -> None:
    live_world.example(raw_scenario(case), repr(case))


@fuzz
@given(case=peer_cases())
# A relay naming a consumer's request in flight on p took over its slot and stream.
@example(LinkCase(None, (Send(0, relay_to_p(Rid("local"))),), True, "close"))
# A relay refused (its inner request names another id) on a link already gone: an ERROR.
@example(LinkCase(None, (Send(0, relay_to_p(Rid("a"), Rid("b"))),), False, "cut-abort"))
def test_hostile_peer_frames(link_world: Campaign, case: LinkCase | FarCase) -> None:
    link_world.example(peer_scenario(case), repr(case))


@fuzz
@given(case=h2_cases())
def test_hostile_http2_flow_control(http2_world: Campaign, case: H2Case) -> None:
    http2_world.example(h2_scenario(case), repr(case))

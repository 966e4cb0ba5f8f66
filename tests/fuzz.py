"""The hostile-input fuzz campaign: strategies and drivers (the tests are in test_fuzz.py).

Five surfaces, each fed what an attacker or a broken peer can send:

* **HTTP bodies** for every POST route: arbitrary bytes, arbitrary JSON (huge
  numbers, NaN, lone surrogates, nesting 2,000 deep) and, above all, *valid
  bodies with one to three fields replaced* by hostile values, because random
  bytes rarely get past the parser.
* **HTTP heads**: methods, paths, query strings and headers (non-ASCII and
  very long credentials, content types) on every route, GET and POST.
* **Provider frames**, before admission (the first frame on a fresh socket;
  hostile ``register`` frames, answered challenges or not) and after it (frames
  from admitted providers while a consumer request is in flight to them).
* **Raw HTTP bytes** on a real loopback server (bad request lines, huge heads,
  bad chunking, pipelining, WebSocket upgrades on API paths, TCP resets).
* **Peer-link frames** between instances, both ways (tests/fuzz_peer.py, which
  builds on this module's machinery).

How it runs
-----------
A :class:`Campaign` keeps one *world* (the in-process harness with its
providers, or a real loopback server) alive in a Trio thread across examples,
and Hypothesis drives it from the test's thread: each example is handed to
the world with ``trio.from_thread.run``. The in-process worlds run under a
``MockClock`` whose autojump is on only while an example runs, so timeouts
cost nothing and no timer fires between examples.

After every example the campaign checks the invariants (:meth:`Report.problems`):
nothing escaped (the world and the provider edge are alive), no ERROR record
or traceback was logged by ``coordinator.*`` (or ``hypercorn.error`` on the
real server), no status >= 500 other than the documented provider outcomes
502/503/504, every error body has its family's shape, the next normal chat
completion succeeds, and no lease, queued entry or provider stream is left.

After a violation the world is replaced and, outside survey mode, every later
example gets a fresh one, so Hypothesis shrinks and replays in isolation.

Environment: ``FUZZ_EXAMPLES`` (examples per target, 150), ``FUZZ_SURVEY=1``
(record violations, one per distinct origin with the shortest example seen,
instead of stopping at the first; all are reported at the end), ``FUZZ_TRACE``
(a file each example is appended to before it runs: the last line names a
hang), ``FUZZ_WALL_BUDGET`` (wall-clock seconds before an example counts as
hung and its world is abandoned, 120), ``FUZZ_DB`` (see test_fuzz.py).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import inspect
import json
import logging
import math
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import nacl.public
import nacl.signing
import trio
import trio.testing
import trio_websocket
from hypothesis import strategies as st

from coordinator.app import serve
from coordinator.protocol import EncryptedPayload, crypto, open_request, sign_challenge
from provider_sim.behaviours import HEALTHY, Behaviour
from provider_sim.formats import transcript, words_for
from provider_sim.provider import SimProvider

from .harness import ADMIN_KEY, API_KEY, MODEL, TOKEN, VISION_MODEL, make_config, model, open_harness

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
SURVEY = os.environ.get("FUZZ_SURVEY", "") not in ("", "0")
TRACE = os.environ.get("FUZZ_TRACE", "")  # a file: each example is appended before it runs
# Wall-clock seconds one example may take before the campaign calls it a hang and moves on
# (virtual-time budgets cannot see a task stuck in a shielded scope).
WALL_BUDGET = float(os.environ.get("FUZZ_WALL_BUDGET", "120"))
PROGRESS_EVERY = 10_000  # examples between progress lines

CHAT, COMPLETIONS, RESPONSES, MESSAGES = (
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
POST_ROUTES = (CHAT, COMPLETIONS, RESPONSES, MESSAGES)
GET_ROUTES = ("/v1/models", "/healthz", "/metrics", "/status", "/v1/admin/providers")
# Statuses a consumer may see when providers fail (docs/operations.md): anything else >= 500 is ours.
PROVIDER_STATUSES = frozenset({502, 503, 504})
PUPPET_MODEL = "fz"  # served only by the hand-driven provider of the post-admission target
SIM_ID = "p"
# Virtual seconds one example may take: a few dispatch budgets (600 s each) at most.
EXAMPLE_BUDGET = 4 * 3600.0
# The in-process worlds: no periodic challenge or liveness deadline ever fires
# mid-example (virtual time accumulates across examples), and the breaker never
# trips, so one example's provider errors do not change how the next is routed.
FUZZ_CONFIG: dict[str, Any] = dict(challenge_interval=1e9, heartbeat_timeout=1e9,
                                   breaker_strikes=10**9)


# =============================================================================
# JSON text: values json.dumps cannot write, and placeholders filled at send time
# =============================================================================


@attrs.frozen(repr=False)
class Raw:
    """JSON text written verbatim: numbers past float or int limits, NaN, deep nesting."""

    text: str
    label: str = ""

    def __repr__(self) -> str:
        return self.label or f"Raw({self.text!r})"


def nested(depth: int, kind: str = "list") -> Raw:
    """``depth`` levels of nesting, as text (never built as Python objects)."""
    match kind:
        case "list":
            text = "[" * depth + "]" * depth
        case "object":
            text = '{"a":' * depth + "1" + "}" * depth
        case "mixed":
            text = '[{"a":' * depth + "1" + "}]" * depth
        case _:  # unclosed
            text = "[" * depth
    return Raw(text, f"nested({depth}, {kind!r})")


def deep_schema(depth: int) -> Raw:
    """A JSON-Schema object nested ``depth`` properties deep, missing its leaf ``type``."""
    text = '{"type":"object","properties":{"a":' * depth + '{"enum":[1]}' + "}}" * depth
    return Raw(text, f"deep_schema({depth})")


def digits(count: int, sign: str = "") -> Raw:
    return Raw(sign + "9" * count, f"digits({count}{', ' + repr(sign) if sign else ''})")


class Placeholder:
    """A value filled in when its frame is sent (the ``resolve`` of :func:`dumps`)."""


@attrs.frozen
class Rid(Placeholder):
    """A request id filled in when the frame is sent: ``puppet`` / ``sim`` (the request in
    flight there), ``stale`` (an earlier request of the puppet) or ``unknown``."""

    which: str


@attrs.frozen
class Sealed(Placeholder):
    """``encrypted_data`` that really decrypts, for the puppet's request, to ``plaintext``."""

    plaintext: Any  # a str, or a JSON value written with dumps()


@attrs.frozen
class Key(Placeholder):
    """The puppet's own ``public`` (X25519) or ``signing`` (Ed25519) key, base64."""

    which: str


def dumps(value: Any, resolve: Callable[[Any], Any] | None = None, *, ascii_only: bool = True) -> str:
    """JSON text for ``value``; :class:`Raw` is written as is, placeholders via ``resolve``."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Placeholder):
        if resolve is None:
            raise TypeError(f"no resolver for {value!r}")
        return dumps(resolve(value), resolve, ascii_only=ascii_only)
    if isinstance(value, dict):
        return "{" + ",".join(
            json.dumps(str(k), ensure_ascii=ascii_only) + ":" + dumps(v, resolve, ascii_only=ascii_only)
            for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v, resolve, ascii_only=ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def to_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


_RUN_TEXT = re.compile(r"(.)\1{15,}", re.S)
_RUN_BYTES = re.compile(rb"(.)\1{15,}", re.S)


def _runs_repr(value: str | bytes) -> str:
    """An evaluable repr with long runs folded: ``b'Bearer ' + b'A' * 100000``."""
    pattern: Any = _RUN_TEXT if isinstance(value, str) else _RUN_BYTES
    plain: Any = str(value) if isinstance(value, str) else bytes(value)
    parts, at = [], 0
    for run in pattern.finditer(plain):
        if run.start() > at:
            parts.append(repr(plain[at:run.start()]))
        parts.append(f"{plain[run.start():run.start() + 1]!r} * {run.end() - run.start()}")
        at = run.end()
    if at < len(plain) or not parts:
        parts.append(repr(plain[at:]))
    return " + ".join(parts)


class Text(str):
    """A str whose repr folds long runs, so a 100 kB example prints in one line."""

    def __repr__(self) -> str:
        return _runs_repr(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


class Blob(bytes):
    """Bytes whose repr folds long runs."""

    def __repr__(self) -> str:
        return _runs_repr(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def compact(value: Any) -> Any:
    """Long values as :class:`Text` / :class:`Blob` (same value, short repr)."""
    if isinstance(value, str) and len(value) > 200:
        return Text(value)
    if isinstance(value, bytes) and len(value) > 200:
        return Blob(value)
    return value


def pick(values: list[Any]) -> st.SearchStrategy[Any]:
    """``st.sampled_from`` with long values compacted."""
    return st.sampled_from([compact(v) for v in values])


# =============================================================================
# Hostile values
# =============================================================================

BIG_NUMBERS = [
    Raw("1" + "0" * 310, "10**310"), Raw("-1" + "0" * 310, "-10**310"), digits(4300),
    digits(4301), digits(4300, "-"), Raw("1e309", "1e309"), Raw("-1e309", "-1e309"),
    Raw("1e-400", "1e-400"), Raw("NaN", "NaN"), Raw("Infinity", "Infinity"),
    Raw("-Infinity", "-Infinity"), Raw("-0", "-0"), Raw("1E400", "1E400"),
]
hostile_ints = st.one_of(
    pick([-1, 0, 1, 2**31, 2**63, 2**64, -(2**63), 10**18, 10**30]),
    st.sampled_from(BIG_NUMBERS),
    st.integers(),
)
hostile_floats = st.one_of(
    pick([0.5, -0.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf, 1.0]),
    st.floats(),
)
surrogates = st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF,
                                            exclude_categories=()), min_size=1, max_size=3)
hostile_text = st.one_of(
    pick([
        "", "é", "\ud800", "\udfff", "\x00", "\u202e", "m1\n", " m1", "M1", "\r\n", "\\", '"',
        "<script>alert(1)</script>", "%s%n", "[DONE]", "\n\ndata: [DONE]\n\n", "🙂" * 300,
        "a" * 70_000, "\ufeff", "ǅ", "İ", "\u0000\u0001\u001f",
    ]),
    st.text(max_size=40),
    surrogates,
)
json_scalars = st.one_of(st.none(), st.booleans(), hostile_ints, hostile_floats, hostile_text)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
nesting_depths = st.one_of(
    pick([10, 100, 500, 800, 900, 950, 980, 990, 1000, 1500, 2000]),
    st.integers(1, 2000),
)
deep_values = st.builds(nested, nesting_depths, pick(["list", "object", "mixed"]))
hostile_values = st.one_of(json_scalars, json_values, deep_values,
                           pick([[], {}, [None], {"": None}]))
token_counts = st.one_of(
    pick([
        Raw("1" + "0" * 310, "10**310"), digits(4300), digits(400), 2**63, 2**64, 10**30, 0, -1,
        Raw("-1" + "0" * 310, "-10**310"), 1.5, 1e308, True, False, "16", None, [], {},
        Raw("1e999", "1e999"), Raw("NaN", "NaN"), 2**53 + 1,
    ]),
    st.integers(),
    hostile_values,
)


# =============================================================================
# HTTP bodies
# =============================================================================

ROUTE_FIELDS = {
    CHAT: ("model", "messages", "stream", "max_tokens", "max_completion_tokens", "tools",
           "tool_choice", "stream_options", "provider_ids", "temperature", "n", "response_format",
           "functions", "stop", "seed", "user", "parallel_tool_calls", "endpoint"),
    COMPLETIONS: ("model", "prompt", "stream", "max_tokens", "provider_ids", "echo", "logprobs",
                  "suffix", "best_of", "stop", "temperature", "endpoint"),
    RESPONSES: ("model", "input", "instructions", "stream", "max_output_tokens", "tools",
                "tool_choice", "provider_ids", "text", "reasoning", "previous_response_id",
                "endpoint"),
    MESSAGES: ("model", "messages", "system", "max_tokens", "stream", "tools", "tool_choice",
               "provider_ids", "stop_sequences", "metadata", "thinking", "endpoint"),
}
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def base_body(route: str, model_id: str = MODEL, stream: bool = False) -> dict[str, Any]:
    """The smallest valid body for ``route``."""
    hello = [{"role": "user", "content": "hello"}]
    match route:
        case "/v1/completions":
            return {"model": model_id, "prompt": "hello", "stream": stream}
        case "/v1/responses":
            return {"model": model_id, "input": "hello", "stream": stream}
        case "/v1/messages":
            return {"model": model_id, "max_tokens": 16, "messages": hello, "stream": stream}
        case _:
            return {"model": model_id, "messages": hello, "stream": stream}


def chat_tool(params: Any, name: Any = "lookup") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": params}}


SCHEMA_LEAVES = [
    {"type": "string"}, {"enum": ["a", "b"]}, {"type": ["string", "null"]}, {"anyOf": [{"type": "integer"}]},
    {"description": "no type"}, {}, {"type": 5}, {"properties": "x"}, {"items": [1]},
]
schemas = st.one_of(
    st.builds(lambda leaf: {"type": "object", "properties": {"q": leaf}}, st.sampled_from(SCHEMA_LEAVES)),
    st.recursive(
        st.sampled_from(SCHEMA_LEAVES),
        lambda kids: st.one_of(
            st.builds(lambda d: {"type": "object", "properties": d},
                      st.dictionaries(st.text(max_size=4), kids, max_size=3)),
            st.builds(lambda k: {"type": "array", "items": k}, kids),
            st.builds(lambda ks: {"anyOf": ks}, st.lists(kids, max_size=3)),
        ),
        max_leaves=8,
    ),
    st.builds(deep_schema, nesting_depths),
    hostile_values,
)
tool_entries = st.one_of(
    st.builds(chat_tool, schemas),
    st.builds(lambda p, n: {"type": "function", "name": n, "parameters": p}, schemas, hostile_text),
    st.builds(lambda p, n: {"name": n, "input_schema": p}, schemas, hostile_text),
    st.builds(lambda f: {"type": "function", "function": f}, hostile_values),
    hostile_values,
)
image_urls = st.one_of(
    pick(["data:image/png;base64,iVBORw0KGgo=", "https://example.com/cat.png", "", "data:,",
          "file:///etc/passwd", "data:image/png;base64," + "A" * 100_000]),
    hostile_values,
)
content_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": hostile_text | hostile_values}),
    st.fixed_dictionaries({"type": pick(["image_url", "input_image", "video_url"]),
                           "image_url": st.fixed_dictionaries({"url": image_urls}) | hostile_values}),
    st.fixed_dictionaries({"type": st.just("image"), "source": st.fixed_dictionaries(
        {"type": st.just("base64"), "media_type": hostile_text, "data": hostile_text})}),
    st.fixed_dictionaries({"type": hostile_values}),
    json_values,
)
message_objects = st.fixed_dictionaries(
    {"role": pick(["user", "system", "assistant", "tool", "developer"]) | hostile_values,
     "content": st.one_of(hostile_text, st.lists(content_parts, max_size=3), hostile_values)},
    optional={"name": hostile_text, "tool_calls": hostile_values, "tool_call_id": hostile_values},
)
message_lists = st.one_of(
    st.lists(message_objects, min_size=1, max_size=3),
    st.lists(hostile_values, max_size=3),
    st.builds(lambda d: [{"role": "user", "content": d}], deep_values),
    hostile_values,
)


@attrs.frozen
class Body:
    """One HTTP request body: a JSON value written with :func:`dumps`, or raw bytes."""

    value: Any
    ascii_only: bool = True
    pieces: int = 1  # ASGI http.request messages the body is split into

    def encode(self) -> bytes:
        if isinstance(self.value, bytes):
            return self.value
        return to_bytes(dumps(self.value, ascii_only=self.ascii_only))


# Strategies are built once, here, never inside a draw: a strategy built afresh is
# validated afresh, and that validation (over the recursive hostile values) cost a
# quarter of the campaign's time.
body_models = pick([MODEL, VISION_MODEL, "no-such-model"])
small_token_counts = st.integers(1, 64)
mutation_kinds = pick(["tokens", "field", "messages", "tools", "provider_ids", "stream", "drop",
                       "extra"])
tool_lists = st.lists(tool_entries, min_size=1, max_size=3) | hostile_values
provider_id_lists = st.one_of(st.lists(hostile_text | hostile_values, max_size=3), hostile_values)
extra_field_names = st.text(max_size=12)
token_fields = st.sampled_from(TOKEN_FIELDS)
route_fields = {route: st.sampled_from(fields) for route, fields in ROUTE_FIELDS.items()}


@functools.cache
@st.composite
def valid_bodies(draw: st.DrawFn, route: str) -> dict[str, Any]:
    model_id = draw(body_models)
    body = base_body(route, model_id, draw(st.booleans()))
    if draw(st.booleans()):
        body["tools"] = [chat_tool({"type": "object", "properties": {"q": {"enum": ["a"]}}})]
    if draw(st.booleans()):
        field = {CHAT: "max_completion_tokens", RESPONSES: "max_output_tokens"}.get(route, "max_tokens")
        body[field] = draw(small_token_counts)
    if draw(st.booleans()):
        body["provider_ids"] = [SIM_ID]
    if route in (CHAT, MESSAGES) and draw(st.booleans()):
        body["messages"] = [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    return body


@functools.cache
@st.composite
def mutated_bodies(draw: st.DrawFn, route: str) -> dict[str, Any]:
    """A valid body with one to three fields replaced, removed or added."""
    body = draw(valid_bodies(route))
    fields = route_fields[route]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(mutation_kinds)
        match kind:
            case "tokens":
                body[draw(token_fields)] = draw(token_counts)
            case "field":
                body[draw(fields)] = draw(hostile_values)
            case "messages":
                key = {COMPLETIONS: "prompt", RESPONSES: "input"}.get(route, "messages")
                body[key] = draw(message_lists)
            case "tools":
                body["tools"] = draw(tool_lists)
            case "provider_ids":
                body["provider_ids"] = draw(provider_id_lists)
            case "stream":
                body["stream"] = draw(hostile_values)
            case "drop":
                body.pop(draw(fields), None)
            case _:
                body[draw(extra_field_names)] = draw(hostile_values)
    return body


SPECIAL_BODIES = [
    b"", b" ", b"null", b"[]", b"{}", b'"x"', b"1", b"NaN", b'{"model": NaN}', b"\xef\xbb\xbf{}",
    b"{}{}", b"{} x", b'{"a":1,}', b"\xff\xfe{\x00", b"\x00" * 64, b'{"model":"m1"' * 3,
    b'{"model":"m1","messages":[{"role":"user","content":"\\ud800"}]}',
    b'{"model":"m1","messages":[{"role":"user","content":"\xed\xa0\x80"}]}',
    b'{"model":"m1","model":5,"messages":[{"role":"user","content":"x"}]}',
    b'{"tools":' + b"[" * 5000,
]


@functools.cache
def http_bodies(route: str) -> st.SearchStrategy[Body]:
    """Hostile bodies for ``route``, mostly valid bodies with hostile fields."""
    return st.one_of(
        st.builds(Body, mutated_bodies(route), st.booleans(), st.integers(1, 3)),
        st.builds(Body, valid_bodies(route)),
        st.builds(Body, json_values, st.booleans()),
        st.builds(Body, deep_values | st.builds(nested, nesting_depths, st.just("unclosed"))),
        st.builds(Body, st.sampled_from(SPECIAL_BODIES)),
        st.builds(Body, st.binary(max_size=200)),
    )


# =============================================================================
# HTTP heads
# =============================================================================


@attrs.frozen
class HttpCase:
    """One HTTP request as an ASGI server would hand it over."""

    method: str
    path: str
    query: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = ("127.0.0.1", 40000)
    raw_path: bytes | None = None


ODD_PATHS = ["/", "/v1", "/v1/models/", "//v1/models", "/v1/chat/completions/", "/V1/MODELS",
             "/v1/models/../healthz", "/v1/admin/providers/x", "/nope", "/" + "a" * 5000, "/\u00e9",
             "/v1/models\x00", "/v1/messages/", "*"]
METHODS = ["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE", "CONNECT", "BREW", "get"]
credentials = st.one_of(
    pick([API_KEY, ADMIN_KEY]).map(str.encode),
    pick([
        b"\xe9", "é".encode(), API_KEY.encode() + b"\xe9", b"", b" ", API_KEY.encode() + b"\x00",
        b"A" * 100_000, b"\xc3\x28", b"\xff\xfe", API_KEY.upper().encode(), b"\t" + API_KEY.encode(),
    ]),
    st.binary(max_size=40),
)
authorizations = st.one_of(
    credentials.map(lambda c: compact(b"Bearer " + c)),
    pick([b"bearer " + API_KEY.encode(), b"BEARER " + API_KEY.encode(), b"Bearer",
          b"Bearer  " + API_KEY.encode() + b"  ", b"Basic dGVzdC1rZXk6", b"Bearer " +
          API_KEY.encode() + b", Bearer " + ADMIN_KEY.encode(), b"Bearer\xe9"]),
    st.binary(max_size=40),
)
content_types = st.one_of(
    pick([b"application/json", b"application/json; charset=latin-1",
          b"application/json; charset=utf-16", b"application/json; charset=\xe9", b"text/plain",
          b"multipart/form-data; boundary=x",
          b"multipart/form-data", b"application/x-www-form-urlencoded", b"", b"*/*",
          b"application/json; boundary=" + b"x" * 10_000]),
    st.binary(max_size=40),
)
header_names = st.one_of(
    pick([b"accept", b"accept-encoding", b"content-encoding", b"transfer-encoding", b"expect",
          b"host", b"cookie", b"x-forwarded-for", b"x-request-id", b"origin", b"upgrade",
          b"connection", b"range", b"if-none-match", b"authorization", b"x-api-key",
          b"content-type"]),
    st.binary(min_size=1, max_size=20),
)
header_values = st.one_of(
    pick([b"gzip", b"100-continue", b"chunked", b"websocket", b"Upgrade", b"bytes=0-1",
          b"\xe9", b"a" * 100_000, b"\x00", b"\r\n"]),
    st.binary(max_size=40),
)
hosts = st.one_of(
    pick([b"a" * 64, b"a" * 63, b"a" * 64 + b".example", b"x." * 200, b"\xe9", b"xn--", b"xn--zz",
          b"[::1", b"[::1]:99999", b"localhost:0", b"h:-1", b"", b".", b"..", b"a..b", b"\xff\xfe"]),
    st.binary(max_size=80),
)
queries = st.one_of(
    credentials.map(lambda c: b"key=" + urllib.parse.quote_from_bytes(c).encode()),
    pick([b"", b"key=" + ADMIN_KEY.encode(), b"key=%C3%A9", b"key=\xe9", b"key=%FF", b"key=",
          b"key=" + b"a" * 100_000, b"%", b"key=a&key=b", b"a=" + b"%00" * 100, b"key=%ED%A0%80"]),
    st.binary(max_size=40),
)
clients = pick([("127.0.0.1", 40000), ("10.1.2.3", 5555), None, ("::1", 1), ("", 0)])
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def wire_name(name: bytes) -> bytes:
    """A header name as h11/h2 deliver it: a lower-case token."""
    return bytes(c if c in _TOKEN_CHARS else ord("x") for c in name.lower()) or b"x"


def wire_value(value: bytes) -> bytes:
    """A header value as h11 delivers it: no NUL, CR, LF, VT or FF (obs-text bytes stay), trimmed."""
    return compact(bytes(c for c in value if c not in b"\x00\n\r\x0b\x0c").strip(b" \t"))


def wire_query(query: bytes) -> bytes:
    """A query string as h11 delivers it: visible ASCII only, anything else percent-encoded."""
    return b"".join(bytes([c]) if 0x21 <= c <= 0x7E else b"%%%02X" % c for c in query)


paths = pick([*GET_ROUTES, *POST_ROUTES]) | pick(ODD_PATHS)
methods = st.sampled_from(METHODS)
head_changes = pick(["authorization", "x-api-key", "drop-auth", "content-type", "host", "header"])


@st.composite
def http_cases(draw: st.DrawFn) -> HttpCase:
    """A request to any route with a hostile method, path, query or header set."""
    path = draw(paths)
    method = "POST" if path in POST_ROUTES else "GET"
    if draw(st.integers(0, 4)) == 0:
        method = draw(methods)
    headers: dict[bytes, bytes] = {b"authorization": b"Bearer " + API_KEY.encode(),
                                   b"content-type": b"application/json"}
    if path in ("/status", "/v1/admin/providers") and draw(st.booleans()):
        headers[b"authorization"] = b"Bearer " + ADMIN_KEY.encode()
    extra: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 3))):
        match draw(head_changes):
            case "authorization":
                headers[b"authorization"] = draw(authorizations)
            case "x-api-key":
                headers[b"x-api-key"] = draw(credentials)
            case "drop-auth":
                headers.pop(b"authorization", None)
            case "content-type":
                headers[b"content-type"] = draw(content_types)
            case "host":
                headers[b"host"] = draw(hosts)
            case _:
                extra.append((draw(header_names), draw(header_values)))
    body = b""
    if method not in ("GET", "HEAD"):
        route = path if path in POST_ROUTES else CHAT
        body = Body(base_body(route)).encode()
    # Only what a real server can hand over: h11 and h2 refuse control characters in heads.
    wire = tuple((wire_name(k), wire_value(v)) for k, v in (*headers.items(), *extra))
    raw_path = urllib.parse.quote(path, safe="/*").encode()
    return HttpCase(method, path, wire_query(draw(queries)), wire, body, draw(clients), raw_path)


# =============================================================================
# Provider frames
# =============================================================================


@attrs.frozen
class Frame:
    """One WebSocket frame: a JSON value (with placeholders) or raw text/bytes."""

    value: Any
    binary: bool = False  # send as a binary frame
    ascii_only: bool = True

    def render(self, resolve: Callable[[Any], Any]) -> str | bytes:
        if isinstance(self.value, str | bytes):
            data: str | bytes = self.value
        else:
            data = dumps(self.value, resolve, ascii_only=self.ascii_only)
        if isinstance(data, str):
            try:
                data.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates cannot travel in a text frame
                return to_bytes(data)
            return data.encode() if self.binary else data
        return data


@functools.cache
def raw_frames() -> st.SearchStrategy[Frame]:
    """Frames that are not a well-formed message at all."""
    return st.one_of(
        st.builds(Frame, pick([
            "[" * 1000, "{", "[]", "null", "", " ", '{"type":null}', '{"type":"nope"}', '{"type":5}',
            '{"type":"heartbeat"' + "," * 10, "NaN", '{"type":"heartbeat","x":NaN}', "\ufeff{}",
            '{"type":"heartbeat"}{"type":"heartbeat"}', '{"type":"' + "x" * 500_000 + '"}',
        ])),
        st.builds(Frame, st.text(max_size=60)),
        st.builds(Frame, st.binary(max_size=60), st.just(True)),
        st.builds(Frame, deep_values | st.builds(nested, nesting_depths, st.just("unclosed"))),
        st.builds(Frame, json_values),
    )


MESSAGE_TYPES = ["heartbeat", "inference_response_chunk", "inference_complete", "inference_error",
                 "inference_accepted", "attestation_response", "register", "cancel", "inference_request",
                 "attestation_challenge"]

# Content events in every endpoint's format, with one hostile hole.
EVENT_TEMPLATES: list[Callable[[Any], Any]] = [
    lambda x: {"choices": [{"index": 0, "delta": {"content": x}}]},
    lambda x: {"choices": [{"index": 0, "delta": {"content": "hi", "tool_calls": x}}]},
    lambda x: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": x, "id": "c1", "function": {
        "name": "f", "arguments": "{}"}}]}}]},
    lambda x: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": x}]}}]},
    lambda x: {"choices": [{"index": 0, "delta": x}]},
    lambda x: {"choices": [x]},
    lambda x: {"choices": x},
    lambda x: {"id": x, "created": x, "model": x, "choices": [{"delta": {"content": "hi"}}]},
    lambda x: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": x}]},
    lambda x: {"choices": [{"index": 0, "text": x}]},
    lambda x: {"choices": [{"index": 0, "text": "hi", "finish_reason": x, "logprobs": x}]},
    lambda x: {"type": "response.output_text.delta", "delta": x},
    lambda x: {"type": "response.created", "response": x},
    lambda x: {"type": "response.completed", "response": x},
    lambda x: {"type": "response.output_item.added", "item": x},
    lambda x: {"type": "response.output_item.done", "item": x},
    lambda x: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": x}},
    lambda x: {"type": "content_block_delta", "index": x, "delta": x},
    lambda x: {"type": "content_block_start", "index": 0, "content_block": x},
    lambda x: {"type": "message_start", "message": x},
    lambda x: {"type": "message_delta", "delta": x, "usage": x},
    lambda x: {"type": x},
]
chunk_payloads = st.one_of(
    st.builds(lambda template, hole: template(hole), st.sampled_from(EVENT_TEMPLATES), hostile_values),
    pick(["[DONE]", "", "not json", " [DONE] ", "data: x\n\n", "\n\nevent: error\ndata: {}\n\n"]),
    hostile_text,
    json_values,
    deep_values,
)
rids = st.one_of(pick([Rid("puppet"), Rid("sim"), Rid("unknown"), Rid("stale")]), hostile_values)
usages = st.one_of(
    st.fixed_dictionaries({"prompt_tokens": hostile_ints, "completion_tokens": hostile_ints}),
    st.just({"prompt_tokens": digits(4300), "completion_tokens": digits(4300)}),
    hostile_values,
)
encrypted = st.one_of(
    st.builds(Sealed, chunk_payloads),
    st.fixed_dictionaries({"ephemeral_public_key": st.just(Key("public")) | hostile_text,
                           "ciphertext": pick(["", "AAAA", "=", "é", base64.b64encode(
                               b"\0" * 40).decode(), "A" * 200_000]) | hostile_text}),
    hostile_values,
)


message_kinds = st.sampled_from(MESSAGE_TYPES) | hostile_values
plain_payloads = chunk_payloads | hostile_values
error_texts = hostile_text | hostile_values
status_codes = hostile_ints | hostile_values
extra_frame_fields = pick(["x", "extra", "request_id", "type"])


@functools.cache
@st.composite
def message_frames(draw: st.DrawFn) -> Frame:
    """A frame shaped like a protocol message, with hostile field values."""
    kind = draw(message_kinds)
    frame: dict[str, Any] = {"type": kind}
    match kind:
        case "inference_response_chunk":
            frame["request_id"] = draw(rids)
            if draw(st.booleans()):
                frame["encrypted_data"] = draw(encrypted)
            else:
                data = draw(plain_payloads)
                frame["data"] = dumps(data) if isinstance(data, dict | list | Raw) else data
        case "inference_complete":
            frame.update(request_id=draw(rids), usage=draw(usages))
        case "inference_error":
            frame.update(request_id=draw(rids), error=draw(error_texts),
                         status_code=draw(status_codes))
        case "inference_accepted" | "cancel":
            frame["request_id"] = draw(rids)
        case "attestation_response":
            frame.update(nonce=draw(error_texts), signature=draw(error_texts))
        case "register":
            frame.update(draw(register_frames()))
            frame["type"] = "register"
        case _:
            pass
    for _ in range(draw(st.integers(0, 2))):  # unknown fields must be ignored, however odd
        frame[draw(extra_frame_fields)] = draw(hostile_values)
    return Frame(frame, ascii_only=draw(st.booleans()))


@functools.cache
def provider_frames() -> st.SearchStrategy[Frame]:
    return st.one_of(message_frames(), raw_frames())


request_frame_kinds = pick(["chunk", "chunk", "chunk", "complete", "error", "accepted", "plain"])


@functools.cache
@st.composite
def request_frames(draw: st.DrawFn) -> Frame:
    """A well-formed frame for the request in flight on the puppet, with hostile contents:
    the frames that get furthest (the dispatcher, the relay, SSE framing, assembly)."""
    rid = Rid("puppet")
    match draw(request_frame_kinds):
        case "chunk":
            frame: dict[str, Any] = {"type": "inference_response_chunk", "request_id": rid,
                                     "encrypted_data": Sealed(draw(chunk_payloads))}
        case "complete":
            frame = {"type": "inference_complete", "request_id": rid, "usage": draw(usages)}
        case "error":
            frame = {"type": "inference_error", "request_id": rid,
                     "error": draw(error_texts), "status_code": draw(hostile_ints)}
        case "accepted":
            frame = {"type": "inference_accepted", "request_id": rid}
        case _:  # plaintext from a provider that declared encryption
            payload = draw(chunk_payloads)
            frame = {"type": "inference_response_chunk", "request_id": rid,
                     "data": payload if isinstance(payload, str) else dumps(payload)}
    return Frame(frame, ascii_only=draw(st.booleans()))


def valid_register(models: list[dict[str, Any]] | None = None, provider_id: str | None = None,
                   **fields: Any) -> dict[str, Any]:
    """A register frame the edge accepts, with the puppet's own keys."""
    frame: dict[str, Any] = {
        "type": "register",
        "hardware": {"machine_model": "FuzzMac", "chip_name": "Fuzz M9", "memory_gb": 64.0},
        "models": models if models is not None else [{"id": "fz-adm", "size_bytes": 1024}],
        "backend": "fuzz", "version": "0.7.0", "public_key": Key("public"), "auth_token": TOKEN,
        "encrypted_response_chunks": True, "decode_tps": 200.0, "prefill_tps": 2000.0,
        "signing_public_key": Key("signing"), "max_concurrency": 8,
    }
    if provider_id is not None:
        frame["provider_id"] = provider_id
    frame.update(fields)
    return frame


model_ids = st.one_of(pick(["fz-adm", "", MODEL, "é", "a" * 10_000, "\ud800", "fz\r\nX: 1",
                            "<b>x</b>"]), st.text(max_size=12))
model_infos = st.one_of(
    st.fixed_dictionaries({"id": model_ids}, optional={
        "size_bytes": hostile_ints, "is_vision": st.booleans() | hostile_values,
        "template_render_ok": st.booleans() | hostile_values, "model_type": hostile_text,
        "quantization": hostile_text}),
    hostile_values,
)
many_models = st.integers(100, 3000).map(
    lambda n: Raw("[" + ",".join(f'{{"id":"fz-{i}"}}' for i in range(n)) + "]", f"{n} models"))
versions = st.one_of(
    pick(["0.7.0\r\nX-Injected: 1", "0.7.0\n", "", "v" * 10_000, "1." * 1000, "é", "0.7.0\x00",
          "99999999999999999999999.0.0", "0.7.0-" + "a" * 500, "\ud800"]),
    st.text(max_size=20),
)
speeds = st.one_of(pick([1e308, -1.0, 0.0, -0.0, 5e-324, math.nan, math.inf, -math.inf]),
                   st.sampled_from(BIG_NUMBERS), hostile_floats)
REGISTER_FIELDS = ["auth_token", "version", "decode_tps", "prefill_tps", "models", "provider_id",
                   "max_concurrency", "hardware", "public_key", "signing_public_key", "backend",
                   "encrypted_response_chunks", "extra"]


def _keys(other: str) -> st.SearchStrategy[Any]:
    return pick(["", "AAAA", "é", "A" * 44, base64.b64encode(b"\0" * 32).decode(),
                 Key(other)]) | hostile_values


register_ids = pick(["fz-adm", None])
register_fields = st.sampled_from(REGISTER_FIELDS)
# A hostile value for each register field (built once: see the note above valid_bodies).
register_values: dict[str, st.SearchStrategy[Any]] = {
    "auth_token": pick(["é", "", TOKEN + "\x00", TOKEN.upper(), TOKEN + "é", "\ud800",
                        "a" * 100_000]) | hostile_values,
    "version": versions | hostile_values,
    "decode_tps": speeds | hostile_values,
    "prefill_tps": speeds | hostile_values,
    "models": st.lists(model_infos, max_size=4) | many_models | hostile_values,
    "provider_id": (pick(["", "é", "a" * 10_000, "../x", "fz\r\nX: 1", "<i>x</i>", "\ud800"])
                    | st.text(max_size=10) | hostile_values).filter(lambda v: v != SIM_ID),
    "max_concurrency": pick([10**30, -1, 0, 1, 2**63]) | hostile_ints | hostile_values,
    "hardware": st.fixed_dictionaries({}, optional={
        "machine_model": hostile_text, "chip_name": hostile_text,
        "memory_gb": speeds | hostile_ints}) | hostile_values,
    "public_key": _keys("signing"),  # the other key of the pair, among others
    "signing_public_key": _keys("public"),
}
extra_register_fields = pick(["x", "hardware_extra", "attestation"])


@functools.cache
@st.composite
def register_frames(draw: st.DrawFn) -> dict[str, Any]:
    """A valid register frame with up to four fields made hostile."""
    frame = valid_register(provider_id=draw(register_ids))
    for _ in range(draw(st.integers(0, 4))):
        field = draw(register_fields)
        match field:
            case "extra":
                field = draw(extra_register_fields)
                value: Any = draw(hostile_values)
            case _ if field in register_values:
                value = draw(register_values[field])
            case _:
                value = draw(hostile_values)
        if value is None and field == "provider_id":
            frame.pop(field, None)
        else:
            frame[field] = value
    return frame


@attrs.frozen
class AdmissionCase:
    """A fresh provider socket: a first frame, how the challenge is answered, what follows."""

    first: Frame
    answer: str  # sign | junk | other_key | wrong_nonce | hostile | silent
    after: tuple[Frame, ...] = ()


ANSWERS = ["sign", "junk", "other_key", "wrong_nonce", "hostile", "silent"]


first_frames = st.one_of(
    st.builds(Frame, register_frames(), st.just(False), st.booleans()),
    raw_frames(),
    message_frames(),
)
answers = st.sampled_from(ANSWERS)
frames_after = st.lists(provider_frames(), max_size=2)


@st.composite
def admission_cases(draw: st.DrawFn) -> AdmissionCase:
    return AdmissionCase(draw(first_frames), draw(answers), tuple(draw(frames_after)))


@attrs.frozen
class InflightCase:
    """Hostile frames from admitted providers while consumer requests are in flight to them."""

    endpoint: str
    stream: bool
    content_first: bool  # commit the request with a real content chunk before the hostile frames
    frames: tuple[tuple[str, Frame], ...]  # (puppet | sim, frame)
    finale: str  # content_complete | complete | error | silence | close
    sim_request: bool  # a slow request to the simulated provider, in flight meanwhile


inflight_frames = st.lists(st.one_of(
    st.tuples(st.just("puppet"), request_frames()),
    st.tuples(pick(["puppet", "sim"]), provider_frames()),
), min_size=1, max_size=4)
post_routes = st.sampled_from(POST_ROUTES)
finales = pick(["content_complete", "complete", "error", "silence", "close"])


@st.composite
def inflight_cases(draw: st.DrawFn) -> InflightCase:
    frames = draw(inflight_frames)
    return InflightCase(
        endpoint=draw(post_routes), stream=draw(st.booleans()),
        content_first=draw(st.booleans()), frames=tuple(frames),
        finale=draw(finales), sim_request=draw(st.booleans()),
    )


# =============================================================================
# Raw HTTP bytes
# =============================================================================


@attrs.frozen
class RawCase:
    """Bytes written to a fresh TCP connection, in pieces, then a read, a close or a reset."""

    pieces: tuple[bytes, ...]
    reset: bool = False  # RST instead of FIN when done (SO_LINGER 0)
    read: bool = True  # wait for the answer before closing


def _request(method: bytes = b"GET", target: bytes = b"/healthz", headers: tuple[bytes, ...] = (),
             body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    head = [method + b" " + target + b" " + version, b"Host: fuzz", *headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _chat_request(extra: tuple[bytes, ...] = (), stream: bool = False, path: bytes = CHAT.encode()) -> bytes:
    body = json.dumps(base_body(CHAT, stream=stream)).encode()
    return _request(b"POST", path, (b"Authorization: Bearer " + API_KEY.encode(),
                                    b"Content-Type: application/json",
                                    b"Content-Length: " + str(len(body)).encode(), *extra), body)


WS_UPGRADE = (b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
              b"Sec-WebSocket-Version: 13")
H2C_UPGRADE = (b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
               b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
CHAT_BODY = json.dumps(base_body(CHAT)).encode()
AUTH = b"Authorization: Bearer " + API_KEY.encode()
RAW_TEMPLATES: list[bytes] = [
    _request(),
    _request(version=b"HTTP/1.0"),
    _request(version=b"HTTP/9.9"),
    _request(version=b"HTTP/2.0"),
    b"GET /healthz\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00" * 30,
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x01\x01\x00\x00\x00\x01",
    _request(b"G\xe9T"), _request(b""), _request(b"GET", b""), _request(b"GET", b"\xff\xfe"),
    _request(b"GET", b"/" + b"a" * 70_000), _request(b"GET", b"http://evil/healthz"),
    _request(b"GET", b"/healthz", (b"X-Big: " + b"a" * 70_000,)),
    _request(b"GET", b"/healthz", tuple(b"X-%d: v" % i for i in range(500))),
    _request(b"GET", b"/healthz", (b"Bad Header: v",)), _request(b"GET", b"/healthz", (b": v",)),
    _request(b"GET", b"/healthz", (b"X: \xe9\x00\x7f",)), _request(b"GET", b"/healthz", (b" folded: v",)),
    b"GET /healthz HTTP/1.1\r\nHost: " + b"a" * 64 + b"\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: xn--zz\r\n" + AUTH + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: \xe9\r\n\r\n", b"GET /healthz HTTP/1.1\r\n\r\n",
    _request(b"GET", b"/v1/models", (b"Authorization: Bearer \xe9",)),
    _request(b"GET", b"/status?key=%C3%A9"), _request(b"GET", b"/healthz?\xff"),
    _request(b"GET", b"/v1/models?key=\xe9", (AUTH,)), _request(b"GET", b"/h\xe9alth"),
    _request(b"GET", b"/v1/admin/providers", (b"x-api-key: \xe9",)),
    _request(b"POST", CHAT.encode(), (AUTH, b"Transfer-Encoding: chunked"), b"zz\r\nabc\r\n0\r\n\r\n"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Transfer-Encoding: chunked"), b"ffffffffffffffff\r\nabc\r\n"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Transfer-Encoding: chunked"), b"-1\r\n\r\n"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Transfer-Encoding: chunked"),
             b"%x\r\n%s\r\n0\r\nX-Trailer: \xe9\r\n\r\n" % (len(CHAT_BODY), CHAT_BODY)),
    _request(b"POST", CHAT.encode(), (AUTH, b"Transfer-Encoding: chunked", b"Content-Length: 5"),
             b"0\r\n\r\n"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Transfer-Encoding: gzip, chunked"), b"0\r\n\r\n"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Content-Length: -1"), b"{}"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Content-Length: abc"), b"{}"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Content-Length: 99999999999999999999999"), b"{}"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Content-Length: 100"), b"{}"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Content-Length: 1, 2"), b"{}"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Content-Length: 2"), b"{}GET /healthz HTTP/1.1\r\n\r\n"),
    _request(b"POST", CHAT.encode(), (AUTH, b"Expect: 100-continue", b"Content-Length: %d" % len(CHAT_BODY)),
             CHAT_BODY),
    _request(b"POST", CHAT.encode(), (AUTH, b"Content-Length: 20000000"), b"{" * 1000),
    _chat_request(), _chat_request(stream=True), _chat_request((b"Connection: close",)),
    _request(b"GET", CHAT.encode(), (AUTH, *WS_UPGRADE)),
    _request(b"GET", b"/v1/models", (AUTH, *WS_UPGRADE)),
    _request(b"GET", b"/", WS_UPGRADE),
    _request(b"GET", b"/healthz", WS_UPGRADE),
    _request(b"GET", CHAT.encode(), (AUTH, *WS_UPGRADE[:2])),
    _request(b"GET", CHAT.encode(), (AUTH, b"Upgrade: websocket", b"Connection: Upgrade",
                                     b"Sec-WebSocket-Key: \xe9", b"Sec-WebSocket-Version: 99")),
    _request(b"GET", CHAT.encode(), (AUTH, *WS_UPGRADE)) + b"\x81\x85\x00\x00\x00\x00hello",
    _chat_request(WS_UPGRADE),
    _request(b"GET", b"/healthz", H2C_UPGRADE),
    _chat_request(H2C_UPGRADE),
    _request(b"OPTIONS", b"*"), _request(b"CONNECT", b"evil:443"), _request(b"TRACE", b"/"),
    _request(b"HEAD", b"/metrics"),
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
]


PIPELINE_PARTS = [*RAW_TEMPLATES[:3], _chat_request(), _chat_request(stream=True)]


raw_kinds = pick(["template", "pipelined", "mutated", "random"])
raw_templates = pick(RAW_TEMPLATES)
pipelines = st.lists(st.sampled_from(PIPELINE_PARTS), min_size=2, max_size=5)
raw_mutations = pick(["flip", "cut", "insert"])


@st.composite
def raw_cases(draw: st.DrawFn) -> RawCase:
    kind = draw(raw_kinds)
    match kind:
        case "template":
            data = draw(raw_templates)
        case "pipelined":
            parts = draw(pipelines)
            data = b"".join(parts) + draw(st.binary(max_size=20))
        case "mutated":
            data = bytearray(draw(raw_templates))
            for _ in range(draw(st.integers(1, 4))):
                at = draw(st.integers(0, max(0, len(data) - 1)))
                match draw(raw_mutations):
                    case "flip" if data:
                        data[at] = draw(st.integers(0, 255))
                    case "cut":
                        del data[at:]
                    case _:
                        data[at:at] = draw(st.binary(min_size=1, max_size=8))
            data = bytes(data)
        case _:
            data = draw(st.binary(max_size=300))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = tuple(data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True))
    return RawCase(tuple(compact(p) for p in pieces if p) or (b"",), draw(st.booleans()), draw(st.booleans()))


# =============================================================================
# ASGI driver
# =============================================================================


@attrs.define
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def asgi_request(app: Any, case: HttpCase, *, pieces: int = 1) -> Reply:
    """One request through an ASGI app, byte for byte (like harness.asgi_call, raw headers).

    An exception the app raises propagates: a real server would turn it into a 500.
    """
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": case.method, "scheme": "http", "path": case.path,
        "raw_path": case.raw_path if case.raw_path is not None else to_bytes(case.path),
        "query_string": case.query, "root_path": "", "client": case.client,
        "server": ("127.0.0.1", 8000), "extensions": {},
        "headers": [*case.headers, (b"content-length", str(len(case.body)).encode())],
    }
    size = max(1, -(-len(case.body) // max(1, pieces)))
    chunks = [case.body[i:i + size] for i in range(0, len(case.body), size)] or [b""]
    reply = Reply(0, [], b"")
    gone = trio.Event()

    async def receive() -> dict[str, Any]:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")
        await trio.lowlevel.checkpoint()

    try:
        await app(scope, receive, send)
    finally:
        gone.set()
    return reply


def post(path: str, body: Any, *, key: str = API_KEY) -> HttpCase:
    data = body if isinstance(body, bytes) else to_bytes(dumps(body))
    return HttpCase("POST", path, headers=((b"authorization", b"Bearer " + key.encode()),
                                           (b"content-type", b"application/json")), body=data)


def get(path: str, *, key: str = API_KEY) -> HttpCase:
    return HttpCase("GET", path, headers=((b"authorization", b"Bearer " + key.encode()),))


CANARY = post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": False})


def canary_problem(reply: Reply) -> str | None:
    """Why ``reply`` is not a successful normal chat completion, or None."""
    try:
        content = json.loads(reply.body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        content = None
    if reply.status == 200 and isinstance(content, str) and content:
        return None
    return f"the next normal chat completion failed: {reply.status} {reply.body[:300]!r}"


# =============================================================================
# A provider driven by hand
# =============================================================================


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _sign(key: nacl.signing.SigningKey, nonce: Any, timestamp: Any, public_key: str) -> str:
    # Newer protocol versions bind the challenge to the provider's public key too.
    if len(inspect.signature(sign_challenge).parameters) >= 4:
        return sign_challenge(key, nonce, timestamp, public_key)  # type: ignore[call-arg]
    return sign_challenge(key, nonce, timestamp)


def _prove(key: nacl.public.PrivateKey, nonce: Any, challenge_key: Any) -> str | None:
    # Newer protocol versions ask for proof of the X25519 key too (a challenge "key").
    prove = getattr(crypto, "prove_key", None)
    if prove is None or not isinstance(challenge_key, str) or not isinstance(nonce, str):
        return None
    proof: str = prove(key, nonce, challenge_key)
    return proof


@attrs.define(eq=False)
class Incoming:
    request_id: str
    body: dict[str, Any]
    sealer: Any


@attrs.define(eq=False)
class Puppet:
    """A provider whose every frame the example chooses. It answers challenges as told
    (``answer``) and, when ``serve`` is set, serves requests with a healthy transcript."""

    answer: str = "sign"
    serve: bool = False
    key: nacl.public.PrivateKey = attrs.field(factory=nacl.public.PrivateKey.generate)
    signing: nacl.signing.SigningKey = attrs.field(factory=nacl.signing.SigningKey.generate)
    ws: trio_websocket.WebSocketConnection | None = None
    scope: trio.CancelScope | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)
    close_code: int | None = None
    requests: list[Incoming] = attrs.field(factory=list)
    arrived: trio.Event = attrs.field(factory=trio.Event)

    @property
    def public_key(self) -> str:
        return _b64(bytes(self.key.public_key))

    def resolve(self, value: Any) -> Any:
        """Fill a placeholder outside any request (scenarios with one in flight add theirs)."""
        match value:
            case Key("public"):
                return self.public_key
            case Key(_):
                return _b64(bytes(self.signing.verify_key))
            case Rid(_):
                return "no-such-request.1"
            case Sealed(plaintext):
                return self.seal(None, plaintext)
        raise TypeError(f"cannot resolve {value!r}")

    async def send(self, data: str | bytes) -> None:
        if self.ws is not None:
            with contextlib.suppress(trio_websocket.ConnectionClosed, trio.BrokenResourceError,
                                     trio.ClosedResourceError):
                await self.ws.send_message(data)

    async def close(self) -> None:
        if self.ws is not None:
            with trio.move_on_after(5):
                await self.ws.aclose()

    async def read(self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery) -> None:
        """Answer the coordinator until the socket closes."""
        while True:
            try:
                raw = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self.close_code = exc.reason.code if exc.reason else None
                self.closed.set()
                return
            try:
                frame = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            match frame.get("type") if isinstance(frame, dict) else None:
                case "attestation_challenge":
                    nursery.start_soon(self._answer, frame)
                case "inference_request":
                    incoming = self._open(frame)
                    self.requests.append(incoming)
                    self.arrived.set()
                    self.arrived = trio.Event()
                    if self.serve:
                        nursery.start_soon(self._serve, incoming)

    async def _answer(self, challenge: dict[str, Any]) -> None:
        nonce, timestamp = challenge["nonce"], challenge["timestamp"]
        signature = _sign(self.signing, nonce, timestamp, self.public_key)
        proof = _prove(self.key, nonce, challenge.get("key"))
        match self.answer:
            case "silent":
                return
            case "junk":
                signature = _b64(b"\0" * 64)
            case "other_key":
                signature = _sign(nacl.signing.SigningKey.generate(), nonce, timestamp, self.public_key)
            case "wrong_nonce":
                nonce = "0" * 32
            case "hostile":
                nonce, signature = "é" * 33, "\ud800"
        answer = {"type": "attestation_response", "nonce": nonce, "signature": signature}
        if proof is not None:
            answer["key_proof"] = proof
        await self.send(dumps(answer))

    def _open(self, frame: dict[str, Any]) -> Incoming:
        sealed = frame["encrypted_body"]
        try:
            body, sealer = open_request(self.key, EncryptedPayload(
                sealed["ephemeral_public_key"], sealed["ciphertext"]))
            return Incoming(frame["request_id"], json.loads(body), sealer)
        except (ValueError, RecursionError, KeyError, TypeError):
            return Incoming(str(frame.get("request_id")), {}, None)

    def seal(self, incoming: Incoming | None, plaintext: Any) -> dict[str, Any]:
        text = plaintext if isinstance(plaintext, str) else dumps(plaintext)
        if incoming is None or incoming.sealer is None:
            return {"ephemeral_public_key": self.public_key, "ciphertext": _b64(b"\0" * 40)}
        try:
            payload = incoming.sealer.seal(text)
        except UnicodeEncodeError:  # lone surrogates: seal the bytes as they are
            box = incoming.sealer._box
            sealed = _b64(bytes(box.encrypt(to_bytes(text))))
            return {"ephemeral_public_key": self.public_key, "ciphertext": sealed}
        return {"ephemeral_public_key": payload.ephemeral_public_key, "ciphertext": payload.ciphertext}

    async def chunk(self, incoming: Incoming, text: str) -> None:
        await self.send(dumps({"type": "inference_response_chunk", "request_id": incoming.request_id,
                               "encrypted_data": self.seal(incoming, text)}))

    async def complete(self, incoming: Incoming) -> None:
        await self.send(dumps({"type": "inference_complete", "request_id": incoming.request_id,
                               "usage": {"prompt_tokens": 3, "completion_tokens": 2}}))

    async def _serve(self, incoming: Incoming) -> None:
        if incoming.sealer is None:
            await self.send(dumps({"type": "inference_error", "request_id": incoming.request_id,
                                   "error": "request did not decrypt", "status_code": 400}))
            return
        for text in healthy_events(incoming):
            await self.chunk(incoming, text)
        await self.complete(incoming)

    async def next_request(self, budget: float = 60.0) -> Incoming | None:
        with trio.move_on_after(budget):
            while not self.requests:
                await self.arrived.wait()
            return self.requests.pop(0)
        return None


def _script(incoming: Incoming) -> Any:
    body = incoming.body
    words = words_for("fz", "puppet", 3)
    return transcript(str(body.get("endpoint", CHAT)), body, words, incoming.request_id)


def healthy_events(incoming: Incoming) -> list[str]:
    script = _script(incoming)
    return [*script.preamble, *script.content, *script.closing]


def content_event(incoming: Incoming) -> str:
    return str(_script(incoming).content[0])


# =============================================================================
# Invariants
# =============================================================================


class Violation(AssertionError):
    """An example broke an invariant; ``__context__`` is the underlying exception, if any."""


class LogCatcher(logging.Handler):
    """Keeps ERROR records and records with a traceback (works inside Hypothesis, unlike caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._saved: list[tuple[logging.Logger, int, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        out, self.records = self.records, []
        return out

    def attach(self, name: str) -> None:
        logger = logging.getLogger(name)
        self._saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)

    def isolate(self, name: str) -> None:
        """Keep ``name``'s records from piling up in pytest's capture over 100,000 examples.

        pytest attaches its handlers to non-propagating loggers when a test phase
        *starts*, so this is called once the test is running (at its first example).
        """
        logger = logging.getLogger(name)
        if logger.propagate and any(saved is logger for saved, _, _ in self._saved):
            logger.propagate = False

    def detach(self) -> None:
        for logger, level, propagate in reversed(self._saved):
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate
        self._saved.clear()


_FORMAT = logging.Formatter("%(levelname)s %(name)s: %(message)s")


@attrs.define
class Seen:
    """One HTTP exchange of an example, for the status and body-shape checks."""

    label: str
    path: str
    method: str
    reply: Reply


def reply_problems(seen: Seen) -> list[str]:
    reply, label = seen.reply, seen.label
    if reply.status == 0:
        return [f"{label}: no response was sent"]
    problems = []
    if reply.status >= 500 and reply.status not in PROVIDER_STATUSES:
        problems.append(f"{label}: status {reply.status}: {reply.body[:300]!r}")
    if reply.status >= 400 and seen.method not in ("HEAD", "RAW"):
        try:
            body = json.loads(reply.body)
        except ValueError:
            body = None
        if seen.path == MESSAGES:
            error = body.get("error") if isinstance(body, dict) else None
            ok = (isinstance(body, dict) and body.get("type") == "error" and isinstance(error, dict)
                  and isinstance(error.get("message"), str) and isinstance(error.get("type"), str))
            shape = 'Anthropic {"type": "error", "error": {...}}'
        else:
            ok = (isinstance(body, dict) and isinstance(body.get("error"), dict)
                  and isinstance(body["error"].get("message"), str))
            shape = 'OpenAI {"error": {...}}'
        if not ok:
            problems.append(f"{label}: {reply.status} body is not the {shape} shape: {reply.body[:300]!r}")
    return problems


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _real(exc: BaseException) -> list[BaseException]:
    return [leaf for leaf in _leaves(exc) if not isinstance(leaf, trio.Cancelled)]


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


@attrs.define
class Report:
    """What one example did, and everything it broke."""

    seen: list[Seen] = attrs.field(factory=list)
    crash: BaseException | None = None  # escaped the world: the coordinator is down
    error: BaseException | None = None  # escaped the example (an ASGI app exception, a hang)
    edge_errors: list[BaseException] = attrs.field(factory=list)  # escaped edge/peer handle
    logs: list[logging.LogRecord] = attrs.field(factory=list)
    canary: str | None = None
    quiescence: str | None = None
    extra: list[str] = attrs.field(factory=list)
    virtual: float = 0.0

    def problems(self) -> tuple[list[str], BaseException | None]:
        """Human-readable violations, and the exception that explains the first one."""
        out: list[str] = []
        causes: list[BaseException] = []
        if self.crash is not None:
            leaves = _real(self.crash)
            causes += leaves
            out += [f"the coordinator crashed (an exception escaped its nursery):\n{_trace(e)}"
                    for e in leaves]
        if self.error is not None:
            causes += _real(self.error)
            what = ("hung past the example budget" if isinstance(self.error, trio.TooSlowError)
                    else "raised")
            out.append(f"the example {what}:\n{_trace(self.error)}")
        for exc in self.edge_errors:
            causes += _real(exc)
            out.append("an exception escaped a connection handler (ProviderEdge.handle or "
                       f"PeerServer.handle: it would end its server and the process):\n{_trace(exc)}")
        for record in self.logs:
            if record.exc_info and record.exc_info[1] is not None:
                causes.append(record.exc_info[1])
            out.append(f"logged: {_FORMAT.format(record)}")
        for seen in self.seen:
            out += reply_problems(seen)
        out += self.extra
        if self.canary:
            out.append(self.canary)
        if self.quiescence:
            out.append(self.quiescence)
        return out, (causes[0] if causes else None)


def origin(exc: BaseException | None, problem: str) -> str:
    """A short key for 'the same bug': where the underlying exception was raised."""
    if exc is None:
        return problem.split(":")[0][:80]
    exc = (_real(exc) or [exc])[0]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
    return f"{type(exc).__name__} at {where}"


# =============================================================================
# Worlds
# =============================================================================


async def snapshot_view(registry: Any) -> dict[str, Any]:
    """The registry's snapshot as its documented JSON shape (a dict, or an object with as_json)."""
    snapshot = await registry.snapshot()
    if isinstance(snapshot, dict):
        return snapshot
    as_json = getattr(snapshot, "as_json", None)
    return as_json() if callable(as_json) else attrs.asdict(snapshot)


async def provider_ids(registry: Any) -> set[str]:
    # The actor's table read directly: a snapshot is a message, and every message handled
    # fires the registry's "changed" event (waiting on it after a snapshot would spin).
    table = getattr(getattr(registry, "state", None), "providers", None)
    if isinstance(table, dict):
        return set(table)
    return {p["id"] for p in (await snapshot_view(registry))["providers"]}


def leftovers(view: dict[str, Any]) -> str | None:
    if view["leases"] or view["queue_depth"]:
        return f"not quiescent: {view['leases']} lease(s), {view['queue_depth']} queued entry(ies) left"
    return None


def _changed(registry: Any) -> trio.Event | None:
    """The registry's "the table changed" event, wherever this version keeps it."""
    for holder in (registry, getattr(registry, "state", None)):
        event = getattr(holder, "changed", None)
        if isinstance(event, trio.Event):
            return event
    return None


async def wait_providers(registry: Any, predicate: Callable[[set[str]], bool], budget: float) -> bool:
    """Wait until the registered provider ids satisfy ``predicate``; False after ``budget`` s."""
    direct = isinstance(getattr(getattr(registry, "state", None), "providers", None), dict)
    with trio.move_on_after(budget):
        while True:
            changed = _changed(registry) if direct else None
            if predicate(await provider_ids(registry)):
                return True
            if changed is not None:
                await changed.wait()
            else:
                await trio.sleep(0.05)
    return False


@attrs.define(eq=False)
class InProcess:
    """The in-process harness (tests/harness.py) with a healthy simulated provider ``p``
    (models m1 and v1) and, for the post-admission target, a puppet serving ``fz``."""

    h: Any
    sim: SimProvider
    edge_errors: list[BaseException] = attrs.field(factory=list)
    puppet: Puppet | None = None
    last_puppet_rid: str | None = None
    # The puppet reconnects with the same keys, as a real provider would (identity is pinned).
    puppet_key: nacl.public.PrivateKey = attrs.field(factory=nacl.public.PrivateKey.generate)
    puppet_signing: nacl.signing.SigningKey = attrs.field(factory=nacl.signing.SigningKey.generate)

    @property
    def app(self) -> Any:
        return self.h.coordinator.asgi

    async def request(self, case: HttpCase, label: str, *, pieces: int = 1) -> Seen:
        return Seen(label, case.path, case.method, await asgi_request(self.app, case, pieces=pieces))

    async def connect(self, puppet: Puppet) -> None:
        """Open a socket to the real edge for ``puppet`` (in the harness's nursery)."""
        await self.h.nursery.start(self._connection, puppet)

    async def _connection(self, puppet: Puppet, *, task_status: trio.TaskStatus[None]) -> None:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        with trio.CancelScope() as scope:
            puppet.scope = scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._edge, nursery, server_stream)
                puppet.ws = await trio_websocket.wrap_client_stream(
                    nursery, client_stream, "coordinator", "/")
                task_status.started()
                await puppet.read(puppet.ws, nursery)
                # The socket is closing: its reader task and the edge end by themselves once
                # the close handshake is done (which a concurrent aclose() waits for).
                nursery.cancel_scope.deadline = trio.current_time() + 10
        puppet.closed.set()

    async def _edge(self, nursery: trio.Nursery, stream: trio.abc.Stream) -> None:
        """The harness's edge (the real ProviderEdge.handle, wrapped as serve() wraps it)."""
        try:
            await self.h._serve_edge(nursery, stream)
        except BaseException as exc:  # recorded: in production it would end serve_websocket
            if _real(exc):
                self.edge_errors.append(exc)
            else:
                raise

    async def provider_ids(self) -> set[str]:
        return await provider_ids(self.h.registry)

    async def wait_providers(self, predicate: Callable[[set[str]], bool], budget: float = 30.0) -> bool:
        """Wait (virtual time) until the registered ids satisfy ``predicate``."""
        return await wait_providers(self.h.registry, predicate, budget)

    async def ensure_puppet(self) -> Puppet:
        """The post-admission puppet, connected and registered (reconnected if it was closed)."""
        if self.puppet is not None and not self.puppet.closed.is_set():
            return self.puppet
        puppet = Puppet(answer="sign", key=self.puppet_key, signing=self.puppet_signing)
        await self.connect(puppet)
        await puppet.send(dumps(valid_register([{"id": PUPPET_MODEL}], "puppet"), puppet.resolve))
        if not await self.wait_providers(lambda ids: "puppet" in ids):
            raise RuntimeError("the puppet provider was not admitted")
        self.puppet = puppet
        return puppet

    async def canary(self) -> str | None:
        return canary_problem(await asgi_request(self.app, CANARY))

    async def quiescence(self) -> str | None:
        try:
            await self.h.assert_quiescent()
        except AssertionError as exc:
            return f"not quiescent (a lease, queued entry, provider stream or racer leaked): {exc!r}"
        except (AttributeError, TypeError, KeyError):  # harness internals changed: the public view
            return leftovers(await snapshot_view(self.h.registry))
        return None

    def take_errors(self) -> list[BaseException]:
        out, self.edge_errors = self.edge_errors, []
        return out

    def forget_records(self) -> None:
        """Between examples: the simulated provider's records (kept for tests) would
        otherwise grow for the whole campaign, and scanning them slow every example."""
        self.sim.received.clear()
        self.sim.log.clear()


def in_process(*, sim_behaviour: Behaviour = HEALTHY, puppet: bool = False,
               **config: Any) -> Callable[[LogCatcher], Any]:
    @asynccontextmanager
    async def open_world(_: LogCatcher) -> AsyncIterator[InProcess]:
        async with open_harness(**{**FUZZ_CONFIG, **config}) as h:
            sim = await h.add_provider(SIM_ID, model(MODEL), model(VISION_MODEL, is_vision=True),
                                       behaviour=sim_behaviour)
            world = InProcess(h, sim)
            if puppet:
                await world.ensure_puppet()
            yield world

    return open_world


@attrs.define(eq=False)
class Live:
    """A real coordinator on loopback sockets (hypercorn and trio-websocket) with one provider."""

    running: Any
    host: str
    port: int
    sim: SimProvider

    def take_errors(self) -> list[BaseException]:
        return []

    def forget_records(self) -> None:
        """Between examples, as in-process (:meth:`InProcess.forget_records`)."""
        self.sim.received.clear()
        self.sim.log.clear()

    async def canary(self) -> str | None:
        problem, ending = await self._one_canary()
        if problem is None:
            return None
        # Still a violation; a second try tells a wedged server from a stalled machine.
        start = trio.current_time()
        again, again_ending = await self._one_canary()
        verdict = "failed too" if again else "succeeded"
        return (f"{problem} (that exchange ended: {ending}; a second canary {verdict} "
                f"in {trio.current_time() - start:.2f}s, ending: {again_ending})")

    async def _one_canary(self) -> tuple[str | None, str]:
        body = json.dumps(CANARY_BODY).encode()
        head = (AUTH, b"Content-Type: application/json", b"Connection: close",
                b"Content-Length: %d" % len(body))
        data = _request(b"POST", CHAT.encode(), head, body)
        answer = await raw_exchange(self.host, self.port, RawCase((data,)), idle=5.0, budget=10.0,
                                    complete=_complete_response)
        head, _, payload = answer.data.partition(b"\r\n\r\n")
        status = _statuses(head)
        return canary_problem(Reply(status[0] if status else 0, [], payload)), answer.ending

    async def quiescence(self) -> str | None:
        problem = None
        for _ in range(300):  # requests of a reset connection may still be unwinding
            problem = leftovers(await snapshot_view(self.running.registry))
            if problem is None:
                return None
            await trio.sleep(0.01)
        return problem


CANARY_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": False}


def live_server(**config: Any) -> Callable[[LogCatcher], Any]:
    @asynccontextmanager
    async def open_world(catcher: LogCatcher) -> AsyncIterator[Live]:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(serve, make_config(http_port=0, provider_port=0, **config))
            # hypercorn replaces this logger's handlers when it starts: catch its errors now.
            catcher.attach("hypercorn.error")
            sim = SimProvider(SIM_ID, (model(),), token=TOKEN)
            nursery.start_soon(sim.run, running.provider_url)
            if not await wait_providers(running.registry, lambda ids: SIM_ID in ids, 60):
                raise RuntimeError("the simulated provider did not register")
            host, port = running.http_url.removeprefix("http://").rsplit(":", 1)
            try:
                yield Live(running, host, int(port), sim)
            finally:
                nursery.cancel_scope.cancel()

    return open_world


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


def _statuses(data: bytes) -> list[int]:
    return [int(m) for m in _STATUS.findall(data)]


def _complete_response(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    return bool(sep) and length is not None and len(body) >= int(length.group(1))


@attrs.frozen
class Exchange:
    data: bytes
    ending: str  # how the exchange ended, for a canary that got nothing


async def raw_exchange(host: str, port: int, case: RawCase, *, idle: float = 0.1, budget: float = 2.0,
                       complete: Callable[[bytes], bool] | None = None) -> Exchange:
    """Write ``case`` to a fresh connection; return what came back before EOF or ``idle`` silence."""
    sock = trio.socket.socket()
    received = bytearray()
    ending = "not read"
    try:
        with trio.fail_after(5):
            await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        for piece in case.pieces:
            try:
                with trio.fail_after(2):
                    await stream.send_all(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                ending = f"send failed: {exc!r}"
                break
        if case.read and not case.reset:
            ending = f"no answer within {budget:g}s"
            with trio.move_on_after(budget):
                while True:
                    with trio.move_on_after(idle) as quiet:
                        data = await stream.receive_some(65536)
                    if quiet.cancelled_caught or not data:
                        ending = f"{idle:g}s silent" if quiet.cancelled_caught else "EOF"
                        break
                    received += data
                    if complete is not None and complete(bytes(received)):
                        ending = "complete"
                        break
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        ending = f"{exc!r}"
    finally:
        if case.reset:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return Exchange(bytes(received), ending)


# =============================================================================
# The campaign: one world in a Trio thread, examples from Hypothesis
# =============================================================================


@attrs.define(eq=False)
class _Job:
    scenario: Scenario
    report: Report = attrs.field(factory=Report)
    done: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class _Host:
    jobs: trio.MemorySendChannel[_Job]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    finished: trio.Event = attrs.field(factory=trio.Event)
    current: _Job | None = None


@attrs.define(eq=False)
class Stats:
    examples: int = 0
    violations: int = 0
    worlds: int = 0
    abandoned: int = 0
    statuses: Counter[int] = attrs.field(factory=Counter)
    virtual: float = 0.0
    started: float = attrs.field(factory=time.perf_counter)


@attrs.define(eq=False, repr=False)
class Campaign:
    """Runs examples against a long-lived world; see the module docstring."""

    name: str
    open_world: Callable[[LogCatcher], Any]
    virtual_time: bool = True
    survey: bool = SURVEY
    logs: LogCatcher = attrs.field(factory=LogCatcher)
    stats: Stats = attrs.field(factory=Stats)
    found: dict[str, tuple[int, str, str]] = attrs.field(factory=dict)  # origin -> (size, example, message)
    _clock: trio.testing.MockClock | None = None
    _token: trio.lowlevel.TrioToken | None = None
    _nursery: trio.Nursery | None = None
    _host: _Host | None = None
    _fresh: bool = False  # after a failure: a new world for every example
    _dirty: bool = False  # the world saw a violation: replace it before the next example
    _stop: trio.Event | None = None
    _thread: threading.Thread | None = None
    _failure: BaseException | None = None
    _orphan: BaseException | None = None  # a world that died between examples
    _generation: int = 0  # bumped when a hung example is abandoned: it must not touch the clock

    def __repr__(self) -> str:
        return f"Campaign({self.name!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' report
        printer.text(repr(self))

    # -- lifecycle (test thread)
    @contextlib.contextmanager
    def running(self) -> Iterator[Campaign]:
        ready = threading.Event()
        self.logs.attach("coordinator")
        self._clock = trio.testing.MockClock() if self.virtual_time else None

        def run() -> None:
            try:
                trio.run(self._main, ready, clock=self._clock)
            except BaseException as exc:  # reported by the test thread
                self._failure = exc
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name=f"fuzz-{self.name}", daemon=True)
        self._thread.start()
        ready.wait()
        # A run stopped with SIGTERM (``nox -s fuzz`` interrupted, a kill) still says
        # how far it got: the signal ends the test like Ctrl-C, and teardown reports.
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            if self._failure is not None:
                raise self._failure
            yield self
        finally:
            if self._token is not None and self._stop is not None:
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(5 if self.stats.abandoned else 60)  # an abandoned world may never end
            self.logs.detach()
            self._summary()
            signal.signal(signal.SIGTERM, previous)
        if self._failure is not None:
            raise self._failure
        if self.found:
            raise AssertionError(self.survey_text())

    async def _main(self, ready: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            ready.set()
            await self._stop.wait()
            if self._clock is not None:
                self._clock.autojump_threshold = 0  # shutdown waits (virtual) time out
            nursery.cancel_scope.cancel()

    # -- one example (test thread)
    def example(self, scenario: Scenario, describe: str) -> None:
        """Run ``scenario(world)`` and check every invariant; raise :class:`Violation` if one broke."""
        self.logs.isolate("coordinator")
        if TRACE:  # the last line names the example a hang is stuck in
            with open(TRACE, "a", encoding="utf-8") as trace:
                print(f"{self.name}: {describe[:3000]}", file=trace, flush=True)
        report = self._run_example(scenario)
        self.stats.examples += 1
        if self.stats.examples % PROGRESS_EVERY == 0:  # a long run says how far it is
            print(f"[fuzz] {self.name}: {self.stats.examples} examples so far, "
                  f"{self.stats.violations} violating, "
                  f"{time.perf_counter() - self.stats.started:.0f} s", file=sys.stderr, flush=True)
        self.stats.virtual += report.virtual
        self.stats.statuses.update(seen.reply.status for seen in report.seen)
        problems, cause = report.problems()
        if not problems:
            return
        self.stats.violations += 1
        shown = describe if len(describe) < 3000 else describe[:3000] + f"... ({len(describe)} chars)"
        message = f"{len(problems)} invariant(s) broken by {shown}:\n- " + "\n- ".join(problems)
        if self.survey:
            key = origin(cause, problems[0])
            if key not in self.found or len(describe) < self.found[key][0]:
                self.found[key] = (len(describe), describe, message)
            return
        violation = Violation(message)
        violation.__context__ = cause  # distinct underlying exceptions are distinct bugs to Hypothesis
        raise violation

    def _run_example(self, scenario: Scenario) -> Report:
        """Hand the example to the Trio thread; give up on it after ``WALL_BUDGET`` seconds."""
        finished = threading.Event()
        box: list[Report | BaseException] = []

        async def run() -> None:
            try:
                box.append(await self._example(scenario))
            except BaseException as exc:  # handed to the test thread
                box.append(exc)
                if not _real(exc):
                    raise
            finally:
                finished.set()

        assert self._nursery is not None
        trio.from_thread.run_sync(self._nursery.start_soon, run, trio_token=self._token)
        if not finished.wait(WALL_BUDGET):
            trio.from_thread.run_sync(self._abandon, trio_token=self._token)
            return Report(error=TimeoutError(
                f"the example did not finish within {WALL_BUDGET:g} s of wall-clock time (a hang "
                "no virtual-time budget can end: a shielded wait?); its world was abandoned"))
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _abandon(self) -> None:
        """Leave a hung world behind (its tasks may be stuck for good) and start afresh."""
        if self._host is not None:
            self._host.scope.cancel()
        self._host = None
        self._dirty = True
        self._fresh = not self.survey
        self._generation += 1
        self.stats.abandoned += 1
        if self._clock is not None:
            self._clock.autojump_threshold = math.inf

    # -- the Trio side
    async def _example(self, scenario: Scenario) -> Report:
        generation = self._generation
        if self._clock is not None:
            self._clock.autojump_threshold = 0
        start = trio.current_time()
        try:
            job = _Job(scenario)
            for attempt in range(2):
                if self._host is None or self._host.finished.is_set() or self._fresh or self._dirty:
                    try:
                        await self._restart()
                    except BaseException as exc:  # a world that cannot even start
                        if not _real(exc):
                            raise
                        job.report.crash = exc
                        break
                assert self._host is not None
                try:
                    await self._host.jobs.send(job)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    if attempt:
                        raise
                    continue
                await job.done.wait()
                break
            report = job.report
            if self._orphan is not None and report.crash is None:
                report.crash, self._orphan = self._orphan, None
            report.virtual = trio.current_time() - start
            if report.problems()[0] and generation == self._generation:
                self._dirty = True
                self._fresh = not self.survey
            return report
        finally:
            if self._clock is not None and generation == self._generation:
                self._clock.autojump_threshold = math.inf

    async def _settle(self) -> None:
        """Let work the example started finish (or block) before judging it."""
        if self.virtual_time:
            await trio.testing.wait_all_tasks_blocked()
        else:
            await trio.sleep(0.01)

    async def _restart(self) -> None:
        if self._host is not None:
            self._host.scope.cancel()
            with trio.move_on_after(3600 if self.virtual_time else 30):
                await self._host.finished.wait()  # else it is stuck for good: leave it behind
        assert self._nursery is not None
        self._host = await self._nursery.start(self._run_host)
        self._dirty = False
        self.stats.worlds += 1

    async def _run_host(self, *, task_status: trio.TaskStatus[_Host]) -> None:
        send, receive = trio.open_memory_channel[_Job](0)
        host = _Host(send)
        started = False
        try:
            with host.scope:
                async with receive, self.open_world(self.logs) as world:
                    self.logs.take()  # start-up is not an example's
                    task_status.started(host)
                    started = True
                    async for job in receive:
                        host.current = job
                        await self._run_job(world, job)
                        host.current = None
                        job.done.set()
        except BaseException as exc:  # the world died: the current example did it
            if not started or not _real(exc):
                raise
            if host.current is not None:
                host.current.report.crash = exc
                host.current.report.logs += self.logs.take()
                host.current.done.set()
            else:  # between examples: blame the next one rather than lose it
                self._orphan = exc
        finally:
            host.finished.set()

    async def _run_job(self, world: Any, job: _Job) -> None:
        report = job.report
        self.logs.take()
        try:
            with trio.fail_after(EXAMPLE_BUDGET if self.virtual_time else 120):
                for item in await job.scenario(world):
                    if isinstance(item, Seen):
                        report.seen.append(item)
                    else:
                        report.extra.append(item)
                await self._settle()
                report.edge_errors = world.take_errors()
                report.canary = await world.canary()
                report.quiescence = await world.quiescence()
                world.forget_records()
                await self._settle()
        except Exception as exc:  # escaped the example: a violation, reported
            report.error = exc
        report.edge_errors += world.take_errors()
        report.logs += self.logs.take()
        if report.error is not None or report.canary:
            # A dying world (the registry gone, say) may be about to cancel us: let it, while
            # the crash can still be pinned on this example (hypercorn takes up to 5 s to unwind).
            await trio.sleep(3600 if self.virtual_time else 6)
            report.edge_errors += world.take_errors()
            report.logs += self.logs.take()

    # -- reporting
    def survey_text(self) -> str:
        lines = [f"{self.name}: {len(self.found)} distinct violation(s) in {self.stats.examples} examples"]
        for key, (_, _, message) in sorted(self.found.items()):
            lines.append(f"\n=== {key}\n{message}")
        return "\n".join(lines)

    def _summary(self) -> None:
        s = self.stats
        wall = time.perf_counter() - s.started
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s.statuses.items()))
        print(f"\n[fuzz] {self.name}: {s.examples} examples in {wall:.1f} s wall"
              f"{f', {s.virtual:.0f} s virtual' if self.virtual_time else ''}; {s.worlds} world(s); "
              f"{s.violations} violating{f', {s.abandoned} hung' if s.abandoned else ''}; "
              f"statuses {{{statuses}}}", file=sys.stderr)


# =============================================================================
# Scenarios: what one example does in a world
# =============================================================================


Scenario = Callable[[Any], Awaitable[list[Seen | str]]]  # exchanges seen, and problems found


def body_scenario(route: str, body: Body) -> Scenario:
    async def scenario(world: InProcess) -> list[Seen | str]:
        case = post(route, body.encode())
        return [await world.request(case, f"POST {route}", pieces=body.pieces)]

    return scenario


def head_scenario(case: HttpCase) -> Scenario:
    async def scenario(world: InProcess) -> list[Seen | str]:
        return [await world.request(case, f"{case.method} {case.path}")]

    return scenario


def admission_scenario(case: AdmissionCase) -> Scenario:
    """A fresh socket sends ``case.first``; if it is admitted, it is used, then leaves."""

    async def scenario(world: InProcess) -> list[Seen | str]:
        before = await world.provider_ids()
        puppet = Puppet(answer=case.answer, serve=True)
        await world.connect(puppet)
        await puppet.send(case.first.render(puppet.resolve))
        for frame in case.after:  # while the edge waits for the challenge's answer
            await puppet.send(frame.render(puppet.resolve))
        # Rejected sockets are closed within register_timeout + challenge_timeout.
        with trio.move_on_after(25):
            await puppet.closed.wait()
        seen: list[Seen | str] = []
        added = await world.provider_ids() - before
        register = case.first.value if isinstance(case.first.value, dict) else {}
        if added and not (case.answer == "sign" and register.get("auth_token") == TOKEN):
            seen.append(f"admitted {sorted(added)} without a valid token and signature")
        if added:
            models = register.get("models")
            ids = [m["id"] for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)][:2] \
                if isinstance(models, list) else []
            for model_id in ids:
                seen.append(await world.request(post(CHAT, {**base_body(CHAT, model_id)}),
                                                f"chat to admitted model {model_id[:40]!r}"))
            for path in GET_ROUTES:
                key = ADMIN_KEY if path in ("/status", "/v1/admin/providers") else API_KEY
                seen.append(await world.request(get(path, key=key), f"GET {path}"))
            await puppet.close()
            if not await world.wait_providers(lambda ids: not (ids - before)):
                seen.append(f"the admitted provider {sorted(added)} never left the table after closing")
        if puppet.scope is not None:
            puppet.scope.cancel()
        return seen

    return scenario


def inflight_scenario(case: InflightCase) -> Scenario:
    async def scenario(world: InProcess) -> list[Seen | str]:
        puppet = await world.ensure_puppet()
        puppet.requests.clear()
        sim = world.sim
        seen: list[Seen | str] = []
        body = base_body(case.endpoint, PUPPET_MODEL, case.stream)

        async def consume(request: HttpCase, label: str) -> None:
            seen.append(await world.request(request, label))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume, post(case.endpoint, body), f"POST {case.endpoint} to the puppet")
            received = len([e for e in sim.log if e[1] == "received"])
            if case.sim_request:
                nursery.start_soon(consume, post(CHAT, {**base_body(CHAT), "stream": True}),
                                   "streamed chat to the simulated provider")
            incoming = await puppet.next_request()
            sim_rid = "sim-unknown.1"
            if case.sim_request:
                with trio.move_on_after(30):
                    while len(news := [e for e in sim.log if e[1] == "received"]) <= received:
                        await sim.activity.wait()
                    sim_rid = news[-1][2]

            def resolve(value: Any) -> Any:
                match value:
                    case Rid("puppet"):
                        return incoming.request_id if incoming else "fz-gone.1"
                    case Rid("sim"):
                        return sim_rid
                    case Rid("stale"):
                        return world.last_puppet_rid or "fz-stale.1"
                    case Rid(_):
                        return "no-such-request.1"
                    case Sealed(plaintext):
                        return puppet.seal(incoming, plaintext)
                return puppet.resolve(value)

            if incoming is not None and case.content_first:
                await puppet.chunk(incoming, content_event(incoming))
            for target, frame in case.frames:
                data = frame.render(resolve)
                if target == "puppet":
                    await puppet.send(data)
                elif sim.current_ws is not None:
                    with contextlib.suppress(trio_websocket.ConnectionClosed):
                        await sim.current_ws.send_message(data)
            if incoming is not None:
                world.last_puppet_rid = incoming.request_id
                match case.finale:
                    case "content_complete":
                        for text in healthy_events(incoming):
                            await puppet.chunk(incoming, text)
                        await puppet.complete(incoming)
                    case "complete":
                        await puppet.complete(incoming)
                    case "error":
                        await puppet.send(dumps({"type": "inference_error", "request_id": incoming.request_id,
                                                 "error": "fuzz", "status_code": 500}))
                    case "close":
                        await puppet.close()
        if case.finale != "close" and (puppet.closed.is_set() or SIM_ID not in await world.provider_ids()):
            gone = "the puppet" if puppet.closed.is_set() else "the simulated provider"
            seen.append(f"{gone} lost its connection over hostile frames (close code {puppet.close_code}); "
                        "the edge promises to reject a bad frame and keep the connection")
        return seen

    return scenario


def raw_scenario(case: RawCase) -> Scenario:
    async def scenario(world: Live) -> list[Seen | str]:
        answer = (await raw_exchange(world.host, world.port, case)).data
        # 501/505 are the HTTP server's correct answers (unknown transfer coding, version);
        # a 500 is the application failing.
        return [Seen(f"raw HTTP answer {answer[:160]!r}", "", "RAW", Reply(status, [], b""))
                for status in _statuses(answer) if status not in (501, 505)]

    return scenario

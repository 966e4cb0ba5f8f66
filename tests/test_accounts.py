"""Named keys, limits and the ledger, black-box through the edge (docs/accounts.md).

Each test drives the coordinator's HTTP surface as a consumer and an operator would:
keys made with the admin API, requests with their secrets, the ledger read back from
``GET /v1/admin/usage``. The embedded store in memory answers inline, so these run in
virtual time; the one that reopens a file runs in real time, bounded.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
import trio

from coordinator.accounts import service
from coordinator.accounts.store import UNNAMED, StoreUnavailable
from provider_sim.behaviours import Behaviour, Fault

from .harness import ADMIN_KEY, API_KEY, MODEL, Harness, HttpResult, open_harness

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
RATE_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


async def _new_key(h: Harness, name: str, **limits: Any) -> str:
    made = await h.request("/v1/admin/keys", {"name": name, "limits": limits}, headers=ADMIN)
    assert made.status == 201, made.body
    return str(made.json()["secret"])


async def _chat(h: Harness, secret: str, *, stream: bool = False, path: str =
                "/v1/chat/completions", **extra: Any) -> HttpResult:
    body: dict[str, Any] = {"model": MODEL, "stream": stream, "max_tokens": 64,
                            "messages": [{"role": "user", "content": "hello"}], **extra}
    return await h.request(path, body, headers={"authorization": f"Bearer {secret}"})


async def _usage(h: Harness) -> dict[str, Any]:
    got = await h.request("/v1/admin/usage", method="GET", headers=ADMIN)
    assert got.status == 200, got.body
    return dict(got.json())


def _row(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(row for row in rows if row["name"] == name)


def _received(provider: Any) -> int:
    return len(provider.received)


async def test_a_key_over_its_requests_per_minute_gets_429_with_the_headers_and_nothing_goes(
        autojump_clock: Any) -> None:
    async with open_harness() as h:
        provider = await h.add_provider("a")
        secret = await _new_key(h, "team-a", requests_per_minute=2, tokens_per_minute=100_000)
        first = await _chat(h, secret)
        assert first.status == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert (await _chat(h, secret)).status == 200
        sent = _received(provider)

        over = await _chat(h, secret)
        assert over.status == 429
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        assert over.json()["error"]["type"] == "rate_limit_error"
        assert int(over.headers["retry-after"]) >= 1
        assert all(name in over.headers for name in RATE_HEADERS), over.headers
        assert over.headers["x-ratelimit-remaining-requests"] == "0"
        anthropic = await _chat(h, secret, path="/v1/messages")
        assert anthropic.status == 429
        assert anthropic.json()["type"] == "error"
        assert anthropic.json()["error"]["type"] == "rate_limit_error"
        assert _received(provider) == sent  # nothing was dispatched

        await trio.sleep(31)  # the bucket refills at the limit's pace: one request in 30 s
        assert (await _chat(h, secret)).status == 200
        other = await _chat(h, API_KEY)  # a static key is not limited, nor touched
        assert other.status == 200 and "x-ratelimit-limit-requests" not in other.headers
        await h.assert_quiescent()


async def test_a_budget_runs_out_and_is_refused(autojump_clock: Any) -> None:
    async with open_harness() as h:
        provider = await h.add_provider("a")
        secret = await _new_key(h, "trial", token_budget=300)
        spent = 0
        for _ in range(20):
            answer = await _chat(h, secret)
            if answer.status != 200:
                break
            usage = answer.json()["usage"]
            spent += usage["prompt_tokens"] + usage["completion_tokens"]
        else:
            raise AssertionError("a budget of 300 tokens never ran out")
        assert answer.status == 403
        assert answer.json()["error"]["code"] == "insufficient_quota"
        assert spent <= 300
        sent = _received(provider)
        assert (await _chat(h, secret)).status == 403
        assert _received(provider) == sent
        row = _row((await _usage(h))["by_key"], "trial")
        assert row["prompt_tokens"] + row["completion_tokens"] == spent

        # The operator raises it: the key works again, without a restart.
        raised = await h.request("/v1/admin/keys/trial", {"limits": {"token_budget": 10_000}},
                                 method="PATCH", headers=ADMIN)
        assert raised.status == 200 and raised.json()["limits"]["token_budget"] == 10_000
        assert (await _chat(h, secret)).status == 200


async def test_a_request_that_fails_over_twice_before_content_is_charged_once_for_the_winner(
        autojump_clock: Any) -> None:
    async with open_harness() as h:
        # The fastest two fail before any content; the slowest answers.
        await h.add_provider("a", behaviour=Behaviour(Fault.ERROR, status=503), decode_tps=1000)
        await h.add_provider("b", behaviour=Behaviour(Fault.ROLE_THEN_ERROR, status=500),
                             decode_tps=900)
        await h.add_provider("c", decode_tps=10)
        secret = await _new_key(h, "team-b")
        answer = await _chat(h, secret)
        assert answer.status == 200, answer.body
        assert answer.headers["x-attempts"] == "3"
        assert answer.headers["x-provider-id"] == "c"
        usage = answer.json()["usage"]

        report = await _usage(h)
        row = _row(report["by_key"], "team-b")
        assert row == {"name": "team-b", "requests": 1, "prompt_tokens": usage["prompt_tokens"],
                       "completion_tokens": usage["completion_tokens"]}
        assert [p["name"] for p in report["by_provider"]] == ["c"]
        assert h.coordinator.accounts.ledger.open == {}


async def test_a_consumer_that_leaves_mid_stream_is_charged_for_what_it_received(
        autojump_clock: Any) -> None:
    async with open_harness() as h:
        await h.add_provider("a", behaviour=Behaviour(tokens=40, token_interval=0.5))
        secret = await _new_key(h, "streamer")
        received = await _stream_then_leave(h, secret, after_content=5)
        assert received >= 5
        await h.coordinator.accounts.flush()
        row = _row((await _usage(h))["by_key"], "streamer")
        assert row["requests"] == 1
        assert row["completion_tokens"] == received  # not the 40 the provider would have sent
        assert row["prompt_tokens"] > 0
        await h.until(lambda: not h.coordinator.accounts.ledger.open)
        await h.assert_quiescent()


async def _stream_then_leave(h: Harness, secret: str, after_content: int) -> int:
    """Stream a chat, hang up after ``after_content`` content events; those received."""
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 64,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server":
        ("127.0.0.1", 8000), "extensions": {},
        "headers": [(b"authorization", f"Bearer {secret}".encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]}
    content = 0
    gone = trio.Event()
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal content
        if gone.is_set():
            raise OSError("the consumer has gone")
        if message["type"] == "http.response.body":
            for line in message.get("body", b"").decode().splitlines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    content += bool(delta.get("content"))
            if content >= after_content:
                gone.set()

    with trio.fail_after(60):
        with contextlib.suppress(OSError):  # however the edge takes a send that fails
            await h.coordinator.asgi(scope, receive, send)
    return content


async def test_admin_keys_bad_input_gets_a_clear_error_and_changes_nothing(
        autojump_clock: Any) -> None:
    async with open_harness() as h:
        await _new_key(h, "kept", requests_per_minute=5)
        cases: list[tuple[str, str, Any, int, str]] = [
            ("POST", "/v1/admin/keys", b"{not json", 400, "invalid_key"),
            ("POST", "/v1/admin/keys", [1, 2], 400, "invalid_key"),
            ("POST", "/v1/admin/keys", {"name": "bad name!"}, 400, "invalid_key"),
            ("POST", "/v1/admin/keys", {"name": "kept"}, 400, "invalid_key"),
            ("POST", "/v1/admin/keys", {"name": "x", "limits": {"requests_per_minute": 0}},
             400, "invalid_key"),
            ("POST", "/v1/admin/keys", {"name": "x", "limits": {"tokens_per_minute": 10**12}},
             400, "invalid_key"),
            ("POST", "/v1/admin/keys", {"name": "x", "limits": {"budget_window": "weekly"}},
             400, "invalid_key"),
            ("POST", "/v1/admin/keys", {"name": "x", "models": "m1"}, 400, "invalid_key"),
            ("PATCH", "/v1/admin/keys/kept", {"limits": {"requests_per_minute": -1}}, 400,
             "invalid_key"),
            ("PATCH", "/v1/admin/keys/kept", {"limits": {"requests_per_minute": True}}, 400,
             "invalid_key"),
            ("GET", "/v1/admin/keys/nobody", None, 404, "key_not_found"),
            ("DELETE", "/v1/admin/keys/nobody", None, 404, "key_not_found"),
            ("GET", "/v1/admin/usage?since=yesterday", None, 400, "invalid_value"),
            ("GET", "/v1/admin/usage?until=nan", None, 400, "invalid_value"),
        ]
        for method, path, body, status, code in cases:
            raw = body if isinstance(body, bytes) else None
            got = await h.request(path, None if raw else body, raw=raw, method=method,
                                  headers=ADMIN)
            assert got.status == status, (method, path, body, got.body)
            assert got.json()["error"]["code"] == code, (method, path, got.body)
        huge = await h.request("/v1/admin/keys", raw=b'{"name": "' + b"x" * 100_000 + b'"}',
                               headers=ADMIN)
        assert huge.status == 413, huge.body
        assert "error" in huge.json()
        no_admin = await h.request("/v1/admin/keys", {"name": "y"})
        assert no_admin.status == 401

        listed = await h.request("/v1/admin/keys", method="GET", headers=ADMIN)
        assert [k["name"] for k in listed.json()["data"]] == ["kept"]
        kept = listed.json()["data"][0]
        assert kept["limits"]["requests_per_minute"] == 5
        assert "secret" not in kept and "secret_hash" not in kept


async def test_a_revoked_key_is_refused_and_its_name_is_in_the_request_log(
        autojump_clock: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with open_harness() as h:
        await h.add_provider("a")
        secret = await _new_key(h, "leaver")
        caplog.set_level("INFO", logger="coordinator")
        assert (await _chat(h, secret)).status == 200
        logged = [json.loads(r.getMessage()) for r in caplog.records
                  if r.name == "coordinator.requests"]
        assert [line["key"] for line in logged] == ["leaver"]
        assert not any(secret in r.getMessage() for r in caplog.records)

        revoked = await h.request("/v1/admin/keys/leaver", method="DELETE", headers=ADMIN)
        assert revoked.status == 200 and revoked.json()["state"] == "revoked"
        refused = await _chat(h, secret)
        assert refused.status == 401
        assert (await _chat(h, API_KEY)).status == 200  # the static keys still work
        assert _row((await _usage(h))["by_key"], UNNAMED)["requests"] == 1


async def test_a_key_limited_to_models_may_not_use_another(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await h.add_provider("a")
        made = await h.request("/v1/admin/keys", {"name": "narrow", "models": ["other"]},
                               headers=ADMIN)
        refused = await _chat(h, made.json()["secret"])
        assert refused.status == 403
        assert refused.json()["error"]["code"] == "model_not_allowed"


async def test_the_key_database_survives_a_restart(tmp_path: Any) -> None:
    path = str(tmp_path / "keys.db")
    with trio.fail_after(30):
        async with open_harness(keys_db=path) as h:
            await h.add_provider("a")
            secret = await _new_key(h, "durable", token_budget=100_000, requests_per_minute=50)
            answer = await _chat(h, secret)
            assert answer.status == 200
            usage = answer.json()["usage"]
            charged = usage["prompt_tokens"] + usage["completion_tokens"]
            await _new_key(h, "revoked-one")
            assert (await h.request("/v1/admin/keys/revoked-one", method="DELETE",
                                    headers=ADMIN)).status == 200
            await h.coordinator.accounts.flush()

        async with open_harness(keys_db=path) as h:
            await h.add_provider("a")
            again = await _chat(h, secret)
            assert again.status == 200
            # The budget's use came back from the ledger: what was left, counted down.
            used = charged + sum(again.json()["usage"][k] for k in ("prompt_tokens",
                                                                    "completion_tokens"))
            row = _row((await _usage(h))["by_key"], "durable")
            assert row["requests"] == 2
            assert row["prompt_tokens"] + row["completion_tokens"] == used
            listed = await h.request("/v1/admin/keys/revoked-one", method="GET", headers=ADMIN)
            assert listed.json()["state"] == "revoked"
            assert h.coordinator.accounts.limiter.uses["durable"].budget_used == used


async def test_the_status_page_has_a_row_per_key_and_never_a_secret(autojump_clock: Any) -> None:
    async with open_harness() as h:
        await h.add_provider("a")
        busy = await _new_key(h, "busy", requests_per_minute=1)
        assert (await _chat(h, busy)).status == 200
        assert (await _chat(h, busy)).status == 429
        assert (await _chat(h, API_KEY)).status == 200
        page = await h.request("/status", method="GET", headers=ADMIN)
        assert page.status == 200
        html = page.body.decode()
        keys_table = html[html.index('<table id="keys">'):]
        keys_table = keys_table[:keys_table.index("</table>")]
        rows = keys_table.split("<tr>")[2:]  # the head, then a row a key
        assert len(rows) == 2, rows
        assert "<td>busy</td><td>active</td><td>requests per minute 1</td><td>0</td><td>1</td>" \
            '<td class="warn">1</td>' in rows[0] + rows[1]
        assert "<td>(unnamed)</td><td>static</td><td>unlimited</td><td>0</td><td>1</td>" in \
            rows[0] + rows[1]
        assert busy not in html


async def _until(accounts: Any, predicate: Any) -> None:
    with trio.fail_after(60):
        while not predicate():
            await accounts.progressed()


class _FlakyStore:
    """The embedded store, failing while ``broken`` (a disk gone, a lock held)."""

    def __init__(self, store: Any) -> None:
        self.store, self.broken = store, False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        async def call(*args: Any) -> Any:
            if self.broken:
                raise StoreUnavailable("disk I/O error")
            return await method(*args)
        return call


async def test_a_store_failing_while_serving_fails_closed_loses_nothing_and_recovers(
        autojump_clock: Any) -> None:
    async with open_harness() as h:
        await h.add_provider("a")
        accounts = h.coordinator.accounts
        secret = await _new_key(h, "steady")
        flaky = accounts.store = _FlakyStore(accounts.store)
        flaky.broken = True
        assert (await _chat(h, secret)).status == 200  # admitted before the store failed
        await _until(accounts, lambda: accounts.failing is not None)
        refused = await _chat(h, secret)
        assert refused.status == 503
        assert refused.json()["error"]["code"] == "accounts_unavailable"
        assert "disk I/O error" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "5"
        usage = await h.request("/v1/admin/usage", method="GET", headers=ADMIN)
        assert usage.status == 503
        # A shared key has no limit or revocation to miss: served, its charge kept.
        assert (await _chat(h, API_KEY)).status == 200

        flaky.broken = False
        await _until(accounts, lambda: accounts.failing is None)
        assert (await _chat(h, secret)).status == 200
        usage_now = await _usage(h)
        assert _row(usage_now["by_key"], "steady")["requests"] == 2  # one closed while down
        assert _row(usage_now["by_key"], "(unnamed)")["requests"] == 1


async def test_shared_keys_go_on_while_the_store_fails_until_their_charges_would_not_fit(
        autojump_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "OUTBOX", 3)
    async with open_harness() as h:
        provider = await h.add_provider("a")
        accounts = h.coordinator.accounts
        flaky = accounts.store = _FlakyStore(accounts.store)
        flaky.broken = True
        assert (await _chat(h, API_KEY)).status == 200
        await _until(accounts, lambda: accounts.failing is not None)
        assert [(await _chat(h, API_KEY)).status for _ in range(3)] == [200, 200, 503]
        assert _received(provider) == 3  # the refused one went nowhere
        flaky.broken = False
        await _until(accounts, lambda: accounts.failing is None)
        assert _row((await _usage(h))["by_key"], "(unnamed)")["requests"] == 3  # none lost

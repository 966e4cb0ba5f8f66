"""The status page, its sign-in, structured logs, and the page in a real headless browser.

Pages are read with the standard library's HTML parser (:class:`Page`): each check
looks at the element it names — a table cell, a form field — never at a substring
that might be anywhere (``"left" in page`` held through the CSS ``text-align:left``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from coordinator.api.status import PENALTY_SHOWN_FROM, group_failovers, render_status
from coordinator.dispatch.race import Failure
from provider_sim.behaviours import Behaviour, Fault

from .harness import ADMIN_KEY, MODEL, HttpResult, asgi_call, model, open_harness
from .live import live_coordinator

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
BROWSER = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
FORM = {"content-type": "application/x-www-form-urlencoded", **BROWSER}


class Page(HTMLParser):
    """An HTML page as the checks need it: each table's rows of cell texts (by the
    table's id), the text of each element with an id, the forms and their inputs, and
    the meta tags."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.text_of: dict[str, str] = {}
        self.forms: list[dict[str, Any]] = []
        self.metas: list[dict[str, str | None]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of open elements
        self._ids: dict[str, list[str]] = {}
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "meta":
            self.metas.append(a)
            return
        if tag in ("input", "br"):
            if tag == "input" and self.forms:
                self.forms[-1]["inputs"].append(a)
            return
        self._open.append((tag, a.get("id")))
        if a.get("id"):
            self._ids[str(a["id"])] = []
        if tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "form":
            self.forms.append({**a, "inputs": []})

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, element_id = self._open.pop()
            if element_id is not None:
                self.text_of[element_id] = " ".join("".join(self._ids.pop(element_id)).split())
            if open_tag == tag:
                break
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for parts in self._ids.values():
            parts.append(data)

    def rows(self, table: str) -> dict[str, dict[str, str]]:
        """A table's data rows by their first cell, each a mapping header -> cell text."""
        header, *body = self.tables[table]
        return {row[0]: dict(zip(header, row, strict=True)) for row in body}


async def test_status_page_shows_fleet_cooldowns_errors_and_grouped_failovers(autojump_clock):
    async with open_harness(speculative_backup=False) as h:
        await h.add_provider("sick", model(template_render_ok=True), version="0.6.4",
                             behaviour=Behaviour(Fault.ROLE_THEN_ERROR), decode_tps=1000)
        await h.add_provider("well", version="0.7.0", decode_tps=10)
        for _ in range(2):
            assert (await h.chat()).status == 200
        result = await h.request("/status", method="GET", headers=ADMIN)
        assert result.status == 200 and result.headers["cache-control"] == "no-store"
        page = Page(result.body.decode())
        assert {"http-equiv": "refresh", "content": "2"} in page.metas
        providers = page.rows("providers")
        assert set(providers) == {"sick", "well"}
        sick, well = providers["sick"], providers["well"]
        assert sick["version"] == "0.6.4" and well["version"] == "0.7.0"
        assert re.fullmatch(r"m1/base: \d+s left", sick["cooldowns"]), sick  # time left
        assert well["cooldowns"] == "none"
        assert sick["models"].startswith("m1: template ok;")
        assert well["models"].startswith("m1: template not checked;")
        assert sick["errors"] == "2 of last 2 (100 %)"
        assert well["errors"] == "0 of last 2 (0 %)" and well["served"] == "2"
        # The two failovers of sick are one row, with their count and time span.
        header, *failovers = page.tables["failovers"]
        assert len(failovers) == 1
        row = dict(zip(header, failovers[0], strict=True))
        assert (row["count"], row["provider"], row["version"], row["status"], row["error"]) \
            == ("2", "sick", "0.6.4", "500", "simulated provider failure")
        assert re.fullmatch(r"[\d.]+ to [\d.]+ s ago", row["when"]), row
        assert page.text_of["queue-depth"] == "0" and page.text_of["cluster"] == "solo"
        assert "lost-race penalty" in page.text_of["legend"]
        assert not page.forms  # signed in by header: no session, no sign-out


async def test_a_lost_race_penalty_shows_only_where_there_is_one(autojump_clock):
    async with open_harness() as h:
        # "slow" looks fast, so it is the primary; it says nothing for 10 s, "quick"
        # (the backup, at the hedge point) answers first: slow lost the race.
        await h.add_provider("slow", behaviour=Behaviour(first_token_delay=10.0),
                             decode_tps=1000)
        await h.add_provider("quick", decode_tps=10)
        result = await h.chat()
        assert result.headers["x-provider-id"] == "quick"
        page = Page((await h.request("/status", method="GET", headers=ADMIN)).body.decode())
        providers = page.rows("providers")
        penalty = re.search(r"lost-race penalty \+([\d.]+) s", providers["slow"]["models"])
        assert penalty is not None and float(penalty.group(1)) >= 1.0, providers["slow"]
        assert "penalty" not in providers["quick"]["models"]


def _snapshot_with_penalty(seconds: float) -> dict[str, Any]:
    speed = {"source": "observed", "ttfc_s": 0.2, "decode_tps": 50.0, "samples": 9,
             "outpaced_penalty_s": seconds}
    return {"providers": [{"id": "p", "version": "1", "hardware": "", "served": 9,
                           "slots": {"in_use": 0, "max": 8}, "cooldowns": [],
                           "models": [{"id": "m", "is_vision": False,
                                       "template_render_ok": None, "speed": speed}]}],
            "queue_depth": 0, "leases": 0, "models": ["m"]}


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.0, None), (0.02, None), (PENALTY_SHOWN_FROM, "+0.1 s"), (2.46, "+2.5 s")])
def test_the_penalty_is_not_shown_as_plus_zero(seconds, shown):
    cell = Page(render_status(_snapshot_with_penalty(seconds), [])).rows("providers")["p"]
    if shown is None:
        assert "penalty" not in cell["models"], cell
    else:
        assert cell["models"].endswith(f"lost-race penalty {shown}"), cell
    assert cell["errors"] == "no requests yet"


def test_identical_failovers_are_one_row_with_a_count_and_a_span():
    sick = Failure("sick", "0.6.4", 500, "simulated provider failure")
    other = Failure("sick", "0.6.4", 502, "provider disconnected")
    failovers = [(100.0 + i * 0.125, f"r{i}", sick) for i in range(20)]
    failovers.append((101.0, "x", other))
    groups = group_failovers(failovers, now=103.0)
    assert [(g.status, g.count) for g in groups] == [(500, 20), (502, 1)]  # newest first
    assert groups[0].oldest_ago == 3.0 and groups[0].newest_ago == 0.625
    assert groups[0].latest_request == "r19"
    many = [(float(i), f"r{i}", Failure(f"p{i}", "1", 500, "x")) for i in range(30)]
    assert len(group_failovers(many, now=30.0)) == 20  # bounded, the most recent kept
    page = Page(render_status(_snapshot_with_penalty(0.0), groups))
    header, *rows = page.tables["failovers"]
    assert [dict(zip(header, r, strict=True))["when"] for r in rows] == [
        "3.0 to 0.6 s ago", "2.0 s ago"]


async def get_status(h: Any, headers: dict[str, str], path: str = "/status") -> HttpResult:
    return await asgi_call(h.coordinator.asgi, "GET", path, headers, b"")


async def sign_in(h: Any, body: bytes) -> HttpResult:
    return await asgi_call(h.coordinator.asgi, "POST", "/status/login", FORM, body)


async def test_status_page_needs_the_admin_key_even_from_loopback(autojump_clock):
    # Behind a reverse proxy on the same host every request comes from loopback.
    async with open_harness() as h:
        assert (await get_status(h, {})).status == 401
        assert (await get_status(h, {"authorization": "Bearer é"})).status == 401
        assert (await get_status(h, ADMIN)).status == 200
        # A key in the URL stays in histories and logs: the page no longer takes one.
        in_url = await get_status(h, {}, f"/status?key={ADMIN_KEY}")
        assert in_url.status == 401 and in_url.json()["error"]["code"] == "admin_only"
    async with open_harness(status_public=True) as h:
        assert (await get_status(h, {})).status == 200


async def test_a_browser_signs_in_with_a_form_and_gets_a_session_cookie(autojump_clock):
    async with open_harness() as h:
        # A browser without a key gets the sign-in form, not JSON.
        first = await get_status(h, BROWSER)
        assert first.status == 401 and first.headers["content-type"].startswith("text/html")
        [form] = Page(first.body.decode()).forms
        assert (form["method"], form["action"], form["id"]) == ("post", "/status/login",
                                                                 "sign-in")
        assert [(i["type"], i["name"]) for i in form["inputs"]] == [("password", "key")]
        assert "frame-ancestors 'none'" in first.headers["content-security-policy"]

        signed = await sign_in(h, f"key={ADMIN_KEY}".encode())
        assert signed.status == 303 and signed.headers["location"] == "/status"
        cookie = signed.headers["set-cookie"]
        name_value, *flags = [part.strip() for part in cookie.split(";")]
        token = name_value.removeprefix("coordinator_status=")
        assert token and ADMIN_KEY not in cookie
        assert {"HttpOnly", "Path=/status", "SameSite=Strict"} <= set(flags)

        page = await get_status(h, {**BROWSER, "cookie": name_value})
        assert page.status == 200
        parsed = Page(page.body.decode())
        assert "providers" in parsed.tables
        [sign_out] = parsed.forms
        assert (sign_out["method"], sign_out["action"]) == ("post", "/status/logout")
        # The cookie opens the status page only, not the admin API.
        assert (await asgi_call(h.coordinator.asgi, "GET", "/v1/admin/providers",
                                {"cookie": name_value}, b"")).status == 401

        out = await asgi_call(h.coordinator.asgi, "POST", "/status/logout",
                              {"cookie": name_value}, b"")
        assert out.status == 303 and "Max-Age=0" in out.headers["set-cookie"]
        again = await get_status(h, {**BROWSER, "cookie": name_value})  # revoked on the server
        assert again.status == 401 and Page(again.body.decode()).forms[0]["id"] == "sign-in"


async def test_a_session_expires(autojump_clock):
    async with open_harness() as h:
        cookie = (await sign_in(h, f"key={ADMIN_KEY}".encode())).headers["set-cookie"]
        name_value = cookie.split(";")[0]
        await trio.sleep(12 * 3600 - 1)  # scripted: a working day
        assert (await get_status(h, {"cookie": name_value})).status == 200
        await trio.sleep(1)
        assert (await get_status(h, {"cookie": name_value})).status == 401


async def test_a_wrong_key_is_refused_without_showing_back_what_was_typed(autojump_clock):
    async with open_harness() as h:
        typed = "<script>alert('typed')</script>"
        refused = await sign_in(h, b"key=" + typed.replace("'", "%27").encode())
        assert refused.status == 401 and "set-cookie" not in refused.headers
        page = Page(refused.body.decode())
        assert page.text_of["refused"] == "That is not an admin key."
        assert "alert" not in refused.body.decode() and "typed" not in refused.body.decode()
        for body in (b"", b"key=", b"\xff\xfe", b"a=1&" * 10, b"key=" + b"x" * 5000):
            answer = await sign_in(h, body)
            assert answer.status in (400, 401, 413) and "set-cookie" not in answer.headers
        # A script (no text/html in Accept) gets the JSON error.
        plain = await asgi_call(h.coordinator.asgi, "POST", "/status/login", {}, b"key=x")
        assert plain.status == 401 and plain.json()["error"]["code"] == "admin_only"


async def test_one_json_log_line_per_outcome_without_content(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="coordinator.requests")
    async with open_harness() as h:
        await h.add_provider("p")
        secret = "my secret prompt text"
        await h.request("/v1/chat/completions", {"model": MODEL, "stream": True,
                                                 "messages": [{"role": "user", "content": secret}]})
        await h.request("/v1/chat/completions", {"model": "nope", "messages": [{"content": secret}]})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "coordinator.requests"]
    assert [line["result"] for line in lines] == ["success", "error"]
    assert lines[0]["providers_tried"] == ["p"] and lines[0]["attempts"] == 1
    assert lines[1]["status"] == 404
    assert all(secret not in r.getMessage() for r in caplog.records)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Just enough of the Chrome DevTools Protocol to drive one page: commands, and
    the events that arrive while waiting for their answers."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._events: list[str] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send_message(json.dumps({"id": call_id, "method": method,
                                                "params": params}))
        while True:
            message = json.loads(await self._ws.get_message())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            if "method" in message:
                self._events.append(message["method"])

    async def next_load(self) -> None:
        """Wait for the page's next load (a navigation, a form's redirect, a refresh)."""
        self._events.clear()
        while "Page.loadEventFired" not in self._events:
            message = json.loads(await self._ws.get_message())
            if "method" in message:
                self._events.append(message["method"])

    async def run(self, script: str) -> Any:
        answer = await self.call("Runtime.evaluate", expression=script, returnByValue=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{script!r}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def page_until(self, holds: Any) -> Page:
        """The page once ``holds(page)``, re-read at each load (it refreshes itself)."""
        while True:
            try:
                page = Page(await self.run("document.documentElement.outerHTML"))
            except RuntimeError:  # read while navigating: the next load tells
                page = None
            if page is not None and holds(page):
                return page
            await self.next_load()


@asynccontextmanager
async def headless_chromium() -> AsyncIterator[DevTools]:
    """Chromium with a fresh profile, and its one page under DevTools control."""
    chromium = _chromium()
    assert chromium is not None
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        # Its own process group: the browser's helpers are stopped with it.
        process = await trio.lowlevel.open_process(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "about:blank"], stderr=subprocess.PIPE, start_new_session=True)
        try:
            assert process.stderr is not None
            stderr = process.stderr
            async with trio.open_nursery() as nursery:
                # Chromium says where DevTools listens on stderr; then it is drained,
                # so that a full pipe never stops the browser.
                buffered = b""
                while b"DevTools listening on ws://" not in buffered:
                    chunk = await stderr.receive_some()
                    assert chunk, f"chromium exited: {buffered[-2000:]!r}"
                    buffered += chunk
                port = int(re.search(rb"ws://127\.0\.0\.1:(\d+)/", buffered).group(1))  # type: ignore[union-attr]
                nursery.start_soon(_drain, stderr)
                async with httpx.AsyncClient() as client:
                    targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
                url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                async with trio_websocket.open_websocket_url(url) as ws:
                    tools = DevTools(ws)
                    await tools.call("Page.enable")
                    yield tools
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process)


async def _stop(process: trio.Process) -> None:
    """SIGTERM to the browser's group (it closes its helpers and profile), SIGKILL
    to whatever is left of it after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with trio.move_on_after(10):
        await process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


async def _drain(stream: Any) -> None:
    while await stream.receive_some():
        pass


def _signed_in(page: Page) -> bool:
    return "providers" in page.tables


@pytest.mark.slow  # a browser (headless Chromium), in real time
@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (the nox slow "
                    "session installs Debian's chromium where it can)")
async def test_status_page_in_headless_chromium_signs_in_without_the_key_in_a_url():
    async with live_coordinator(providers=3) as (running, fleet), \
            headless_chromium() as browser:
        with trio.fail_after(60):
            url = f"{running.http_url}/status"
            await browser.call("Page.navigate", url=url)
            await browser.next_load()
            # A browser without the key gets the sign-in form.
            await browser.page_until(lambda page: [f.get("id") for f in page.forms]
                                     == ["sign-in"])
            await browser.run(f"document.querySelector('input[name=key]').value = "
                              f"{json.dumps(ADMIN_KEY)}; "
                              "document.getElementById('sign-in').requestSubmit()")
            first = await browser.page_until(_signed_in)
            assert set(first.rows("providers")) == {p.provider_id for p in fleet}
            assert all(row["cooldowns"] == "none" for row in first.rows("providers").values())
            # The session is a cookie scripts cannot read, for /status only, not the key.
            assert await browser.run("document.cookie") == ""
            [cookie] = (await browser.call("Network.getCookies", urls=[url]))["cookies"]
            assert (cookie["name"], cookie["path"], cookie["httpOnly"], cookie["sameSite"]) \
                == ("coordinator_status", "/status", True, "Strict")
            assert ADMIN_KEY not in cookie["value"]
            history = (await browser.call("Page.getNavigationHistory"))["entries"]
            assert history and all(ADMIN_KEY not in entry["url"] for entry in history)

            # Make sim-0 sick and drive it into cooldown: two 500s, pinned to it.
            fleet[0].behaviour = Behaviour(Fault.ERROR, status=500)
            async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as client:
                for _ in range(2):
                    sick = await client.post(
                        "/v1/chat/completions", headers={"authorization": "Bearer test-key"},
                        json={"model": "sim-chat-small", "provider_ids": ["sim-0"],
                              "messages": [{"role": "user", "content": "x"}]})
                    assert sick.status_code == 503
            # The page refreshes itself: the cooldown shows with its time left.
            second = await browser.page_until(
                lambda page: _signed_in(page) and page.rows("providers")["sim-0"]["cooldowns"]
                != "none")
            assert re.fullmatch(r"sim-chat-small/base: \d+s left",
                                second.rows("providers")["sim-0"]["cooldowns"])
            assert second.rows("providers")["sim-0"]["errors"] == "2 of last 2 (100 %)"

            await browser.run("document.querySelector('form[action=\"/status/logout\"]')"
                              ".requestSubmit()")
            after = await browser.page_until(
                lambda page: [f.get("id") for f in page.forms] == ["sign-in"])
            assert not _signed_in(after)
            assert (await browser.call("Network.getCookies", urls=[url]))["cookies"] == []

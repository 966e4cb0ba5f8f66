"""The live status page and its sign-in page, as HTML. Pure.

Server-rendered with a meta refresh, so it needs no JavaScript: the browser
re-requests the same URL every few seconds, with the session cookie it got at
sign-in (``status_sessions.py``). Every value from outside — provider ids,
versions, model names, error messages — is escaped; nothing a visitor typed is
ever shown back.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from typing import Any

import attrs

from coordinator.dispatch.race import Failure
from coordinator.registry.speed import PENALTY_HALF_LIFE
from coordinator.registry.table import RecentVerdicts

REFRESH_SECONDS = 2
# A lost-race penalty below this is noise (a backup that lost by a few milliseconds) and
# would read "+0.0 s" on every healthy provider.
PENALTY_SHOWN_FROM = 0.1
MAX_FAILOVER_ROWS = 20
MAX_MESSAGE_CHARS = 300

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.3rem}h2{font-size:1.05rem;margin-top:1.5rem}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
th{background:#f4f4f4}.cool{color:#b00;font-weight:600}.warn{color:#a60}.ok{color:#070}
.muted{color:#888}dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}
dt{font-weight:600}dd{margin:0}form.inline{display:inline}
"""


@attrs.frozen
class FailoverGroup:
    """Identical failovers (same provider, version, status and error), counted together."""

    provider_id: str
    version: str
    status: int
    message: str
    count: int
    newest_ago: float
    oldest_ago: float
    latest_request: str


def group_failovers(failovers: Iterable[tuple[float, str, Failure]], now: float,
                    limit: int = MAX_FAILOVER_ROWS) -> list[FailoverGroup]:
    """The recent failovers, identical ones collapsed with a count and a time span,
    the most recent group first (a sick provider fills the page with one row, not 20)."""
    groups: dict[tuple[str, str, int, str], list[tuple[float, str]]] = {}
    for at, request_id, f in failovers:
        groups.setdefault((f.provider_id, f.version, f.status, f.message), []).append(
            (at, request_id))
    rows = [
        FailoverGroup(pid, version, status, message, len(seen),
                      newest_ago=now - max(at for at, _ in seen),
                      oldest_ago=now - min(at for at, _ in seen),
                      latest_request=max(seen)[1])
        for (pid, version, status, message), seen in groups.items()
    ]
    return sorted(rows, key=lambda g: g.newest_ago)[:limit]


def _cell(value: Any, css: str = "") -> str:
    attr = f' class="{css}"' if css else ""
    return f"<td{attr}>{escape(str(value))}</td>"


def _template(value: bool | None) -> str:
    if value is None:
        return '<span class="muted">not checked</span>'
    return '<span class="ok">ok</span>' if value else '<span class="cool">FAILED</span>'


def _speed(speed: dict[str, Any] | None) -> str:
    """Where the scheduler's speed figures come from, and a penalty only when there is one."""
    if not speed:
        return ""
    text = f"{speed['decode_tps']:g} tok/s {escape(str(speed['source']))}"
    if speed["ttfc_s"] is not None:
        text += f", first content {speed['ttfc_s'] * 1000:.0f} ms"
    penalty = speed["outpaced_penalty_s"]
    if penalty >= PENALTY_SHOWN_FROM:
        text += f', <span class="warn penalty">lost-race penalty +{penalty:.1f} s</span>'
    return text


def _errors(provider: dict[str, Any]) -> str:
    recent = provider.get("recent") or {}
    verdicts, errors = recent.get("verdicts", 0), recent.get("errors", 0)
    if not verdicts:
        return '<td class="muted">no requests yet</td>'
    text = f"{errors} of last {verdicts} ({100 * errors / verdicts:.0f} %)"
    return _cell(text, "warn" if errors else "")


def _provider_row(p: dict[str, Any]) -> str:
    models = "<br>".join(
        f"{escape(m['id'])}{' (vision)' if m['is_vision'] else ''}: "
        f"template {_template(m['template_render_ok'])}; {_speed(m.get('speed'))}"
        for m in p["models"])
    cooldowns = "<br>".join(
        f'<span class="cool">{escape(c["model"])}/{escape(c["shape"])}: '
        f'{c["seconds_left"]:.0f}s left</span>' for c in p["cooldowns"]) or "none"
    return (f"<tr>{_cell(p['id'])}{_cell(p['version'])}<td>{models}</td>"
            f"{_cell(str(p['slots']['in_use']) + ' / ' + str(p['slots']['max']))}"
            f"{_cell(p['served'])}{_errors(p)}<td>{cooldowns}</td></tr>")


def _key_row(k: dict[str, Any]) -> str:
    set_limits = {name: value for name, value in (k["limits"] or {}).items()
                  if value is not None and value != "none"}
    limits = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in set_limits.items())
    return (f"<tr>{_cell(k['name'])}{_cell(k['state'], 'cool' if k['state'] == 'revoked' else '')}"
            f"{_cell(limits or 'unlimited')}{_cell(k['in_flight'])}{_cell(k['admitted'])}"
            f"{_cell(k['refused'], 'warn' if k['refused'] else '')}{_cell(k['charged'])}</tr>")


def _failover_row(g: FailoverGroup) -> str:
    when = (f"{g.newest_ago:.1f} s ago" if g.count == 1
            else f"{g.oldest_ago:.1f} to {g.newest_ago:.1f} s ago")
    return (f"<tr>{_cell(when)}{_cell(g.count)}{_cell(g.provider_id)}{_cell(g.version)}"
            f"{_cell(g.status)}{_cell(g.message[:MAX_MESSAGE_CHARS])}"
            f"{_cell(g.latest_request)}</tr>")


_LEGEND = f"""<dl id="legend">
<dt>template</dt><dd>the provider's own check that the model's chat template renders:
ok; FAILED (the model is not routed there); not checked (the provider did not say)</dd>
<dt>tok/s, first content</dt><dd>the speed the scheduler uses: observed (measured here,
after 5 requests) or declared (the provider's claim)</dd>
<dt>lost-race penalty</dt><dd>seconds added to the provider's estimated time after another
provider answered a request first while this one had sent nothing; it halves every
{PENALTY_HALF_LIFE:g} s and is shown from {PENALTY_SHOWN_FROM:g} s</dd>
<dt>errors</dt><dd>errors (500, disconnect, silence) among the last {RecentVerdicts.SIZE}
requests that said anything about the provider's health, as seen by this instance</dd>
<dt>cooldowns</dt><dd>model/shape pairs not routed to after repeated errors, with the time
left; shapes are base, tools, vision and tools+vision</dd>
<dt>keys</dt><dd>the API keys that sent requests to this instance since it started,
busiest first: requests in flight, admitted, refused (over a limit, or a model the key may
not use) and tokens charged; the whole ledger is at /v1/admin/usage</dd>
<dt>failovers</dt><dd>failures before any content, retried on another provider; identical
ones (same provider, version, status and error) are counted together</dd>
</dl>"""

_SIGN_OUT = ('<form class="inline" method="post" action="/status/logout">'
             '<button type="submit">Sign out</button></form>')


def _page(title: str, body: str, *, refresh: bool) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">\n' if refresh else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
{meta}<title>{escape(title)}</title><style>{_STYLE}</style></head>
<body>{body}</body></html>"""


def render_status(snapshot: dict[str, Any], failovers: list[FailoverGroup],
                  cluster: str = "solo", *, signed_in: bool = False,
                  keys: list[dict[str, Any]] | None = None) -> str:
    """The page; ``signed_in``: the visitor came with a session cookie (offer sign-out)."""
    rows = "".join(_provider_row(p) for p in snapshot["providers"])
    key_rows = "".join(_key_row(k) for k in keys or ()) or \
        '<tr><td colspan="7" class="muted">no requests yet</td></tr>'
    recent = "".join(_failover_row(g) for g in failovers) or \
        '<tr><td colspan="7" class="muted">none yet</td></tr>'
    cluster_css = "cool" if cluster == "degraded" else "ok"
    return _page("Coordinator status", f"""<h1>Coordinator status {_SIGN_OUT if signed_in else ''}</h1>
<p id="summary">providers online: {len(snapshot['providers'])} ·
queue depth <span id="queue-depth">{snapshot['queue_depth']}</span> ·
{snapshot['leases']} requests in flight ·
cluster <span id="cluster" class="{cluster_css}">{escape(cluster)}</span></p>
<h2>Providers</h2>
<table id="providers"><tr><th>provider</th><th>version</th><th>models</th><th>slots</th>
<th>served</th><th>errors</th><th>cooldowns</th></tr>{rows}</table>
<h2>Keys</h2>
<table id="keys"><tr><th>key</th><th>state</th><th>limits</th><th>in flight</th>
<th>admitted</th><th>refused</th><th>tokens charged</th></tr>{key_rows}</table>
<h2>Recent failovers</h2>
<table id="failovers"><tr><th>when</th><th>count</th><th>provider</th><th>version</th>
<th>status</th><th>error</th><th>latest request</th></tr>{recent}</table>
<h2>Legend</h2>
{_LEGEND}""", refresh=True)


def render_sign_in(*, refused: bool = False) -> str:
    """The sign-in form. It posts the key in the body, never the URL; a refusal says so
    without showing back what was typed."""
    note = '<p id="refused" class="cool">That is not an admin key.</p>' if refused else ""
    return _page("Coordinator status: sign in", f"""<h1>Coordinator status</h1>
{note}<form id="sign-in" method="post" action="/status/login">
<label>Admin key <input type="password" name="key" autocomplete="current-password"
required autofocus></label> <button type="submit">Sign in</button></form>
<p class="muted">Scripts may send the key in an <code>Authorization: Bearer</code> header
instead.</p>""", refresh=False)

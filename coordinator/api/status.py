"""The live status page: providers, cooldowns, queue and recent failovers, as HTML.

Server-rendered with a meta refresh, so it needs no JavaScript and no second
authentication path: the browser re-requests the same URL (and key) every few
seconds.
"""

from __future__ import annotations

from html import escape
from typing import Any

REFRESH_SECONDS = 2

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.3rem}h2{font-size:1.05rem;margin-top:1.5rem}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
th{background:#f4f4f4}.cool{color:#b00;font-weight:600}.ok{color:#070}.muted{color:#888}
"""


def _cell(value: Any) -> str:
    return f"<td>{escape(str(value))}</td>"


def _render_ok(value: bool | None) -> str:
    if value is None:
        return '<span class="muted">no opinion</span>'
    return '<span class="ok">ok</span>' if value else '<span class="cool">FAILED</span>'


def _speed(speed: dict[str, Any] | None) -> str:
    """Where the scheduler's speed figures come from: observed, or still declared."""
    if not speed:
        return ""
    text = f"{speed['decode_tps']:g} tok/s {escape(str(speed['source']))}"
    if speed["ttfc_s"] is not None:
        text += f", first content {speed['ttfc_s'] * 1000:.0f} ms"
    if speed["outpaced_penalty_s"]:
        text += f' <span class="cool">outpaced +{speed["outpaced_penalty_s"]:.1f}s</span>'
    return text


def render_status(snapshot: dict[str, Any], failovers: list[dict[str, Any]],
                  cluster: str = "solo") -> str:
    rows = []
    for p in snapshot["providers"]:
        models = "<br>".join(
            f"{escape(m['id'])}{' (vision)' if m['is_vision'] else ''}: "
            f"template {_render_ok(m['template_render_ok'])}; {_speed(m.get('speed'))}"
            for m in p["models"])
        cooldowns = "<br>".join(
            f'<span class="cool">{escape(c["model"])}/{escape(c["shape"])}: '
            f'{c["seconds_left"]:.0f}s left</span>' for c in p["cooldowns"]) or "none"
        rows.append(
            f"<tr>{_cell(p['id'])}{_cell(p['version'])}<td>{models}</td>"
            f"{_cell(str(p['slots']['in_use']) + ' / ' + str(p['slots']['max']))}"
            f"{_cell(p['served'])}<td>{cooldowns}</td></tr>")
    recent = "".join(
        f"<tr>{_cell(f['ago'])}{_cell(f['request_id'])}{_cell(f['provider_id'])}"
        f"{_cell(f['version'])}{_cell(f['status'])}{_cell(f['message'])}</tr>"
        for f in failovers) or '<tr><td colspan="6" class="muted">none yet</td></tr>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>Coordinator status</title><style>{_STYLE}</style></head>
<body><h1>Coordinator status</h1>
<p id="summary">{len(snapshot['providers'])} providers online ·
queue depth <span id="queue-depth">{snapshot['queue_depth']}</span> ·
{snapshot['leases']} requests in flight ·
cluster <span id="cluster" class="{'cool' if cluster == 'degraded' else 'ok'}">{escape(cluster)}</span></p>
<h2>Providers</h2>
<table id="providers"><tr><th>provider</th><th>version</th><th>models</th><th>slots</th>
<th>served</th><th>cooldowns</th></tr>{''.join(rows)}</table>
<h2>Recent failovers</h2>
<table id="failovers"><tr><th>seconds ago</th><th>request</th><th>provider</th>
<th>version</th><th>status</th><th>error</th></tr>{recent}</table>
</body></html>"""

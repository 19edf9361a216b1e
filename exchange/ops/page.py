"""Server-rendered HTML of the ops snapshot (:mod:`exchange.ops.data`): no build step, no JavaScript needed.

Every value is HTML-escaped (broker names, URLs and error texts come from outside). The page reloads itself
every :data:`REFRESH_S` seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

REFRESH_S = 5

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d232a;background:#f6f7f9}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px}
.meta{color:#5b6673} a{color:#0b62c4}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002;min-width:480px}
th,td{padding:5px 10px;border-bottom:1px solid #e3e6ea;text-align:left;font-variant-numeric:tabular-nums}
th{background:#eef1f4;font-weight:600} td.num{text-align:right}
.warn{color:#a15c00;font-weight:600} .bad{color:#b3261e;font-weight:600} .ok{color:#1e7b34}
.empty{color:#5b6673;font-style:italic}
.grid{display:flex;flex-wrap:wrap;gap:24px}
"""


def _cell(value: Any, css: str = "") -> str:
    text = "—" if value is None else escape(str(value))
    return f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>"


def _table(title: str, headers: Sequence[str], rows: Iterable[str], empty: str, table_id: str) -> str:
    body = "".join(rows)
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    if not body:
        body = f'<tr><td class="empty" colspan="{len(headers)}">{escape(empty)}</td></tr>'
    return f'<section><h2>{escape(title)}</h2><table id="{table_id}"><tr>{head}</tr>{body}</table></section>'


def _price(cents: int | None) -> str | None:
    return None if cents is None else f"{cents / 100:,.2f}"


_BOOK_HEADERS = ["symbol", "best bid", "best ask", "last price", "last trade"]


def render(snapshot: dict[str, Any]) -> str:
    partitions = []
    for p in snapshot["partitions"]:
        age = p["oldest_age_s"]
        css = "bad" if age > 5 else "warn" if age > 1 else "num"
        partitions.append(
            f"<tr>{_cell(p['partition'])}{_cell(p['queue'])}{_cell(p['pending'], 'num')}{_cell(f'{age:.3f}', css)}</tr>"
        )
    queues = []
    for q in snapshot["queues"] or []:
        dead_css = "bad" if q["dead"] else "num"
        queues.append(
            f"<tr>{_cell(q['queue'])}{_cell(q['ready'], 'num')}{_cell(q['delayed'], 'num')}"
            f"{_cell(q['dead'], dead_css)}</tr>"
        )
    symbols = [
        f"<tr>{_cell(s['symbol'])}{_cell(_price(s['best_bid']), 'num')}{_cell(_price(s['best_ask']), 'num')}"
        f"{_cell(_price(s['last_price']), 'num')}{_cell(s['last_trade_at'])}</tr>"
        for s in snapshot["symbols"]
    ]
    hooks = [
        f"<tr>{_cell(h['broker_name'])}{_cell(h['webhook_url'])}"
        f"{_cell('enabled' if h['enabled'] else 'DISABLED', 'ok' if h['enabled'] else 'bad')}"
        f"{_cell(h['consecutive_failures'], 'warn num')}{_cell(h['retrying_events'], 'warn num')}"
        f"{_cell(h['failed_events'], 'num')}{_cell(h['disabled_reason'])}</tr>"
        for h in snapshot["webhook_endpoints"]
    ]
    errors = [
        f"<tr>{_cell(e['attempted_at'])}{_cell(e['broker_name'])}{_cell(e['type'])}{_cell(e['status'])}"
        f"{_cell(e['attempts'], 'num')}{_cell(e['error'], 'bad')}</tr>"
        for e in snapshot["recent_errors"]
    ]
    queue_section = (
        _table("Queues", ["queue", "ready", "delayed", "dead"], queues, "no queues", "queues")
        if snapshot["queues"] is not None
        else '<section><h2>Queues</h2><p class="bad">Redis unreachable</p></section>'
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>exchange · ops</title><style>{_STYLE}</style></head>
<body>
<h1>exchange · ops</h1>
<p class="meta">generated {escape(snapshot["generated_at"])} · refreshes every {REFRESH_S}s ·
<a href="/ops/dramatiq">dramatiq dashboard</a> · <a href="/ops/data.json">data.json</a> ·
<a href="/metrics">metrics</a> · <a href="/health/ready">readiness</a></p>
<div class="grid">
{
        _table(
            "Matching partitions",
            ["partition", "queue", "pending commands", "oldest (s)"],
            partitions,
            "no partitions",
            "partitions",
        )
    }
{queue_section}
</div>
{_table("Books (most recently traded first)", _BOOK_HEADERS, symbols, "no symbol has traded or rested yet", "symbols")}
{
        _table(
            "Webhook endpoints failing or disabled",
            ["broker", "url", "state", "consecutive failures", "events retrying", "events failed", "reason"],
            hooks,
            "all webhook endpoints healthy",
            "webhooks",
        )
    }
{
        _table(
            "Recent errors (webhook deliveries)",
            ["when", "broker", "event", "status", "attempts", "error"],
            errors,
            "no recent errors",
            "errors",
        )
    }
</body></html>
"""

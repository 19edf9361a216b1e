"""The fills the exchange made in the run, read back from each broker's event log (``GET /events``).

Compared with the fill webhooks the receiver got: a fill whose webhook did not arrive by the end of the grace
period is otherwise invisible (fill → webhook and order → fill would be timed over the webhooks that came only,
biased low). The cost is bounded: one page of up to :data:`PAGE` events per request, every broker's log read once,
the whole read given up after ``budget_s``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import msgspec

from ops.bench.http import Pool

PAGE = 1000
CONCURRENCY = 8


def fills_of_page(items: list[Any], since_wall: float) -> dict[str, str]:
    """``event_id -> order_id`` of the page's ``trade_executed`` events executed at or after ``since_wall`` (the
    receiver times exactly those)."""
    out: dict[str, str] = {}
    for item in items:
        body = item.get("payload") if isinstance(item, dict) else None
        if not isinstance(body, dict) or body.get("event") != "trade_executed":
            continue
        executed, event_id, order_id = body.get("executed_at"), body.get("event_id"), body.get("order_id")
        if not (isinstance(executed, str) and isinstance(event_id, str) and isinstance(order_id, str)):
            continue
        try:
            if datetime.fromisoformat(executed).timestamp() < since_wall:
                continue
        except ValueError:
            continue
        out[event_id] = order_id
    return out


async def fetch_fills(
    base_url: str, auth: dict[int, bytes], since_wall: float, *, timeout_s: float = 10.0, budget_s: float = 60.0
) -> dict[str, str]:
    """``event_id -> order_id`` of every fill of ``auth``'s brokers executed since ``since_wall`` (epoch s). Raises
    :class:`RuntimeError` on a non-200 answer, :class:`TimeoutError` past ``budget_s``."""
    pool = Pool(base_url, timeout_s=timeout_s, max_connections=CONCURRENCY)
    limit = asyncio.Semaphore(CONCURRENCY)
    fills: dict[str, str] = {}

    async def read(header: bytes) -> None:
        after = 0
        while True:
            async with limit:
                status, data = await pool.request("GET", f"/events?after={after}&limit={PAGE}", auth=header)
            if status != 200:
                raise RuntimeError(f"GET /events -> {status} {data[:200]!r}")
            doc = msgspec.json.decode(data)
            items = doc.get("items", [])
            fills.update(fills_of_page(items, since_wall))
            if len(items) < PAGE:
                return
            after = int(doc["next_after"])

    try:
        async with asyncio.timeout(budget_s):
            await asyncio.gather(*(read(header) for header in auth.values()))
    finally:
        pool.close()
    return fills

"""The ops snapshot: what an operator looks at first, read fresh from Postgres and Redis on every call.

Everything is bounded (top-N symbols, last-N errors) so the page stays cheap on a large exchange. The snapshot is
plain JSON-able data: ``/ops`` renders it, ``/ops/data.json`` returns it, ``/metrics`` takes its gauges from the
same queries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from dramatiq.common import dq_name, xq_name
from redis.asyncio import Redis

from exchange.db.engines import AsyncPool, single_statement
from exchange.messaging.partitions import WEBHOOK_QUEUE, matching_queue, partition_of

MAX_SYMBOLS = 50
MAX_ERRORS = 20
DRAMATIQ_NAMESPACE = "dramatiq"
"""RedisBroker's default key namespace (``make_broker`` keeps it): a queue's messages are the hash
``dramatiq:<queue>.msgs``."""
READ_TIMEOUT_S = 2.0
"""Bound on a read that may fail on its own (``/metrics``' gauges, the queue depths), so an unreachable Postgres
or Redis never stalls ``/ops`` or ``/metrics``."""

_PENDING = """
    SELECT symbol, count(*) AS pending, extract(epoch FROM clock_timestamp() - min(created_at)) AS oldest_s
    FROM commands WHERE processed_at IS NULL GROUP BY symbol
"""

_BOOKS = """
    SELECT s.symbol, s.last_price, s.last_trade_at,
           coalesce(o.bids, 0) AS bid_orders, coalesce(o.asks, 0) AS ask_orders,
           coalesce(o.bid_qty, 0) AS bid_quantity, coalesce(o.ask_qty, 0) AS ask_quantity,
           o.best_bid, o.best_ask
    FROM symbols s
    LEFT JOIN (
        SELECT symbol,
               count(*) FILTER (WHERE side = 'bid') AS bids, count(*) FILTER (WHERE side = 'ask') AS asks,
               sum(remaining) FILTER (WHERE side = 'bid') AS bid_qty,
               sum(remaining) FILTER (WHERE side = 'ask') AS ask_qty,
               max(price) FILTER (WHERE side = 'bid') AS best_bid, min(price) FILTER (WHERE side = 'ask') AS best_ask
        FROM orders WHERE close_reason IS NULL AND status = 'open' GROUP BY symbol
    ) o ON o.symbol = s.symbol
    ORDER BY s.last_trade_at DESC NULLS LAST, s.symbol
    LIMIT %(limit)s
"""

_WEBHOOK_ENDPOINTS = """
    SELECT id, name, webhook_url, webhook_enabled, webhook_disabled_reason, webhook_consecutive_failures
    FROM brokers
    WHERE webhook_url IS NOT NULL AND (NOT webhook_enabled OR webhook_consecutive_failures > 0)
    ORDER BY webhook_enabled, webhook_consecutive_failures DESC, name
    LIMIT %(limit)s
"""

# The latest failed delivery attempts, by when they were made (ix_webhook_attempts_failed_attempted_at), with their
# events' state. Not the events by their next attempt: one deep in its retry schedule would come first, and an
# endpoint that had only just begun failing would not be listed. Skipped events (no URL, endpoint disabled) made no
# attempt: they are listed above.
_RECENT_ERRORS = """
    SELECT a.event_id, a.broker_id, b.name AS broker_name, e.type, e.status, e.attempts, a.error, a.status_code,
           a.attempted_at, e.created_at, e.next_attempt_at
    FROM (SELECT * FROM webhook_attempts WHERE error IS NOT NULL ORDER BY attempted_at DESC LIMIT %(limit)s) AS a
    JOIN webhook_events e ON e.id = a.event_id
    JOIN brokers b ON b.id = a.broker_id
    ORDER BY a.attempted_at DESC
"""


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


async def pending_by_partition(pool: AsyncPool, partitions: int) -> list[dict[str, Any]]:
    """Every partition (including idle ones) with its unprocessed commands and the oldest one's age."""
    async with single_statement(pool) as conn:
        rows = await (await conn.execute(_PENDING)).fetchall()
    pending = [0] * partitions
    oldest = [0.0] * partitions
    for row in rows:
        n = partition_of(row.symbol, partitions)
        pending[n] += int(row.pending)
        oldest[n] = max(oldest[n], round(float(row.oldest_s), 3))
    return [
        {"partition": n, "queue": matching_queue(n), "pending": pending[n], "oldest_age_s": oldest[n]}
        for n in range(partitions)
    ]


async def queue_depths(redis: Redis, partitions: int) -> list[dict[str, Any]]:
    """Messages per dramatiq queue: ready (incl. in flight), delayed, dead — the keys dramatiq's RedisBroker uses."""
    queues = [*(matching_queue(n) for n in range(partitions)), WEBHOOK_QUEUE]
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in (queue, dq_name(queue), xq_name(queue)):
                pipe.hlen(f"{DRAMATIQ_NAMESPACE}:{name}.msgs")
        counts = await pipe.execute()
    return [
        {"queue": q, "ready": int(counts[3 * i]), "delayed": int(counts[3 * i + 1]), "dead": int(counts[3 * i + 2])}
        for i, q in enumerate(queues)
    ]


async def queue_depths_or_none(redis: Redis, partitions: int) -> list[dict[str, Any]] | None:
    """:func:`queue_depths`, or None when Redis does not answer within :data:`READ_TIMEOUT_S`."""
    with contextlib.suppress(Exception):
        return await asyncio.wait_for(queue_depths(redis, partitions), READ_TIMEOUT_S)
    return None


async def snapshot(pool: AsyncPool, redis: Redis, partitions: int) -> dict[str, Any]:
    """The whole ops view. Redis being down does not hide the Postgres part (``queues`` is then ``None``)."""

    async def database() -> tuple[Sequence[Any], Sequence[Any], Sequence[Any]]:
        async with single_statement(pool) as conn:  # three reads: nothing to commit together
            books = await (await conn.execute(_BOOKS, {"limit": MAX_SYMBOLS})).fetchall()
            hooks = await (await conn.execute(_WEBHOOK_ENDPOINTS, {"limit": MAX_ERRORS})).fetchall()
            errors = await (await conn.execute(_RECENT_ERRORS, {"limit": MAX_ERRORS})).fetchall()
        return books, hooks, errors

    pending, (books, hooks, errors), queues = await asyncio.gather(
        pending_by_partition(pool, partitions), database(), queue_depths_or_none(redis, partitions)
    )
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "partitions": pending,
        "queues": queues,
        "symbols": [
            {
                "symbol": r.symbol,
                "bid_orders": int(r.bid_orders),
                "ask_orders": int(r.ask_orders),
                "bid_quantity": int(r.bid_quantity),
                "ask_quantity": int(r.ask_quantity),
                "best_bid": r.best_bid,
                "best_ask": r.best_ask,
                "last_price": r.last_price,
                "last_trade_at": _iso(r.last_trade_at),
            }
            for r in books
        ],
        "webhook_endpoints": [
            {
                "broker_id": str(r.id),
                "broker_name": r.name,
                "webhook_url": r.webhook_url,
                "enabled": bool(r.webhook_enabled),
                "disabled_reason": r.webhook_disabled_reason,
                "consecutive_failures": int(r.webhook_consecutive_failures),
            }
            for r in hooks
        ],
        "recent_errors": [
            {
                "event_id": str(r.event_id),
                "broker_id": str(r.broker_id),
                "broker_name": r.broker_name,
                "type": r.type,
                "status": r.status,
                "attempts": int(r.attempts),
                "error": r.error,
                "status_code": r.status_code,
                "attempted_at": _iso(r.attempted_at),
                "created_at": _iso(r.created_at),
                "next_attempt_at": _iso(r.next_attempt_at) if r.status == "pending" else None,
            }
            for r in errors
        ],
    }

"""The ops snapshot: what an operator looks at first, read from Postgres and Redis.

Every read is bounded and reaches its rows through an index, never through all open orders: the books are the
:data:`MAX_SYMBOLS` most recently traded symbols (one row each in ``symbols``), each with its best bid and best ask
read by one probe per side of ``ix_orders_open_book`` (``tests/integration/test_query_plans.py``). No per-symbol
order counts or quantities: they read every resting order of the symbols shown (on 1,000,000 open orders over 450
symbols, 400-680 ms for 50 symbols, as long as summing the whole table), which ``GET /stocks/{symbol}/book`` gives
per symbol. The api serves one snapshot per process for the page's refresh interval (``ApiState.ops_snapshot``).
The snapshot is plain JSON-able data: ``/ops`` renders it, ``/ops/data.json`` returns it, ``/metrics`` takes its
pending-command gauges from :func:`pending_by_partition`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from dramatiq.common import dq_name, xq_name
from redis.asyncio import Redis

from exchange.db.engines import AsyncPool, single_statement
from exchange.messaging.partitions import WEBHOOK_QUEUE, matching_queue, partition_of
from exchange.webhooks.queries import FailingEndpoint, failing_endpoints

MAX_SYMBOLS = 50
MAX_ERRORS = 20
READ_TIMEOUT_S = 2.0
"""Bound on a read that may fail on its own (``/metrics``' gauges, the queue depths), so an unreachable Postgres
or Redis never stalls ``/ops`` or ``/metrics``."""
GAUGES_TTL_S = 1.0
"""How long an api process serves ``/metrics``' database-derived gauges before reading them again (``/metrics``
needs no key: a client polling it in a loop costs at most one :data:`_PENDING` per second per process)."""

# Reads every unprocessed command, whatever the plan: a count and the oldest per symbol need each row. Where most of
# the table is processed history PostgreSQL already reads them through ix_commands_unprocessed_created_at (200,000 of
# 1,200,000 commands: 200-640 ms, the heap fetches in created_at order); where most are unprocessed, a sequential
# scan is cheaper. Hence GAUGES_TTL_S rather than an index.
_PENDING = """
    SELECT symbol, count(*) AS pending, extract(epoch FROM clock_timestamp() - min(created_at)) AS oldest_s
    FROM commands WHERE processed_at IS NULL GROUP BY symbol
"""

# The symbols shown: a top-N sort of ``symbols``, one row per listed symbol (450 at B3's scale: 0.1 ms), with no
# index on last_trade_at, which would make the matcher's update of the row on every trade a non-HOT one. Then one
# index probe per side and symbol: the best price of an order resting now (status 'open': pending orders are in the
# index too, skipped by the filter; market orders have no price).
_BOOKS = """
    SELECT s.symbol, s.last_price, s.last_trade_at,
           (SELECT o.price FROM orders o
            WHERE o.symbol = s.symbol AND o.side = 'bid' AND o.close_reason IS NULL AND o.price IS NOT NULL
              AND o.status = 'open'
            ORDER BY o.price DESC LIMIT 1) AS best_bid,
           (SELECT o.price FROM orders o
            WHERE o.symbol = s.symbol AND o.side = 'ask' AND o.close_reason IS NULL AND o.price IS NOT NULL
              AND o.status = 'open'
            ORDER BY o.price LIMIT 1) AS best_ask
    FROM (SELECT symbol, last_price, last_trade_at FROM symbols
          ORDER BY last_trade_at DESC NULLS LAST, symbol LIMIT %(limit)s) AS s
    ORDER BY s.last_trade_at DESC NULLS LAST, s.symbol
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


async def queue_depths(redis: Redis, namespace: str, partitions: int) -> list[dict[str, Any]]:
    """Messages per dramatiq queue of the exchange of ``namespace`` (its broker's): ready (incl. in flight),
    delayed, dead — the keys dramatiq's RedisBroker uses (a queue's messages are the hash
    ``<namespace>:<queue>.msgs``)."""
    queues = [*(matching_queue(n) for n in range(partitions)), WEBHOOK_QUEUE]
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in (queue, dq_name(queue), xq_name(queue)):
                pipe.hlen(f"{namespace}:{name}.msgs")
        counts = await pipe.execute()
    return [
        {"queue": q, "ready": int(counts[3 * i]), "delayed": int(counts[3 * i + 1]), "dead": int(counts[3 * i + 2])}
        for i, q in enumerate(queues)
    ]


async def queue_depths_or_none(
    redis: Redis, namespace: Callable[[], Awaitable[str]], partitions: int
) -> list[dict[str, Any]] | None:
    """:func:`queue_depths` in the exchange's ``namespace`` (the api's, read from its database on first need), or
    None when Redis (or that first read) does not answer within :data:`READ_TIMEOUT_S`."""

    async def read() -> list[dict[str, Any]]:
        return await queue_depths(redis, await namespace(), partitions)

    with contextlib.suppress(Exception):
        return await asyncio.wait_for(read(), READ_TIMEOUT_S)
    return None


async def snapshot(
    pool: AsyncPool, redis: Redis, namespace: Callable[[], Awaitable[str]], partitions: int
) -> dict[str, Any]:
    """The whole ops view. Redis being down does not hide the Postgres part (``queues`` is then ``None``)."""

    async def database() -> tuple[Sequence[Any], list[FailingEndpoint], Sequence[Any]]:
        async with single_statement(pool) as conn:  # three reads: nothing to commit together
            books = await (await conn.execute(_BOOKS, {"limit": MAX_SYMBOLS})).fetchall()
            hooks = await failing_endpoints(conn, MAX_ERRORS)  # the same list as /admin/webhooks/failing
            errors = await (await conn.execute(_RECENT_ERRORS, {"limit": MAX_ERRORS})).fetchall()
        return books, hooks, errors

    pending, (books, hooks, errors), queues = await asyncio.gather(
        pending_by_partition(pool, partitions), database(), queue_depths_or_none(redis, namespace, partitions)
    )
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "partitions": pending,
        "queues": queues,
        "symbols": [
            {
                "symbol": r.symbol,
                "best_bid": r.best_bid,
                "best_ask": r.best_ask,
                "last_price": r.last_price,
                "last_trade_at": _iso(r.last_trade_at),
            }
            for r in books
        ],
        "webhook_endpoints": [
            {
                "broker_id": str(h.broker_id),
                "broker_name": h.broker_name,
                "webhook_url": h.url,
                "enabled": h.enabled,
                "disabled_reason": h.disabled_reason,
                "consecutive_failures": h.consecutive_failures,
                "retrying_events": h.retrying_events,
                "failed_events": h.failed_events,
                "oldest_pending_at": _iso(h.oldest_pending_at),
            }
            for h in hooks
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

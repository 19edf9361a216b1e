"""SQL of the matcher's transaction: read the book and the pending commands, write one batch's effects.

Every statement is set-based (one statement per table per batch, arrays via ``unnest``), and every function
runs inside the caller's transaction, which holds the symbol's advisory lock (``pg_advisory_xact_lock``,
transaction-scoped, so it is safe through pgbouncer's transaction pooling).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, text

from exchange.engine.types import RestingOrder, Side, StpMode
from exchange.matching.commands import LoggedCommand
from exchange.matching.effects import BatchEffects, OutboxDraft
from exchange.messaging.partitions import book_lock_key
from exchange.times import to_micros


@dataclass(frozen=True, slots=True)
class OrderMeta:
    broker_id: UUID
    side: Side
    document_number: str
    client_order_id: str | None


def lock_book(conn: Connection, symbol: str) -> tuple[int, datetime]:
    """Take the symbol's lock (waits for the current holder) and return (book_version, database now).

    The time comes from the database (``clock_timestamp()`` after the lock is held) so every matcher process on
    every host uses one clock.
    """
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": book_lock_key(symbol)})
    row = conn.execute(
        text("SELECT book_version, clock_timestamp() FROM symbols WHERE symbol = :symbol"), {"symbol": symbol}
    ).first()
    if row is None:
        row = conn.execute(
            text(
                "INSERT INTO symbols (symbol) VALUES (:symbol) "
                "ON CONFLICT (symbol) DO UPDATE SET symbol = EXCLUDED.symbol "
                "RETURNING book_version, clock_timestamp()"
            ),
            {"symbol": symbol},
        ).one()
    return int(row[0]), row[1]


_PENDING = text(
    """
    SELECT c.seq, c.kind, c.order_id, c.payload, o.broker_id, o.document_number, o.side, o.order_type,
           o.time_in_force, o.price, o.quantity, o.valid_until, o.stp
    FROM commands c LEFT JOIN orders o ON o.id = c.order_id
    WHERE c.symbol = :symbol AND c.processed_at IS NULL
    ORDER BY c.seq
    LIMIT :limit
    """
)


def pending_commands(conn: Connection, symbol: str, limit: int) -> list[LoggedCommand]:
    """Unprocessed commands of ``symbol`` in sequence order. Each is marked processed individually (no
    watermark): a command whose transaction commits late is simply found by a later batch."""
    rows = conn.execute(_PENDING, {"symbol": symbol, "limit": limit}).all()
    return [LoggedCommand(*row) for row in rows]


_OPEN_ORDERS = text(
    """
    SELECT id, broker_id, document_number, side, price, quantity, remaining, priority, valid_until, stp
    FROM orders
    WHERE symbol = :symbol AND status = 'open'
    ORDER BY priority
    """
)


@dataclass(frozen=True, slots=True)
class QuarantinedCommand:
    seq: int
    kind: str
    order_id: UUID | None


def quarantine_first_pending(conn: Connection, symbol: str, now: datetime) -> QuarantinedCommand | None:
    """Mark the first pending command of ``symbol`` processed without applying it, and close its order
    ``rejected`` if the order never reached the book (a place). Caller holds the symbol's lock."""
    row = conn.execute(
        text(
            "UPDATE commands SET processed_at = :now WHERE seq = ("
            "SELECT seq FROM commands WHERE symbol = :symbol AND processed_at IS NULL ORDER BY seq LIMIT 1) "
            "RETURNING seq, kind, order_id"
        ),
        {"symbol": symbol, "now": now},
    ).first()
    if row is None:
        return None
    if row.kind == "place" and row.order_id is not None:
        conn.execute(
            text(
                "UPDATE orders SET status = 'closed', close_reason = 'rejected', updated_at = :now "
                "WHERE id = :id AND status = 'pending'"
            ),
            {"id": row.order_id, "now": now},
        )
    return QuarantinedCommand(row.seq, row.kind, row.order_id)


def open_orders(conn: Connection, symbol: str) -> list[RestingOrder]:
    """The resting orders of ``symbol`` in priority order: the input of ``OrderBook.rebuild``."""
    return [
        RestingOrder(
            order_id=row.id,
            broker_id=row.broker_id,
            document_number=row.document_number,
            side=Side(row.side),
            price=row.price,
            quantity=row.quantity,
            remaining=row.remaining,
            priority=row.priority,
            valid_until=None if row.valid_until is None else to_micros(row.valid_until),
            stp=StpMode(row.stp),
        )
        for row in conn.execute(_OPEN_ORDERS, {"symbol": symbol})
    ]


def order_meta(conn: Connection, order_ids: Sequence[UUID]) -> dict[UUID, OrderMeta]:
    if not order_ids:
        return {}
    rows = conn.execute(
        text("SELECT id, broker_id, side, document_number, client_order_id FROM orders WHERE id = ANY(:ids)"),
        {"ids": list(order_ids)},
    )
    return {r.id: OrderMeta(r.broker_id, Side(r.side), r.document_number, r.client_order_id) for r in rows}


_UPDATE_ORDERS = text(
    """
    UPDATE orders AS o
    SET status = v.status,
        remaining = COALESCE(v.remaining, o.remaining),
        close_reason = v.close_reason,
        priority = v.priority,
        price = COALESCE(v.price, o.price),
        quantity = COALESCE(v.quantity, o.quantity),
        updated_at = :now
    FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS text[]), CAST(:remainings AS bigint[]),
                CAST(:reasons AS text[]), CAST(:priorities AS bigint[]), CAST(:prices AS bigint[]),
                CAST(:quantities AS bigint[]))
         AS v(id, status, remaining, close_reason, priority, price, quantity)
    WHERE o.id = v.id
    """
)

_INSERT_TRADES = text(
    """
    INSERT INTO trades (id, symbol, price, quantity, buy_order_id, sell_order_id, buy_broker_id, sell_broker_id,
                        maker_order_id, taker_side, command_seq, match_no, executed_at)
    SELECT v.id, :symbol, v.price, v.quantity, v.buy_order_id, v.sell_order_id, v.buy_broker_id, v.sell_broker_id,
           v.maker_order_id, v.taker_side, v.command_seq, v.match_no, :now
    FROM unnest(CAST(:ids AS uuid[]), CAST(:prices AS bigint[]), CAST(:quantities AS bigint[]),
                CAST(:buy_orders AS uuid[]), CAST(:sell_orders AS uuid[]), CAST(:buy_brokers AS uuid[]),
                CAST(:sell_brokers AS uuid[]), CAST(:makers AS uuid[]), CAST(:taker_sides AS text[]),
                CAST(:seqs AS bigint[]), CAST(:match_nos AS int[]))
         AS v(id, price, quantity, buy_order_id, sell_order_id, buy_broker_id, sell_broker_id, maker_order_id,
              taker_side, command_seq, match_no)
    """
)

_UPDATE_BROKERS = text(
    """
    UPDATE brokers AS b
    SET balance = b.balance + v.delta, event_seq = b.event_seq + v.n
    FROM unnest(CAST(:ids AS uuid[]), CAST(:deltas AS bigint[]), CAST(:counts AS bigint[])) AS v(id, delta, n)
    WHERE b.id = v.id
    RETURNING b.id, b.event_seq
    """
)

_UPSERT_POSITIONS = text(
    """
    INSERT INTO positions (broker_id, symbol, quantity, updated_at)
    SELECT v.broker_id, :symbol, v.delta, :now
    FROM unnest(CAST(:ids AS uuid[]), CAST(:deltas AS bigint[])) AS v(broker_id, delta)
    ON CONFLICT (broker_id, symbol)
    DO UPDATE SET quantity = positions.quantity + EXCLUDED.quantity, updated_at = EXCLUDED.updated_at
    """
)

_INSERT_OUTBOX = text(
    """
    INSERT INTO webhook_events (id, broker_id, sequence, type, order_id, trade_id, payload, created_at,
                                next_attempt_at)
    SELECT v.id, v.broker_id, v.sequence, v.type, v.order_id, v.trade_id, v.payload, :now, :now
    FROM unnest(CAST(:ids AS uuid[]), CAST(:brokers AS uuid[]), CAST(:sequences AS bigint[]),
                CAST(:types AS text[]), CAST(:order_ids AS uuid[]), CAST(:trade_ids AS uuid[]),
                CAST(:payloads AS jsonb[]))
         AS v(id, broker_id, sequence, type, order_id, trade_id, payload)
    """
)


def write_batch(
    conn: Connection,
    symbol: str,
    now: datetime,
    plan: BatchEffects,
    meta: dict[UUID, OrderMeta],
    processed_seqs: Sequence[int],
) -> list[UUID]:
    """Write one batch's effects and mark its commands processed. Returns the ids of the outbox events written."""
    if plan.orders:
        updates = list(plan.orders.values())
        conn.execute(
            _UPDATE_ORDERS,
            {
                "now": now,
                "ids": [u.order_id for u in updates],
                "statuses": [u.status for u in updates],
                "remainings": [u.remaining for u in updates],
                "reasons": [u.close_reason for u in updates],
                "priorities": [u.priority for u in updates],
                "prices": [u.price for u in updates],
                "quantities": [u.quantity for u in updates],
            },
        )
    trade_ids = {(t.seq, t.match_no): uuid.uuid4() for t in plan.trades}
    if plan.trades:
        conn.execute(
            _INSERT_TRADES,
            {
                "symbol": symbol,
                "now": now,
                "ids": list(trade_ids.values()),
                "prices": [t.price for t in plan.trades],
                "quantities": [t.quantity for t in plan.trades],
                "buy_orders": [t.buy_order_id for t in plan.trades],
                "sell_orders": [t.sell_order_id for t in plan.trades],
                "buy_brokers": [t.buy_broker_id for t in plan.trades],
                "sell_brokers": [t.sell_broker_id for t in plan.trades],
                "makers": [t.maker_order_id for t in plan.trades],
                "taker_sides": [t.taker_side.value for t in plan.trades],
                "seqs": [t.seq for t in plan.trades],
                "match_nos": [t.match_no for t in plan.trades],
            },
        )
    written = _write_brokers_and_outbox(conn, symbol, now, plan, meta, trade_ids)
    if plan.shares:
        ids = sorted(plan.shares)
        conn.execute(
            _UPSERT_POSITIONS, {"symbol": symbol, "now": now, "ids": ids, "deltas": [plan.shares[i] for i in ids]}
        )
    conn.execute(
        text(
            "UPDATE symbols SET book_version = book_version + 1, last_price = COALESCE(:price, last_price), "
            "last_trade_at = CASE WHEN :price IS NULL THEN last_trade_at ELSE :now END WHERE symbol = :symbol"
        ),
        {"symbol": symbol, "price": plan.last_price, "now": now},
    )
    if processed_seqs:
        conn.execute(
            text("UPDATE commands SET processed_at = :now WHERE seq = ANY(:seqs)"),
            {"now": now, "seqs": list(processed_seqs)},
        )
    return written


def _write_brokers_and_outbox(
    conn: Connection,
    symbol: str,
    now: datetime,
    plan: BatchEffects,
    meta: dict[UUID, OrderMeta],
    trade_ids: dict[tuple[int, int], UUID],
) -> list[UUID]:
    brokers = plan.touched_brokers
    if not brokers:
        return []
    counts: dict[UUID, int] = {}
    for draft in plan.outbox:
        counts[draft.broker_id] = counts.get(draft.broker_id, 0) + 1
    # Lock broker rows in id order first: two matchers on different symbols touching the same brokers then
    # always queue in the same order instead of deadlocking. NO KEY UPDATE (only balance/event_seq change) does not
    # conflict with the KEY SHARE lock every order INSERT's foreign-key check takes, so accepts never wait on us.
    conn.execute(
        text("SELECT id FROM brokers WHERE id = ANY(:ids) ORDER BY id FOR NO KEY UPDATE"), {"ids": brokers}
    ).all()
    last_seq = {
        row.id: row.event_seq
        for row in conn.execute(
            _UPDATE_BROKERS,
            {
                "ids": brokers,
                "deltas": [plan.cash.get(b, 0) for b in brokers],
                "counts": [counts.get(b, 0) for b in brokers],
            },
        )
    }
    next_seq = {b: last_seq[b] - counts.get(b, 0) + 1 for b in brokers}
    columns: dict[str, list[Any]] = {
        name: [] for name in ("ids", "brokers", "sequences", "types", "order_ids", "trade_ids", "payloads")
    }
    for draft in plan.outbox:
        sequence = next_seq[draft.broker_id]
        next_seq[draft.broker_id] = sequence + 1
        event_id = uuid.uuid4()
        trade_id = None if draft.fill is None else trade_ids[(draft.fill.seq, draft.fill.match_no)]
        body = event_payload(draft, event_id, sequence, symbol, now, trade_id, meta.get(draft.order_id))
        columns["ids"].append(event_id)
        columns["brokers"].append(draft.broker_id)
        columns["sequences"].append(sequence)
        columns["types"].append(draft.type)
        columns["order_ids"].append(draft.order_id)
        columns["trade_ids"].append(trade_id)
        columns["payloads"].append(json.dumps(body, separators=(",", ":")))
    if plan.outbox:
        conn.execute(_INSERT_OUTBOX, {"now": now, **columns})
    return columns["ids"]


def event_payload(
    draft: OutboxDraft,
    event_id: UUID,
    sequence: int,
    symbol: str,
    now: datetime,
    trade_id: UUID | None,
    meta: OrderMeta | None,
) -> dict[str, Any]:
    """The webhook body (DESIGN §5): the seed's fields plus event id, type and per-broker sequence."""
    body: dict[str, Any] = {
        "event_id": str(event_id),
        "type": draft.type,
        "sequence": sequence,
        "order_id": str(draft.order_id),
        "symbol": symbol,
        "side": None if draft.side is None else draft.side.value,
        "order_remaining_quantity": draft.remaining,
        "document_number": None if meta is None else meta.document_number,
        "client_order_id": None if meta is None else meta.client_order_id,
    }
    if draft.fill is not None:
        body.update(
            event="trade_executed",
            trade_id=str(trade_id),
            price=draft.fill.price,
            quantity=draft.fill.quantity,
            executed_at=now.isoformat(),
        )
    elif draft.close is not None:
        body.update(
            event=draft.type.replace(".", "_"),
            reason=draft.close.reason.value,
            occurred_at=now.isoformat(),
        )
    return body

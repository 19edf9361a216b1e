"""SQL of the matcher's transaction: lock the book, read its pending commands, write one batch's effects.

A batch costs two round trips to PostgreSQL (through pgbouncer), whatever its size:

1. :func:`begin_batch`: ``BEGIN``, the symbol's advisory lock, its book version and the database clock, and its
   pending commands;
2. :func:`write_batch`: every write of the batch, then ``COMMIT``.

Each is ONE query message holding several statements (the simple query protocol; psycopg's ``ClientCursor`` binds
the parameters on the client as quoted literals, escaped by libpq). PostgreSQL runs the statements one after the
other, so nothing changes for the transaction except the waiting. In particular a statement after the lock still
takes its READ COMMITTED snapshot when it starts, i.e. after the lock is granted, so it sees everything the previous
holder committed (PostgreSQL releases a transaction's locks only after its commit is visible). That is also why
the lock and the version read stay two statements: one statement's snapshot is taken before its lock wait.

The connection is in autocommit mode meanwhile (:func:`connect`) so that psycopg sends no ``BEGIN`` of its own
(one more round trip): the transaction is the explicit ``BEGIN`` … ``COMMIT`` of the two messages. psycopg's
pipeline mode with the same explicit ``BEGIN``/``COMMIT`` also takes one round trip per message, but its
per-statement protocol work cost twice the client CPU per batch (1.1 vs 0.5 ms in ``ops/bench_matcher.py``).

Rows go to PostgreSQL as one JSON document per table (``json_to_recordset``), not as one array parameter per
column: msgspec encodes a batch's rows several times faster than psycopg adapts a dozen Python lists. Every
statement is set-based (one statement per table per batch) and runs in a transaction holding the symbol's
``pg_advisory_xact_lock`` (transaction-scoped, so it is safe through pgbouncer's transaction pooling).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import Connection, Engine

from exchange.engine.types import RestingOrder, Side, StpMode
from exchange.matching.commands import LoggedCommand
from exchange.matching.effects import BatchEffects, OutboxDraft, TradeRow
from exchange.messaging.partitions import book_lock_key
from exchange.times import to_micros


def _driver(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy connection."""
    pg = conn.connection.driver_connection
    if not isinstance(pg, psycopg.Connection):
        raise TypeError(f"the matcher needs a psycopg 3 connection, not {type(pg).__name__}")
    return pg


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A pooled connection for one matcher transaction, in autocommit mode so that the queries below can carry
    their own ``BEGIN``/``COMMIT`` (the pool restores the default mode on return).

    Invariant: the connection goes back to the pool outside any transaction. One still open when the block ends
    (an exception, or a batch that found nothing to do) is rolled back here; a broken connection is discarded."""
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        pg = _driver(conn)
        try:
            yield conn
        finally:
            if pg.broken:
                conn.invalidate()
            elif pg.info.transaction_status != TransactionStatus.IDLE:
                pg.rollback()


def _send(conn: Connection, statements: Sequence[str], params: dict[str, Any]) -> psycopg.ClientCursor[Any]:
    """Run ``statements`` as one query message (one round trip); the cursor is on the first one's result."""
    cursor = psycopg.ClientCursor(_driver(conn))
    cursor.execute(";\n".join(statements), params)
    return cursor


@dataclass(frozen=True, slots=True)
class BatchStart:
    version: int
    """``symbols.book_version`` under the lock."""
    now: datetime
    """The database clock after the lock is held: every matcher process on every host uses this one clock."""
    commands: list[LoggedCommand]


_LOCK = "SELECT pg_advisory_xact_lock(%(key)s)"
_VERSION = "SELECT book_version, clock_timestamp() FROM symbols WHERE symbol = %(symbol)s"
_NEW_SYMBOL = """
INSERT INTO symbols (symbol) VALUES (%(symbol)s)
ON CONFLICT (symbol) DO UPDATE SET symbol = EXCLUDED.symbol
RETURNING book_version, clock_timestamp()
"""
_PENDING = """
SELECT c.seq, c.kind, c.order_id, c.payload, o.broker_id, o.document_number, o.side, o.order_type,
       o.time_in_force, o.price, o.quantity, o.valid_until, o.stp
FROM commands c LEFT JOIN orders o ON o.id = c.order_id
WHERE c.symbol = %(symbol)s AND c.processed_at IS NULL
ORDER BY c.seq
LIMIT %(limit)s
"""


def begin_batch(conn: Connection, symbol: str, limit: int) -> BatchStart:
    """Open the transaction, take the symbol's lock (waits for the current holder) and read the book version, the
    clock and up to ``limit`` unprocessed commands in sequence order: one round trip (two for a new symbol).

    Each command is marked processed individually (no watermark): a command whose transaction commits late is simply
    found by a later batch."""
    params = {"key": book_lock_key(symbol), "symbol": symbol, "limit": limit}
    cursor = _send(conn, ("BEGIN", _LOCK, _VERSION, _PENDING), params)
    cursor.nextset()  # BEGIN -> lock
    cursor.nextset()  # lock -> version
    row = cursor.fetchone()
    cursor.nextset()  # version -> pending
    commands = [LoggedCommand(*r) for r in cursor.fetchall()]
    if row is None:
        row = _send(conn, (_NEW_SYMBOL,), {"symbol": symbol}).fetchone()
    if row is None:
        raise RuntimeError(f"no symbols row for {symbol}")  # unreachable: an upsert with RETURNING returns its row
    return BatchStart(int(row[0]), row[1], commands)


_OPEN_ORDERS = """
SELECT id, broker_id, document_number, side, price, quantity, remaining, priority, valid_until, stp
FROM orders
WHERE symbol = %(symbol)s AND status = 'open'
ORDER BY priority
"""


def open_orders(conn: Connection, symbol: str) -> list[RestingOrder]:
    """The resting orders of ``symbol`` in priority order: the input of ``OrderBook.rebuild``."""
    return [
        RestingOrder(
            order_id=order_id,
            broker_id=broker_id,
            document_number=document_number,
            side=Side(side),
            price=price,
            quantity=quantity,
            remaining=remaining,
            priority=priority,
            valid_until=None if valid_until is None else to_micros(valid_until),
            stp=StpMode(stp),
        )
        for order_id, broker_id, document_number, side, price, quantity, remaining, priority, valid_until, stp in (
            _driver(conn).execute(_OPEN_ORDERS, {"symbol": symbol})
        )
    ]


@dataclass(frozen=True, slots=True)
class QuarantinedCommand:
    seq: int
    kind: str
    order_id: UUID | None


_QUARANTINE = """
WITH first AS (
    UPDATE commands SET processed_at = clock_timestamp()
    WHERE seq = (SELECT seq FROM commands WHERE symbol = %(symbol)s AND processed_at IS NULL ORDER BY seq LIMIT 1)
    RETURNING seq, kind, order_id
), rejected AS (
    UPDATE orders SET status = 'closed', close_reason = 'rejected', updated_at = clock_timestamp()
    FROM first
    WHERE first.kind = 'place' AND orders.id = first.order_id AND orders.status = 'pending'
)
SELECT seq, kind, order_id FROM first
"""


def quarantine_first_pending(conn: Connection, symbol: str) -> QuarantinedCommand | None:
    """In a transaction of its own under the symbol's lock: mark the first pending command of ``symbol`` processed
    without applying it, and close its order ``rejected`` if the order never reached the book (a place)."""
    cursor = _send(conn, ("BEGIN", _LOCK, _QUARANTINE, "COMMIT"), {"key": book_lock_key(symbol), "symbol": symbol})
    cursor.nextset()  # BEGIN -> lock
    cursor.nextset()  # lock -> quarantine
    row = cursor.fetchone()
    return None if row is None else QuarantinedCommand(*row)


_UPDATE_ORDERS = """
UPDATE orders AS o
SET status = v.status,
    remaining = COALESCE(v.remaining, o.remaining),
    close_reason = v.close_reason,
    priority = v.priority,
    price = COALESCE(v.price, o.price),
    quantity = COALESCE(v.quantity, o.quantity),
    updated_at = %(now)s
FROM json_to_recordset(%(orders)s::json)
     AS v(order_id uuid, status text, remaining bigint, close_reason text, priority bigint, price bigint,
          quantity bigint)
WHERE o.id = v.order_id
"""

_INSERT_TRADES = """
INSERT INTO trades (id, symbol, price, quantity, buy_order_id, sell_order_id, buy_broker_id, sell_broker_id,
                    maker_order_id, taker_side, command_seq, match_no, executed_at)
SELECT v.id, %(symbol)s, v.price, v.quantity, v.buy_order_id, v.sell_order_id, v.buy_broker_id, v.sell_broker_id,
       v.maker_order_id, v.taker_side, v.seq, v.match_no, %(now)s
FROM json_to_recordset(%(trades)s::json)
     AS v(id uuid, price bigint, quantity bigint, buy_order_id uuid, sell_order_id uuid, buy_broker_id uuid,
          sell_broker_id uuid, maker_order_id uuid, taker_side text, seq bigint, match_no int)
"""

# Two matchers on different symbols touching the same brokers must queue in one order instead of deadlocking, so
# the rows are locked in id order (the sorted LockRows of the CTE) before the UPDATE changes them: the UPDATE can
# only reach a row through ``locked``, i.e. after the CTE has locked it, so it takes no lock of its own out of
# order. NO KEY UPDATE (only balance/event_seq change) does not conflict with the KEY SHARE lock every order
# INSERT's foreign-key check takes, so accepts never wait on us. A row updated by another transaction between
# this statement's snapshot and our lock is re-read at its newest version (READ COMMITTED re-check), so no
# increment is lost.
_UPDATE_BROKERS = """
WITH v AS MATERIALIZED (
    SELECT * FROM json_to_recordset(%(brokers)s::json) AS v(id uuid, delta bigint, events bigint)
), locked AS MATERIALIZED (
    SELECT id FROM brokers WHERE id IN (SELECT id FROM v) ORDER BY id FOR NO KEY UPDATE
)
UPDATE brokers AS b
SET balance = b.balance + v.delta, event_seq = b.event_seq + v.events
FROM v
WHERE b.id = v.id AND b.id IN (SELECT id FROM locked)
"""

# Runs after _UPDATE_BROKERS in the same transaction, so ``b.event_seq`` already counts this batch's events: a
# broker's k-th event of the batch (in draft order) gets ``event_seq - count + k``, which continues its sequence
# without a gap. The sequence and the order's document/client ids are added to the payload here, in SQL.
_INSERT_OUTBOX = """
INSERT INTO webhook_events (id, broker_id, sequence, type, order_id, trade_id, payload, created_at,
                            next_attempt_at)
SELECT e.id, e.broker_id, e.sequence, e.type, e.order_id, e.trade_id,
       e.payload || jsonb_build_object('sequence', e.sequence, 'document_number', o.document_number,
                                       'client_order_id', o.client_order_id),
       %(now)s, %(now)s
FROM (
    SELECT v.*, b.event_seq - count(*) OVER (PARTITION BY v.broker_id)
                + row_number() OVER (PARTITION BY v.broker_id ORDER BY v.n) AS sequence
    FROM ROWS FROM (json_to_recordset(%(events)s::json)
                    AS (id uuid, broker_id uuid, type text, order_id uuid, trade_id uuid, payload jsonb))
         WITH ORDINALITY AS v(id, broker_id, type, order_id, trade_id, payload, n)
    JOIN brokers b ON b.id = v.broker_id
) e
LEFT JOIN orders o ON o.id = e.order_id
"""

_UPSERT_POSITIONS = """
INSERT INTO positions (broker_id, symbol, quantity, updated_at)
SELECT key::uuid, %(symbol)s, value::bigint, %(now)s FROM json_each_text(%(shares)s::json)
ON CONFLICT (broker_id, symbol)
DO UPDATE SET quantity = positions.quantity + EXCLUDED.quantity, updated_at = EXCLUDED.updated_at
"""

_FINISH = """
WITH processed AS (
    UPDATE commands SET processed_at = %(now)s WHERE seq = ANY(%(seqs)s::bigint[])
)
UPDATE symbols
SET book_version = book_version + 1,
    last_price = COALESCE(%(price)s::bigint, last_price),
    last_trade_at = CASE WHEN %(price)s::bigint IS NULL THEN last_trade_at ELSE %(now)s END
WHERE symbol = %(symbol)s
"""


def write_batch(
    conn: Connection, symbol: str, now: datetime, plan: BatchEffects, processed_seqs: Sequence[int]
) -> list[UUID]:
    """Write one batch's effects, mark its commands processed, bump the book version and COMMIT: one round trip.
    Returns the ids of the outbox events written."""
    trade_ids = {(t.seq, t.match_no): uuid.uuid4() for t in plan.trades}
    event_ids = [uuid.uuid4() for _ in plan.outbox]
    params: dict[str, Any] = {
        "symbol": symbol,
        "now": now,
        "price": plan.last_price,
        "seqs": "{" + ",".join(map(str, processed_seqs)) + "}",
    }
    statements: list[str] = []
    for statement, name, rows in (
        (_UPDATE_ORDERS, "orders", list(plan.orders.values())),
        (_INSERT_TRADES, "trades", _trade_rows(plan.trades, trade_ids)),
        (_UPDATE_BROKERS, "brokers", _broker_rows(plan)),
        (_INSERT_OUTBOX, "events", _event_rows(plan.outbox, event_ids, trade_ids, symbol, now)),
        (_UPSERT_POSITIONS, "shares", plan.shares),
    ):
        if rows:  # a statement per table that has rows, in this order (the outbox reads the brokers' new event_seq)
            statements.append(statement)
            params[name] = msgspec.json.encode(rows).decode()
    _send(conn, [*statements, _FINISH, "COMMIT"], params)
    return event_ids


def _trade_rows(trades: list[TradeRow], trade_ids: dict[tuple[int, int], UUID]) -> list[dict[str, Any]]:
    return [
        {
            "id": trade_ids[(t.seq, t.match_no)],
            "price": t.price,
            "quantity": t.quantity,
            "buy_order_id": t.buy_order_id,
            "sell_order_id": t.sell_order_id,
            "buy_broker_id": t.buy_broker_id,
            "sell_broker_id": t.sell_broker_id,
            "maker_order_id": t.maker_order_id,
            "taker_side": t.taker_side,
            "seq": t.seq,
            "match_no": t.match_no,
        }
        for t in trades
    ]


def _broker_rows(plan: BatchEffects) -> list[dict[str, Any]]:
    """Cash delta and number of outbox events of every broker the batch touches."""
    events: dict[UUID, int] = {}
    for draft in plan.outbox:
        events[draft.broker_id] = events.get(draft.broker_id, 0) + 1
    return [{"id": b, "delta": plan.cash.get(b, 0), "events": events.get(b, 0)} for b in plan.touched_brokers]


def _event_rows(
    drafts: list[OutboxDraft],
    event_ids: list[UUID],
    trade_ids: dict[tuple[int, int], UUID],
    symbol: str,
    now: datetime,
) -> list[dict[str, Any]]:
    """Outbox rows in draft order: the order each broker's sequence numbers follow."""
    rows = []
    for draft, event_id in zip(drafts, event_ids, strict=True):
        trade_id = None if draft.fill is None else trade_ids[(draft.fill.seq, draft.fill.match_no)]
        payload = _event_payload(draft, event_id, symbol, now, trade_id)
        rows.append(
            {
                "id": event_id,
                "broker_id": draft.broker_id,
                "type": draft.type,
                "order_id": draft.order_id,
                "trade_id": trade_id,
                "payload": payload,
            }
        )
    return rows


def _event_payload(
    draft: OutboxDraft, event_id: UUID, symbol: str, now: datetime, trade_id: UUID | None
) -> dict[str, Any]:
    """The webhook body (DESIGN §5): the seed's fields plus event id and type. The per-broker ``sequence`` and the
    order's ``document_number``/``client_order_id`` are added by ``_INSERT_OUTBOX``."""
    body: dict[str, Any] = {
        "event_id": str(event_id),
        "type": draft.type,
        "order_id": str(draft.order_id),
        "symbol": symbol,
        "side": None if draft.side is None else draft.side.value,
        "order_remaining_quantity": draft.remaining,
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

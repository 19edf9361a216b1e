"""SQL of the matcher's transaction: lock the books, read their pending commands, write one batch's effects.

A batch covers one symbol or several (up to the service's cap, all of one partition in practice) and costs two
round trips to PostgreSQL (through pgbouncer), whatever its size and its number of symbols:

1. :func:`begin_batch`: ``BEGIN`` with a bound on how long the transaction may then sit idle
   (:data:`~exchange.db.engines.BOUNDED_BEGIN`: a matcher frozen between its two round trips frees its books for
   the others after the limit, and when it wakes its write fails and it drops the books it cached),
   the symbols' advisory locks (in ascending key order), the database clock, their book versions, and up to a
   limit of pending commands per symbol;
2. :func:`write_batch`: every write of every book of the batch (rows carry their symbol) in one call of the
   PL/pgSQL function ``matcher_write`` (alembic revision 0005, as revision 0008 left it: its statements keep their
   plans in the server backend instead of being parsed and planned on every batch), then ``COMMIT``.

Each is ONE query message holding several statements (the simple query protocol; psycopg's ``ClientCursor`` binds
the parameters on the client as quoted literals, escaped by libpq). PostgreSQL runs the statements one after the
other, so nothing changes for the transaction except the waiting. In particular a statement after the locks still
takes its READ COMMITTED snapshot when it starts, i.e. after every lock is granted, so it sees everything the
previous holders committed (PostgreSQL releases a transaction's locks only after its commit is visible). That is
also why the locks and the reads stay separate statements: one statement's snapshot is taken before its lock wait.

Deadlock freedom: every transaction here takes its book locks first, all in one statement in ascending key order,
and only then row locks; the broker rows, the only rows two books' batches share, are locked in id order. A
transaction holding several book locks therefore never waits for a lock held by a transaction that waits for it.

The connection is in autocommit mode meanwhile (:func:`connect`) so that psycopg sends no ``BEGIN`` of its own
(one more round trip): the transaction is the explicit ``BEGIN`` … ``COMMIT`` of the two messages. psycopg's
pipeline mode with the same explicit ``BEGIN``/``COMMIT`` also takes one round trip per message, but its
per-statement protocol work cost twice the client CPU per batch (1.1 vs 0.5 ms in ``ops/bench_matcher.py``).

Rows go to PostgreSQL as one JSON document per table (``json_to_recordset``), not as one array parameter per
column: msgspec encodes a batch's rows several times faster than psycopg adapts a dozen Python lists. The planner
takes every ``json_to_recordset`` for 100 rows, so a join of one with ``orders`` hashed the whole table (a
sequential scan per batch) while it held some 3,000 to 20,000 orders; the statements that join ``orders`` therefore
also name the order ids as an array (``o.id = ANY(…)``), so the planner weighs primary-key probes against the
scan: in ``matcher_write``'s generic plans an array parameter counts as 10 ids, whatever the table's size
(``tests/integration/test_query_plans.py``). Every statement is set-based (one statement per table per batch,
whatever the number of books) and runs in a transaction holding the books' ``pg_advisory_xact_lock``
(transaction-scoped, so it is safe through pgbouncer's transaction pooling).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import Connection, Engine

from exchange.db.arrays import array_literal
from exchange.db.engines import BOUNDED_BEGIN_STATEMENTS, pooled_engine, statement_failed
from exchange.db.errors import is_deterministic
from exchange.engine.types import CloseReason, RestingOrder, Side, StpMode
from exchange.matching.commands import LoggedCommand
from exchange.matching.effects import UNPROCESSABLE, BatchEffects, OutboxDraft, TradeRow, plan_rejected_place
from exchange.messaging.partitions import book_lock_key
from exchange.times import to_micros

log = logging.getLogger(__name__)


def _driver(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy connection."""
    pg = conn.connection.driver_connection
    if not isinstance(pg, psycopg.Connection):
        raise TypeError(f"the matcher needs a psycopg 3 connection, not {type(pg).__name__}")
    return pg


def matcher_engine(url: str, *, pool_size: int) -> Engine:
    """The matcher's engine: pooled (through pgbouncer), with connections in autocommit mode from the start, since
    every query of this module carries its own ``BEGIN``/``COMMIT`` (see :func:`connect`)."""
    return pooled_engine(url, pool_size=pool_size, max_overflow=1, isolation_level="AUTOCOMMIT")


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A pooled connection for one matcher transaction, in autocommit mode so that the queries below can carry
    their own ``BEGIN``/``COMMIT``. :func:`matcher_engine`'s connections are in that mode already; one of any other
    engine is switched for the block (its pool restores the mode on return: ~25 µs of CPU per transaction on the
    project's machines, which the matcher's own engine saves).

    Invariant: the connection goes back to the pool outside any transaction. One still open when the block ends
    (an exception, or a batch that found nothing to do) is rolled back here; a broken connection, or one whose
    statement raised an error that leaves it unusable (:func:`~exchange.db.engines.statement_failed`:
    the statements here run on psycopg cursors, out of the reach of the engine's own rule), is discarded."""
    with engine.connect() as conn:
        pg = _driver(conn)
        if not pg.autocommit:
            conn.execution_options(isolation_level="AUTOCOMMIT")
        unusable = False
        try:
            yield conn
        except psycopg.Error as exc:
            unusable = statement_failed(exc)
            raise
        finally:
            if unusable or pg.closed:  # closed: broken, or invalidated by SQLAlchemy already (then a no-op)
                conn.invalidate()
            elif pg.info.transaction_status != TransactionStatus.IDLE:
                pg.rollback()


def _send(conn: Connection, statements: Sequence[str], params: dict[str, Any]) -> psycopg.ClientCursor[Any]:
    """Run ``statements`` as one query message (one round trip); the cursor is on the first one's result."""
    cursor = psycopg.ClientCursor(_driver(conn))
    cursor.execute(";\n".join(statements), params)
    return cursor


def _send_bounded(conn: Connection, statements: Sequence[str], params: dict[str, Any]) -> psycopg.ClientCursor[Any]:
    """:func:`_send` of ``statements`` in a new bounded transaction (:data:`BOUNDED_BEGIN_STATEMENTS` first); the
    cursor is on the first of ``statements``' results."""
    cursor = _send(conn, (*BOUNDED_BEGIN_STATEMENTS, *statements), params)
    for _ in BOUNDED_BEGIN_STATEMENTS:
        cursor.nextset()
    return cursor


@dataclass(frozen=True, slots=True)
class BatchStart:
    now: datetime
    """The database clock after every lock is held: every matcher process on every host uses this one clock."""
    versions: dict[str, int]
    """``symbols.book_version`` under the lock, of every symbol that has pending commands."""
    commands: dict[str, list[LoggedCommand]]
    """Up to the limit of pending commands of each symbol, in sequence order (symbols with none are absent)."""


# The symbols' locks in one statement, in the order of the (sorted) array: a function scan over ``unnest`` emits
# the elements in array order and the lock call is evaluated row by row as they come. Every transaction that holds
# several book locks takes them in ascending key order, so two of them never wait on each other in a cycle.
_LOCK = "SELECT pg_advisory_xact_lock(k) FROM unnest(%(keys)s::bigint[]) AS k"
# The same locks, then each symbol's book version and the clock read after every lock is held, in one call
# (alembic 0013: a PL/pgSQL function, planned once per server connection).
_LOCK_VERSIONS = "SELECT * FROM matcher_lock(%(keys)s::bigint[], %(symbols)s::text[])"
_NEW_SYMBOLS = """
INSERT INTO symbols (symbol) SELECT unnest(%(symbols)s::text[])
ON CONFLICT (symbol) DO UPDATE SET symbol = EXCLUDED.symbol
RETURNING symbol, book_version, clock_timestamp()
"""
# Up to ``limit`` unprocessed commands of each symbol with their orders, in sequence order (alembic 0010: a
# PL/pgSQL function, so that its plan is made once per server connection instead of on every call).
_PENDING = "SELECT * FROM matcher_pending(%(symbols)s::text[], %(limit)s)"


def begin_batch(conn: Connection, symbols: Sequence[str], limit: int) -> BatchStart:
    """Open the transaction, take the locks of ``symbols`` (distinct) in ascending key order (waits for their
    holders), and read the clock, the book versions and up to ``limit`` unprocessed commands per symbol in sequence
    order: one round trip (two when a symbol with commands has no ``symbols`` row yet).

    Each command is marked processed individually (no watermark): a command whose transaction commits late is simply
    found by a later batch."""
    wanted = list(symbols)
    keys = sorted(book_lock_key(symbol) for symbol in wanted)
    params = {"keys": array_literal(keys), "symbols": array_literal(wanted), "limit": limit}
    cursor = _send_bounded(conn, (_LOCK_VERSIONS, _PENDING), params)  # on the locks and versions
    versions: dict[str, int] = {}
    clocks: list[datetime] = []
    for symbol, version, clock in cursor.fetchall():
        versions[symbol] = int(version)
        clocks.append(clock)
    cursor.nextset()  # versions -> pending
    commands: dict[str, list[LoggedCommand]] = {}
    for symbol, *rest in cursor.fetchall():
        commands.setdefault(symbol, []).append(LoggedCommand(*rest))
    if missing := [symbol for symbol in commands if symbol not in versions]:
        # The api never touches ``symbols`` (its hot path stays two inserts): the matcher creates the row.
        for symbol, version, clock in _send(conn, (_NEW_SYMBOLS,), {"symbols": array_literal(missing)}).fetchall():
            versions[symbol] = int(version)
            clocks.append(clock)
    now = max(clocks) if clocks else datetime.now(UTC)  # no clock: no symbol row and no command, nothing to do
    return BatchStart(now, {symbol: versions[symbol] for symbol in commands}, commands)


REBUILD_CHUNK = 2000
"""Open orders per round trip of a rebuild (:func:`stream_open_orders`): ~10 ms of the matcher's CPU to decode
and add to the book on the project's machines (the longest gap between two round trips of a 400,000-order rebuild
was 58 ms with the machine loaded, 0.24 s with 5,000 a chunk), against a round trip of ~0.3 ms."""

# In the order of ix_orders_open_book (an index scan: no sort of a whole book before its first row, and a cursor
# reads only as much of it as is fetched). ``OrderBook.rebuild`` needs each price level in priority order only.
_OPEN_ORDERS = """
SELECT symbol, id, broker_id, document_number, side, price, quantity, remaining, priority, valid_until, stp
FROM orders
WHERE symbol = ANY(%(symbols)s::text[]) AND close_reason IS NULL AND status = 'open'  -- see ix_orders_open_book
ORDER BY symbol, side, price, priority
"""
_OPEN_ORDERS_CURSOR = "matcher_open_orders"
_DECLARE_OPEN_ORDERS = f"DECLARE {_OPEN_ORDERS_CURSOR} NO SCROLL CURSOR FOR {_OPEN_ORDERS}"
_FETCH_OPEN_ORDERS = f"FETCH FORWARD %(chunk)s FROM {_OPEN_ORDERS_CURSOR}"
_SIDES: dict[str, Side] = {side.value: side for side in Side}
_STP_MODES: dict[str, StpMode] = {mode.value: mode for mode in StpMode}


def stream_open_orders(
    conn: Connection, symbols: Sequence[str], *, chunk: int | None = None
) -> Iterator[tuple[str, RestingOrder]]:
    """The resting orders of ``symbols`` (inside the caller's transaction), by symbol and, within each price level,
    in priority order (the input of ``OrderBook.rebuild``), read ``chunk`` (:data:`REBUILD_CHUNK`) at a time through
    a server-side cursor: the next chunk is fetched only when the previous one has been consumed.

    Why: the matcher's transaction may sit idle between two round trips only
    :data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS`. A book of 400,000 orders read in one result took seconds of
    the matcher's CPU to decode and rebuild after PostgreSQL had sent its last row, and the server ended the
    session every time. Each ``FETCH`` is a statement, so a consumer that rebuilds as it reads leaves the
    transaction idle for one chunk's work at most, whatever the book's size; and a matcher frozen mid-rebuild still
    frees its books after the limit. A book smaller than ``chunk`` costs the one round trip it cost before (the
    ``DECLARE`` and the first ``FETCH`` are one query message); the cursor ends with the transaction. Works through
    pgbouncer's transaction pooling: the cursor lives and dies inside one transaction."""
    chunk = chunk or REBUILD_CHUNK
    params = {"symbols": array_literal(symbols), "chunk": chunk}
    cursor = _send(conn, (_DECLARE_OPEN_ORDERS, _FETCH_OPEN_ORDERS), params)
    cursor.nextset()  # DECLARE -> first FETCH
    sides, modes = _SIDES, _STP_MODES
    while True:
        rows = cursor.fetchall()
        for row in rows:
            (
                symbol,
                order_id,
                broker_id,
                document_number,
                side,
                price,
                quantity,
                remaining,
                priority,
                valid_until,
                stp,
            ) = row
            yield (
                symbol,
                RestingOrder(
                    order_id,
                    broker_id,
                    document_number,
                    sides[side],
                    price,
                    quantity,
                    remaining,
                    priority,
                    None if valid_until is None else to_micros(valid_until),
                    modes[stp],
                ),
            )
        if len(rows) < chunk:
            return
        cursor.execute(_FETCH_OPEN_ORDERS, {"chunk": chunk})


def open_orders(conn: Connection, symbols: Sequence[str]) -> dict[str, list[RestingOrder]]:
    """:func:`stream_open_orders` of ``symbols`` read whole, by symbol (every one of ``symbols`` is a key)."""
    books: dict[str, list[RestingOrder]] = {symbol: [] for symbol in symbols}
    for symbol, order in stream_open_orders(conn, symbols):
        books[symbol].append(order)
    return books


def ping(conn: Connection) -> None:
    """One round trip that only the database's own failure fails."""
    _driver(conn).execute("SELECT 1").fetchall()


@dataclass(frozen=True, slots=True)
class QuarantinedCommand:
    seq: int
    kind: str
    order_id: UUID | None
    event_ids: list[UUID]
    """The outbox events written with it (the ``order.rejected`` of a place), to hand to the webhook queue."""


# The symbol's first pending command, with the order a place would have put on the book (NULLs for a command row
# without one: the malformed rows a quarantine is for), and the database clock.
_FIRST_PENDING = """
SELECT c.seq, c.kind, c.order_id, o.broker_id, o.side, o.quantity, o.status = 'pending', clock_timestamp()
FROM (SELECT seq, kind, order_id FROM commands WHERE symbol = %(symbol)s AND processed_at IS NULL
      ORDER BY seq LIMIT 1) AS c
LEFT JOIN orders AS o ON o.id = c.order_id
"""
# The last resort when even the rejection cannot be written (see :func:`quarantine_command`).
_QUARANTINE_BARE = """
WITH first AS (
    UPDATE commands SET processed_at = clock_timestamp(), rejected_reason = %(unprocessable)s
    WHERE seq = %(seq)s AND processed_at IS NULL
      AND seq = (SELECT seq FROM commands WHERE symbol = %(symbol)s AND processed_at IS NULL ORDER BY seq LIMIT 1)
    RETURNING kind, order_id
), rejected AS (
    UPDATE orders SET status = 'closed', close_reason = 'rejected', updated_at = clock_timestamp()
    FROM first WHERE first.kind = 'place' AND orders.id = first.order_id AND orders.status = 'pending'
)
SELECT count(*) FROM first
"""


def quarantine_command(conn: Connection, symbol: str, seq: int) -> QuarantinedCommand | None:
    """Under the symbol's lock: mark command ``seq`` of ``symbol`` processed without applying it and, if it is a
    place whose order never reached the book, close that order ``rejected`` and tell its broker
    (``order.rejected``, reject reason :data:`~exchange.matching.effects.UNPROCESSABLE`), written by
    :func:`write_batch` like any batch. Only while ``seq`` is still the symbol's first pending command (None
    otherwise): commands apply in sequence order, so one with a lower number that committed after ``seq`` failed
    must be applied first, and is not the one that failed.

    A quarantine must never fail for its data, or the symbol would stay wedged behind the command: if the
    rejection's own write is refused (say, the broker's event sequence is exhausted), the command is marked
    processed and its order closed without the event."""
    params = {"keys": array_literal([book_lock_key(symbol)]), "symbol": symbol, "seq": seq}
    params["unprocessable"] = UNPROCESSABLE  # the bare quarantine's reject reason
    cursor = _send_bounded(conn, (_LOCK, _FIRST_PENDING), params)
    cursor.nextset()  # lock -> first pending
    row = cursor.fetchone()
    if row is None or row[0] != seq:
        _driver(conn).rollback()
        return None
    _, kind, order_id, broker_id, side, quantity, pending, now = row
    plan = BatchEffects(rejected={seq: UNPROCESSABLE})
    if kind == "place" and pending:
        plan_rejected_place(plan, seq, order_id, broker_id, Side(side), quantity, UNPROCESSABLE)
    try:
        written = write_batch(conn, now, [BookBatch(symbol, plan, [seq])])
    except psycopg.Error as exc:
        if not is_deterministic(exc):
            raise
        log.error("the rejection of command seq=%s of %s was refused (%s); quarantined without it", seq, symbol, exc)
        _driver(conn).rollback()
        cursor = _send_bounded(conn, (_LOCK, _QUARANTINE_BARE, "COMMIT"), params)
        cursor.nextset()  # lock -> quarantine
        [(marked,)] = cursor.fetchall()
        # Between the two transactions another matcher may have processed it, or a lower seq committed: not it.
        return QuarantinedCommand(seq, kind, order_id, []) if marked else None
    return QuarantinedCommand(seq, kind, order_id, written.event_ids[symbol])


# One call of ``matcher_write`` (alembic revision 0005, where the statements' comments live; 0008 holds the current
# text, which reaches brokers by primary key only): updates the
# orders, inserts the trades, updates the brokers' cash and event sequence (rows locked in id order, as the webhook
# recorder locks them: no deadlock), inserts the outbox events (their per-broker sequence continues the brokers'
# without a gap), upserts the positions, marks the commands processed and bumps each book's version. A table with
# no rows in the batch gets NULL and is not written. Returns the id and name of every broker row it updated.
_WRITE = """
SELECT id, name FROM matcher_write(
    %(now)s, %(orders)s::json, %(order_ids)s::uuid[], %(trades)s::json, %(brokers)s::json, %(events)s::json,
    %(event_order_ids)s::uuid[], %(shares)s::json, %(seqs)s::bigint[], %(books)s::text[], %(prices)s::bigint[]
)
"""


@dataclass(frozen=True, slots=True)
class BookBatch:
    """What one book's batch writes: the plan of its commands and their sequence numbers."""

    symbol: str
    plan: BatchEffects
    seqs: Sequence[int]


@dataclass(frozen=True, slots=True)
class Written:
    event_ids: dict[str, list[UUID]]
    """The outbox events written, by symbol."""
    trade_ids: dict[tuple[int, int], UUID]
    """The trades written, by (command sequence, match number)."""
    broker_names: dict[UUID, str]
    """The name of every broker whose row the batch updated (every side of every trade)."""


def write_batch(conn: Connection, now: datetime, books: Sequence[BookBatch]) -> Written:
    """Write the effects of every book's batch, mark their commands processed, bump each book's version and COMMIT:
    one round trip, one ``matcher_write`` call whatever the number of books (rows carry their symbol; one JSON
    document per table)."""
    trade_ids = {(t.seq, t.match_no): uuid.uuid4() for b in books for t in b.plan.trades}
    event_ids = {b.symbol: [uuid.uuid4() for _ in b.plan.outbox] for b in books}
    params: dict[str, Any] = {
        "now": now,
        "seqs": array_literal(seq for b in books for seq in b.seqs),
        "books": array_literal(b.symbol for b in books),
        "prices": array_literal(b.plan.last_price for b in books),
    }
    order_updates = [update for b in books for update in b.plan.orders.values()]
    events = [row for b in books for row in _event_rows(b.plan.outbox, event_ids[b.symbol], trade_ids, b.symbol, now)]
    params["order_ids"] = array_literal(update.order_id for update in order_updates)
    params["event_order_ids"] = array_literal(dict.fromkeys(event["order_id"] for event in events))
    for name, rows in (
        ("orders", order_updates),
        ("trades", [row for b in books for row in _trade_rows(b.symbol, b.plan.trades, trade_ids)]),
        ("brokers", _broker_rows(books)),
        ("events", events),
        (
            "shares",
            [{"broker_id": k, "symbol": b.symbol, "quantity": v} for b in books for k, v in b.plan.shares.items()],
        ),
    ):
        params[name] = msgspec.json.encode(rows).decode() if rows else None
    rejected = {seq: reason for b in books for seq, reason in b.plan.rejected.items()}
    statements: tuple[str, ...] = (_WRITE, "COMMIT")
    if rejected:  # rare: a statement more only when a command was rejected
        params["rejected_seqs"] = array_literal(rejected)
        params["rejected_reasons"] = array_literal(rejected.values())
        statements = (_WRITE, _REJECTED, "COMMIT")
    names: dict[UUID, str] = dict(_send(conn, statements, params).fetchall())
    return Written(event_ids, trade_ids, names)


# The reject reasons of the batch's rejected commands, on their rows (alembic 0027), beside matcher_write's
# processed_at: in the same transaction.
_REJECTED = """
UPDATE commands AS c SET rejected_reason = v.reason
FROM unnest(CAST(%(rejected_seqs)s AS bigint[]), CAST(%(rejected_reasons)s AS text[])) AS v(seq, reason)
WHERE c.seq = v.seq
"""


def _trade_rows(symbol: str, trades: list[TradeRow], trade_ids: dict[tuple[int, int], UUID]) -> list[dict[str, Any]]:
    return [
        {
            "id": trade_ids[(t.seq, t.match_no)],
            "symbol": symbol,
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


def _broker_rows(books: Sequence[BookBatch]) -> list[dict[str, Any]]:
    """Cash delta and number of outbox events of every broker the batch touches (summed over its books), in id
    order."""
    cash: dict[UUID, int] = {}
    events: dict[UUID, int] = {}
    for book in books:
        for broker_id in book.plan.touched_brokers:
            cash.setdefault(broker_id, 0)
            events.setdefault(broker_id, 0)
        for broker_id, delta in book.plan.cash.items():
            cash[broker_id] += delta
        for draft in book.plan.outbox:
            events[draft.broker_id] += 1
    return [{"id": b, "delta": cash[b], "events": events[b]} for b in sorted(cash)]


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
    order's ``document_number``/``client_order_id`` are added by ``matcher_write``."""
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
        if draft.reject_reason is not None:
            body["reject_reason"] = draft.reject_reason
    elif draft.decrement is not None:
        body.update(
            event="order_decremented",
            reason=CloseReason.SELF_TRADE.value,
            quantity=draft.decrement.quantity,
            occurred_at=now.isoformat(),
        )
    return body

"""The accept path: turn a broker's request into durable rows of ``orders`` and the command log.

Invariants:

* One transaction per call, but :func:`cancel_all`: one per chunk of its orders, each whole or absent. Orders and
  their ``place`` commands are inserted by ONE statement (the function ``accept_orders``, alembic 0011) per group
  of concurrent requests (group commit, see :mod:`exchange.api.coalescing`) and each order shares its command's
  sequence number (``orders.seq`` = ``commands.seq``, also its ``priority``); nothing is written when validation
  fails.
* Duplicates are safe under concurrency: ``INSERT … ON CONFLICT DO NOTHING`` on the broker's
  ``client_order_id``/``idempotency_key`` unique indexes, then the original order is read back. A concurrent
  duplicate waits for the first insert to commit (or roll back) inside PostgreSQL, so exactly one order exists.
  A group in which no order carries either key is inserted without ``ON CONFLICT`` (alembic 0025: no conflict
  probes of every unique index): a uuid4 collision there fails the group on the primary key, then only its order.
* A cancel or amend command is written only for the broker's own order and only while it is not closed.
  Concurrent cancels of one order write one command: cancels serialise on a per-order advisory lock (taken in
  sorted order for a group), an amend on the order's row (``FOR NO KEY UPDATE``: does not block the matcher's
  foreign-key checks).
* No wake-up, waiting or Redis here: the caller does that after the commit (see :mod:`exchange.api.services`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg

from exchange.db.arrays import array_literal
from exchange.db.engines import AsyncPgConnection, AsyncPool, single_statement
from exchange.db.errors import is_deterministic, is_retryable
from exchange.db.tables import CommandKind, OrderStatus
from exchange.engine.types import OrderType, RejectReason, StpMode, TimeInForce
from exchange.orders.errors import (
    AmendRejectedError,
    IdempotencyKeyReusedError,
    InvalidOrderError,
    OrderClosedError,
    OrderNotFoundError,
    OrderServiceError,
    ValidUntilPassedError,
)
from exchange.orders.models import CommandResult, NewOrder, PlaceResult

# Also the OpenAPI schema's "pattern", an ECMA-262 regex, which has no \A or \Z: "^...$(?!\n)" means the same in
# both ($ alone also matches before a final newline in Python; in ECMA-262 the lookahead is always true at the end).
SYMBOL_RE = re.compile(r"^[A-Za-z0-9.]{1,10}$(?!\n)")


def normalize_symbol(symbol: str) -> str:
    """Upper-case a ticker; raises :class:`InvalidOrderError` unless it is 1-10 characters of ``[A-Za-z0-9.]``."""
    if not SYMBOL_RE.match(symbol):
        raise InvalidOrderError("symbol must be 1-10 characters of A-Z, 0-9 and '.'", {"field": "symbol"})
    return symbol.upper()


def resolve_time_in_force(
    order_type: OrderType, requested: TimeInForce | None, valid_until: datetime | None, now: datetime | None
) -> tuple[TimeInForce, datetime | None]:
    """Default and check the time in force; returns ``(time_in_force, valid_until to store)``.

    Rules: ``valid_until`` must be after ``now`` (:class:`ValidUntilPassedError`; ``now`` None: not checked, for
    a retry of an order accepted before its deadline, see :func:`find_original`). Defaults: market → ``ioc``;
    limit with ``valid_until`` → ``gtd``; limit without → ``gtc``. Market orders admit only ``ioc``/``fok``;
    ``gtd`` needs ``valid_until``; ``gtc`` forbids it. An ``ioc``/``fok`` order (limit or market) may carry one
    (seed clients always send one) and it is stored like a ``gtd``'s: the order never rests, but it is matched
    after this accept, possibly much later (a matcher behind, a lost wake-up the sweeper recovers), and an order
    never trades at or after its ``valid_until`` (DESIGN §4): the engine closes it ``expired`` if its deadline
    passed before it was matched.

    ``valid_until`` comes back in UTC: an ISO 8601 offset may reach ±23:59, PostgreSQL's ``timestamptz`` input only
    ±15:59, and the instant is what is stored. One whose UTC date falls outside years 1-9999 is out of range (422).
    """
    if valid_until is not None:
        try:
            valid_until = valid_until.astimezone(UTC)
        except OverflowError:
            raise InvalidOrderError("valid_until is out of range", {"field": "valid_until"}) from None
        if now is not None and valid_until <= now:
            raise ValidUntilPassedError("valid_until must be in the future", {"field": "valid_until"})
    tif = requested
    if tif is None:
        if order_type is OrderType.MARKET:
            tif = TimeInForce.IOC
        else:
            tif = TimeInForce.GTD if valid_until is not None else TimeInForce.GTC
    if order_type is OrderType.MARKET and tif not in (TimeInForce.IOC, TimeInForce.FOK):
        raise InvalidOrderError("a market order is ioc or fok", {"field": "time_in_force"})
    if tif is TimeInForce.GTD and valid_until is None:
        raise InvalidOrderError("time_in_force gtd requires valid_until", {"field": "valid_until"})
    if tif is TimeInForce.GTC and valid_until is not None:
        raise InvalidOrderError("time_in_force gtc cannot have valid_until (use gtd)", {"field": "valid_until"})
    return tif, valid_until


def new_order(
    *,
    order_id: UUID,
    broker_id: UUID,
    document_number: str,
    symbol: str,
    side: str,
    order_type: OrderType,
    price: int | None,
    quantity: int,
    valid_until: datetime | None,
    time_in_force: TimeInForce | None,
    stp: StpMode,
    client_order_id: str | None,
    idempotency_key: str | None,
    now: datetime | None,
) -> NewOrder:
    """Validate the cross-field rules (price vs order type, time in force, expiry) and build a :class:`NewOrder`.
    ``now`` None leaves out the check that ``valid_until`` is after it (see :func:`resolve_time_in_force`)."""
    if order_type is OrderType.LIMIT and price is None:
        raise InvalidOrderError("a limit order needs a price", {"field": "price"})
    if order_type is OrderType.MARKET and price is not None:
        raise InvalidOrderError("a market order must not have a price", {"field": "price"})
    tif, stored_valid_until = resolve_time_in_force(order_type, time_in_force, valid_until, now)
    return NewOrder(
        order_id=order_id,
        broker_id=broker_id,
        document_number=document_number,
        symbol=normalize_symbol(symbol),
        side=side,
        order_type=order_type.value,
        time_in_force=tif.value,
        price=price,
        quantity=quantity,
        valid_until=stored_valid_until,
        stp=stp.value,
        client_order_id=client_order_id,
        idempotency_key=idempotency_key,
    )


# The group's orders and their place commands, in the arrays' order, skipping the duplicates of a unique key;
# returns the inserted orders (alembic 0011: a PL/pgSQL function, planned once per server connection).
_PLACE_MANY = """
    SELECT order_id, created_at FROM accept_orders(
        CAST(%(ids)s AS uuid[]), CAST(%(broker_ids)s AS uuid[]), CAST(%(client_order_ids)s AS text[]),
        CAST(%(idempotency_keys)s AS text[]), CAST(%(document_numbers)s AS text[]), CAST(%(symbols)s AS text[]),
        CAST(%(sides)s AS text[]), CAST(%(order_types)s AS text[]), CAST(%(time_in_forces)s AS text[]),
        CAST(%(stps)s AS text[]), CAST(%(prices)s AS bigint[]), CAST(%(quantities)s AS bigint[]),
        CAST(%(valid_untils)s AS timestamptz[]))
    """

# The original of each order that was not inserted (key ``n``: its position in the arrays), all in one query: the
# earliest order of its broker with its client_order_id or its Idempotency-Key. Two lookups, one per unique index
# (uq_orders_broker_id_client_order_id, uq_orders_broker_id_idempotency_key: each probed on both its columns), whose
# rows are joined: a join on "client_order_id = … OR idempotency_key = …" could use neither index on both columns
# and read every order of the broker (200,000 index entries for a broker with a long history). An order matching
# both keys comes twice, the same row; DISTINCT ON keeps one.
_FIND_DUPLICATES = """
    SELECT DISTINCT ON (k.n) k.n, o.id, o.document_number, o.symbol, o.side, o.order_type, o.time_in_force, o.stp,
           o.valid_until, o.client_order_id,
           CASE WHEN o.placed_quantity IS NULL THEN o.price ELSE o.placed_price END AS price,
           COALESCE(o.placed_quantity, o.quantity) AS quantity
    FROM unnest(CAST(%(broker_ids)s AS uuid[]), CAST(%(client_order_ids)s AS text[]),
                CAST(%(idempotency_keys)s AS text[]))
         WITH ORDINALITY AS k(broker_id, client_order_id, idempotency_key, n)
    CROSS JOIN LATERAL (
        SELECT * FROM orders WHERE orders.broker_id = k.broker_id AND orders.client_order_id = k.client_order_id
        UNION ALL
        SELECT * FROM orders WHERE orders.broker_id = k.broker_id AND orders.idempotency_key = k.idempotency_key
    ) o
    ORDER BY k.n, o.seq
    """

_GROUP_ATTEMPTS = 3


def _columns(orders: Sequence[NewOrder]) -> dict[str, str]:
    """The group's columns as array literals (:mod:`exchange.db.arrays`), one per ``CAST(... AS type[])``."""
    return {
        "ids": array_literal(o.order_id for o in orders),
        "broker_ids": array_literal(o.broker_id for o in orders),
        "client_order_ids": array_literal(o.client_order_id for o in orders),
        "idempotency_keys": array_literal(o.idempotency_key for o in orders),
        "document_numbers": array_literal(o.document_number for o in orders),
        "symbols": array_literal(o.symbol for o in orders),
        "sides": array_literal(o.side for o in orders),
        "order_types": array_literal(o.order_type for o in orders),
        "time_in_forces": array_literal(o.time_in_force for o in orders),
        "stps": array_literal(o.stp for o in orders),
        "prices": array_literal(o.price for o in orders),
        "quantities": array_literal(o.quantity for o in orders),
        "valid_untils": array_literal(o.valid_until for o in orders),
    }


async def place_orders(pool: AsyncPool, orders: Sequence[NewOrder]) -> list[PlaceResult | Exception]:
    """Accept a group of orders in ONE transaction (group commit); one outcome per order, in order.

    Each order and its ``place`` command are written by one statement for the whole group and share the
    command's sequence number; an order repeating one of its broker's ``client_order_id``/``Idempotency-Key``
    (committed earlier or earlier in the same group) writes nothing and resolves to the original order, or to
    :class:`IdempotencyKeyReusedError` when its fields differ from the original's.

    If the group fails on data (SQLSTATE class 22/23, e.g. a broker deleted while its key was cached), nothing of
    it was written, and the orders are retried one transaction each so only the offending order gets the error.
    A deadlock is retried; any other failure is raised for the whole group: nothing was committed, or (the
    connection was lost while the statement ran) the outcome is unknown, which a retry with the same
    ``client_order_id``/``Idempotency-Key`` resolves.
    """
    for attempt in range(_GROUP_ATTEMPTS):
        try:
            return list(await _place_group(pool, orders))
        except psycopg.Error as exc:
            # Two groups inserting the same idempotency keys in different orders can deadlock: run it again.
            if is_retryable(exc) and attempt + 1 < _GROUP_ATTEMPTS:
                continue
            if len(orders) == 1 or not is_deterministic(exc):
                raise
            break
    outcomes: list[PlaceResult | Exception] = []
    for order in orders:
        try:
            outcomes.extend(await _place_group(pool, [order]))
        except Exception as exc:  # the orders before it are committed: only this one failed
            outcomes.append(exc)
    return outcomes


async def _place_group(pool: AsyncPool, orders: Sequence[NewOrder]) -> list[PlaceResult | IdempotencyKeyReusedError]:
    # One statement writes (and, in autocommit mode, durably commits) the whole group: one round trip. The
    # originals of the orders it did not insert are looked up after it (one query), when they are committed.
    async with single_statement(pool) as conn:
        # ``created_at`` defaults to now(), the transaction's start: the same value for every row it inserts.
        cursor = await conn.execute(_PLACE_MANY, _columns(orders))
        inserted = {row.order_id: row.created_at for row in await cursor.fetchall()}
        duplicates = [order for order in orders if order.order_id not in inserted]
        for order in duplicates:
            if order.client_order_id is None and order.idempotency_key is None:
                # Only a uuid4 collision in a group with keys could get here (a group without any fails on the
                # primary key instead: alembic 0025); a failure, never a silent duplicate.
                raise RuntimeError(f"order {order.order_id} was not inserted and is not a duplicate")
        # An earlier order of this group with the same key is committed (and visible) too.
        originals = await _originals(conn, duplicates) if duplicates else {}
    position = {order.order_id: n for n, order in enumerate(duplicates, 1)}
    outcomes: list[PlaceResult | IdempotencyKeyReusedError] = []
    for order in orders:
        if order.order_id in inserted:
            outcomes.append(PlaceResult(order.order_id, created=True, created_at=inserted[order.order_id]))
            continue
        original = originals.get(position[order.order_id])
        if original is None:
            raise RuntimeError("duplicate order conflict but the original order is not visible")
        outcomes.append(_replayed(order, original))
    return outcomes


async def _originals(conn: AsyncPgConnection, orders: Sequence[NewOrder]) -> dict[int, Any]:
    """The committed orders whose ``client_order_id`` or ``Idempotency-Key`` each of ``orders`` repeats (the
    earliest per key), by position in ``orders`` from 1; an order none repeats has no entry. One query."""
    params = {
        "broker_ids": [o.broker_id for o in orders],
        "client_order_ids": [o.client_order_id for o in orders],
        "idempotency_keys": [o.idempotency_key for o in orders],
    }
    return {row.n: row for row in await (await conn.execute(_FIND_DUPLICATES, params)).fetchall()}


def _replayed(order: NewOrder, original: Any) -> PlaceResult | IdempotencyKeyReusedError:
    """What a request repeating ``original``'s key is answered with: the original, or, when its fields differ,
    :class:`IdempotencyKeyReusedError`."""
    if not _same_request(original, order):
        return _key_reused(order, original.client_order_id)
    return PlaceResult(original.id, created=False)


async def find_original(pool: AsyncPool, order: NewOrder) -> UUID | None:
    """The order of ``order``'s broker with its ``client_order_id`` or ``Idempotency-Key`` (the earliest), when
    ``order`` repeats its request; None when it has neither key or no order has them. Raises
    :class:`IdempotencyKeyReusedError` when that order's fields differ. Writes nothing.

    For a request whose ``valid_until`` has passed: a new order is refused for it, but the retry of an order
    accepted before its deadline (its answer lost) must be answered with that order, as every other retry is
    (it may have traded: "valid_until must be in the future" would tell the client it never existed)."""
    if order.client_order_id is None and order.idempotency_key is None:
        return None
    async with single_statement(pool) as conn:
        original = (await _originals(conn, [order])).get(1)
    if original is None:
        return None
    replayed = _replayed(order, original)
    if isinstance(replayed, IdempotencyKeyReusedError):
        raise replayed
    return replayed.order_id


_COMPARED_FIELDS = (
    "document_number",
    "symbol",
    "side",
    "order_type",
    "time_in_force",
    "stp",
    "price",
    "quantity",
    "valid_until",
    "client_order_id",  # an Idempotency-Key repeated with another (or no) client_order_id is not the same request
)


def _fields(order: object) -> tuple[object, ...]:
    """What makes a retry the same order (both sides normalised: upper-case symbol, resolved time in force)."""
    return tuple(getattr(order, name) for name in _COMPARED_FIELDS)


_VALID_UNTIL = _COMPARED_FIELDS.index("valid_until")
_NOT_RESTING = (TimeInForce.IOC.value, TimeInForce.FOK.value)


def _same_request(original: Any, order: NewOrder) -> bool:
    """``order`` repeats ``original``'s request. An ioc/fok original stored without its ``valid_until`` (accepted
    before ioc/fok orders kept it, or by an api worker of that time during a rolling upgrade) matches a retry that
    carries one: the retry of the same request must replay it, not be refused as another order."""
    stored, asked = list(_fields(original)), list(_fields(order))
    if stored[_VALID_UNTIL] is None and str(original.time_in_force) in _NOT_RESTING:
        asked[_VALID_UNTIL] = None
    return stored == asked


def _key_reused(order: NewOrder, original_client_order_id: str | None) -> IdempotencyKeyReusedError:
    """The error of ``order``, which repeats a key of an original order with other fields: the key it repeats is
    its ``client_order_id`` when the original has the same one, else its ``Idempotency-Key``."""
    same_id = order.client_order_id is not None and order.client_order_id == original_client_order_id
    field = "client_order_id" if same_id else "Idempotency-Key"
    return IdempotencyKeyReusedError(
        f"{field} was already used for a different order; use a new one for a new order", {"field": field}
    )


# Cancel writers are serialised per order by transaction-scoped advisory locks (on 256 buckets of the order ids'
# hash, taken in ascending order, so two groups never wait on each other in a cycle), which ``write_cancels``
# takes itself before it reads (alembic 0014): not row locks, since the matcher updates order rows in its own order
# and locking several rows here could deadlock with it (as the row-locking cancel-all once did). A cancel command
# for each keyed order of its broker that is not closed and has none pending; one row per order found, with whether
# one was written. One statement: in autocommit, one round trip and its own transaction.
_INSERT_CANCELS = "SELECT * FROM write_cancels(CAST(%(ids)s AS uuid[]), CAST(%(broker_ids)s AS uuid[]))"


async def _write_cancels(
    conn: AsyncPgConnection, keys: Sequence[tuple[UUID, UUID]]
) -> dict[tuple[UUID, UUID], CommandResult]:
    """Cancel commands for the keyed ``(broker_id, order_id)`` orders that are not closed and have no cancel
    pending; returns the outcome of every order found (another broker's order is not found)."""
    unique = list(dict.fromkeys(keys))  # one order twice in a group: one command, the same outcome for both
    ids = array_literal(order_id for _, order_id in unique)
    params = {"ids": ids, "broker_ids": array_literal(broker_id for broker_id, _ in unique)}
    rows = await (await conn.execute(_INSERT_CANCELS, params)).fetchall()
    return {(row.broker_id, row.id): CommandResult(row.symbol, written=row.written) for row in rows}


async def cancel_orders(pool: AsyncPool, keys: Sequence[tuple[UUID, UUID]]) -> list[CommandResult | OrderNotFoundError]:
    """Cancel a group of the brokers' own orders in ONE transaction (group commit); ``keys`` are
    ``(broker_id, order_id)``. Per key: a cancel command is written unless the order is closed or a cancel is
    already pending (``written=False``, a no-op); an unknown order, or another broker's, is
    :class:`OrderNotFoundError`. Concurrent cancels of one order write one command."""
    async with single_statement(pool) as conn:
        found = await _write_cancels(conn, keys)
    return [found.get(key) or OrderNotFoundError() for key in keys]


@dataclass(frozen=True, slots=True)
class CancelAllResult:
    symbol: str
    order_ids: list[UUID]
    """Orders a cancel command was written for (those already closed or already being cancelled are skipped)."""


CANCEL_ALL_CHUNK = 1000
"""The most orders one transaction of a cancel-all writes cancels for. ``write_cancels`` spends 20-60 us per order
under its orders' cancel-bucket locks (alembic 0014), so a chunk holds the ~13 buckets of its 1,000 orders (of a
20,000-order cancel-all) for 20-60 ms, where a 20,000-order cancel-all in one statement held all 256 for 0.4-1.25 s
and every other cancel on the exchange waited behind it. The price is CPU: a chunk's probes of the orders' primary
key have less locality than one sorted pass over all of them, and each chunk is a statement and a commit of its
own; 20,000 orders cost 476 ms of CPU (client and server) in chunks of 1,000, 416 ms in the one statement before,
502 ms in chunks of 500 (``ops.bench_cancel_all`` and in-process runs)."""

# The broker's orders in the symbol that are not closed, as this statement's snapshot sees them: the orders a
# cancel-all cancels are those accepted before it began (read once, here; a chunk never looks for more). "Not closed"
# is "close_reason IS NULL" (the constraint ck_orders_closed_has_reason makes the two the same), the condition of
# ix_orders_open_book, which holds only the orders that are not closed, by symbol first: "status <> 'closed'" could
# not use it and read the broker's whole history. Grouped by cancel bucket (write_cancels' lock key, alembic 0026),
# in bucket order, so that a chunk of consecutive ids needs the locks of a few neighbouring buckets, not of all 256
# (one row per bucket: no sort of every order). Each bucket's ids come back as its array's text, are cut into
# chunks as strings and go back as array texts: no id is turned into a UUID object and back in Python.
_LIVE_BY_BUCKET = """
    SELECT cancel_bucket(id) AS bucket, CAST(array_agg(id) AS text) AS ids
    FROM orders
    WHERE symbol = %(symbol)s AND broker_id = %(broker_id)s AND close_reason IS NULL
    GROUP BY 1
    ORDER BY 1
    """

# One chunk's cancels, written by write_cancels (its locks, its decision, its insert): one autocommit statement.
_CANCEL_CHUNK = """
    SELECT w.id
    FROM write_cancels(
        CAST(%(ids)s AS uuid[]), array_fill(CAST(%(broker_id)s AS uuid), ARRAY[CAST(%(n)s AS integer)])
    ) AS w
    WHERE w.written
    """


def chunk_texts(bucket_texts: Sequence[str], size: int) -> list[tuple[str, int]]:
    """The ids of ``bucket_texts`` (uuid array texts, whose elements print without quotes, commas or braces) in
    their order, cut into array texts of at most ``size`` ids: ``(text, number of ids)``. Each chunk's ids are
    sorted (a uuid's text sorts as its bytes do, as PostgreSQL orders uuids): write_cancels then probes the orders'
    primary key and inserts into the pending cancels' index (by order id) in index order (20,000 orders in chunks
    of 1,000: 476 vs 501 ms of CPU, client and server, in the buckets' order; in one chunk 353 ms)."""
    if size < 1:
        raise ValueError(f"a cancel-all chunk holds at least one order, not {size}")
    ids = [i for text in bucket_texts for i in text[1:-1].split(",")]
    chunks = (sorted(ids[k : k + size]) for k in range(0, len(ids), size))
    return [("{" + ",".join(chunk) + "}", len(chunk)) for chunk in chunks]


async def cancel_all(
    pool: AsyncPool,
    broker_id: UUID,
    symbol: str,
    *,
    chunk: int = CANCEL_ALL_CHUNK,
    on_written: Callable[[str], None] | None = None,
) -> CancelAllResult:
    """Cancel commands for every open or pending order of the broker in ``symbol`` that its first statement sees
    (accepted before the cancel-all began; an order accepted later is left alone), in bounded transactions.

    Invariants: each chunk of at most ``chunk`` orders is ONE autocommit statement (``write_cancels``), which takes
    only its orders' bucket locks and commits its commands or none of them, so a cancel-all that stops half-way
    (its process killed, its connection lost) leaves every order either with its durable cancel command or
    untouched, and a retry, which reads the orders again, writes the missing ones; orders that already have a
    cancel pending, or closed meanwhile, are skipped and not returned. ``on_written(symbol)`` runs after each chunk
    that wrote a command (the api wakes the symbol's matcher, so the first cancels apply while the rest are written).
    """
    symbol = normalize_symbol(symbol)
    async with single_statement(pool) as conn:
        live = await (await conn.execute(_LIVE_BY_BUCKET, {"broker_id": broker_id, "symbol": symbol})).fetchall()
    written: list[UUID] = []
    for ids, n in chunk_texts([row.ids for row in live], chunk):
        async with single_statement(pool) as conn:
            rows = await (await conn.execute(_CANCEL_CHUNK, {"broker_id": broker_id, "ids": ids, "n": n})).fetchall()
        done = [row.id for row in rows]
        written.extend(done)
        if done and on_written is not None:
            on_written(symbol)
    return CancelAllResult(symbol, written)


# The order's row is locked (``FOR NO KEY UPDATE``: concurrent amends of one order take turns; the matcher's
# foreign-key checks are not blocked) and the command written only while the order is not closed and the change is
# one it can take, in ONE statement: in autocommit it is its own transaction, one round trip, and nothing holds the
# row between round trips. The row's state comes back either way: the checks below answer the error when the insert
# (which PostgreSQL runs whether or not the query reads it) wrote nothing, on the same conditions.
_AMEND = f"""
    WITH target AS (
        SELECT symbol, status, order_type FROM orders
        WHERE id = %(id)s AND broker_id = %(broker_id)s
        FOR NO KEY UPDATE
    ),
    written AS (
        INSERT INTO commands (symbol, kind, order_id, payload)
        SELECT symbol, '{CommandKind.AMEND.value}', %(id)s, CAST(%(payload)s AS jsonb) FROM target
        WHERE status <> '{OrderStatus.CLOSED.value}'
          AND NOT (CAST(%(price)s AS bigint) IS NOT NULL AND order_type = '{OrderType.MARKET.value}')
        RETURNING seq
    )
    SELECT symbol, status, order_type, (SELECT seq FROM written) AS seq FROM target
    """  # noqa: S608  # enum constants only


def amend_payload(quantity: int | None, price: int | None) -> dict[str, int | None]:
    """An ``amend`` command's payload: the new total quantity and limit price (None: unchanged)."""
    return {"quantity": quantity, "price": price}


async def amend_order(
    pool: AsyncPool, broker_id: UUID, order_id: UUID, quantity: int | None, price: int | None
) -> CommandResult:
    """Write an ``amend`` command (new total ``quantity`` and/or limit ``price``) for the broker's own live order.

    The engine decides: an amend it rejects leaves the order unchanged, and its command keeps the reason
    (:func:`command_outcome`, :func:`refused_amend`). Raises :class:`OrderNotFoundError`,
    :class:`OrderClosedError`, or :class:`InvalidOrderError` (nothing to change; a price for a market order).
    """
    if quantity is None and price is None:
        raise InvalidOrderError("give quantity and/or price", {"fields": ["quantity", "price"]})
    payload = json.dumps(amend_payload(quantity, price))
    params = {"id": order_id, "broker_id": broker_id, "payload": payload, "price": price}
    async with single_statement(pool) as conn:
        row = await (await conn.execute(_AMEND, params)).fetchone()
    if row is None:
        raise OrderNotFoundError()
    if row.status == OrderStatus.CLOSED.value:
        raise OrderClosedError("the order is closed and cannot be amended", {"order_id": str(order_id)})
    if price is not None and row.order_type == OrderType.MARKET.value:
        raise InvalidOrderError("a market order has no price to amend", {"field": "price"})
    return CommandResult(row.symbol, written=True, seq=row.seq)


_PROCESSED = "SELECT processed_at IS NOT NULL, rejected_reason FROM commands WHERE seq = %(seq)s"


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    processed: bool
    """A matcher has processed the command: applied it, rejected it or quarantined it."""
    rejected_reason: str | None = None
    """Why it was rejected (the engine's reject reason, or ``unprocessable`` when quarantined); None if applied."""


async def command_outcome(pool: AsyncPool, seq: int) -> CommandOutcome:
    """What became of the command ``seq`` (alembic 0027: the matcher writes a rejection with ``processed_at``)."""
    async with single_statement(pool) as conn:
        row = await (await conn.execute(_PROCESSED, {"seq": seq})).fetchone()
    if row is None or not row[0]:
        return CommandOutcome(processed=False)
    return CommandOutcome(processed=True, rejected_reason=row[1])


def refused_amend(order_id: UUID, reason: str) -> OrderServiceError:
    """The error an amend the matcher rejected for ``reason`` is answered with (the order is unchanged)."""
    details = {"order_id": str(order_id), "reason": reason}
    if reason == RejectReason.UNKNOWN_ORDER.value:  # not on the book when the amend reached it: closed meanwhile
        return OrderClosedError("the order closed before the amend reached it", details)
    if reason == RejectReason.NOT_AMENDABLE.value:
        message = (
            "the amend was refused: the new quantity must be above the shares already filled, and the order must not"
            " have reached its valid_until; the order is unchanged"
        )
    else:
        message = f"the amend was refused ({reason}); the order is unchanged"
    return AmendRejectedError(message, details)

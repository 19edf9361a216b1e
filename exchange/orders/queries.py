"""Read models: what brokers see of their orders, the books, prices, trades, balances and positions.

Every query is one statement (one snapshot), so an order is never shown with trades that disagree with its
``remaining_quantity``. Timestamps are returned in UTC. Only the caller's own orders are ever returned
(``broker_id`` is part of every predicate on ``orders``, or, in ``order_views``, checked on each order read by id).
The order, book and price reads are PL/pgSQL functions (alembic 0007): their plans are kept per server connection.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from exchange.db.arrays import array_literal
from exchange.db.engines import AsyncPgConnection
from exchange.db.tables import OrderStatus
from exchange.engine.types import Side
from exchange.orders.errors import InvalidCursorError
from exchange.orders.models import (
    BalanceView,
    BookLevel,
    BookView,
    OrderPage,
    OrderView,
    PositionView,
    PriceView,
    PublicTrade,
    TradeView,
)

_ORDER_COLUMNS = (
    "o.id, o.side, o.order_type, o.time_in_force, o.symbol, o.price, o.quantity, o.remaining, o.status, "
    "o.close_reason, o.valid_until, o.created_at, o.updated_at, o.client_order_id, o.document_number, o.stp"
)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _order_view(row: Any, trades: list[TradeView]) -> OrderView:
    return OrderView(
        id=row.id,
        side=row.side,
        order_type=row.order_type,
        time_in_force=row.time_in_force,
        symbol=row.symbol,
        price=row.price,
        quantity=row.quantity,
        remaining_quantity=row.remaining,
        status=row.status,
        close_reason=row.close_reason,
        valid_until=None if row.valid_until is None else _utc(row.valid_until),
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
        client_order_id=row.client_order_id,
        document_number=row.document_number,
        stp=row.stp,
        trades=trades,
    )


# One row per trade (or one row with NULL trade columns), oldest trade first: orders and trades from one snapshot.
# The statement is PL/pgSQL's (alembic 0007), planned once per server connection.
_ORDERS_WITH_TRADES = "SELECT * FROM order_views(CAST(%(ids)s AS uuid[]), CAST(%(broker_ids)s AS uuid[]))"


async def get_orders(conn: AsyncPgConnection, keys: Sequence[tuple[UUID, UUID]]) -> dict[tuple[UUID, UUID], OrderView]:
    """Several orders with their trades (oldest first) in one query, keyed like ``keys``: ``(broker_id, order_id)``.

    An order is only returned to its own broker: a key naming another broker's order is simply absent."""
    unique = list(dict.fromkeys(keys))  # a repeated key would repeat its order's trade rows
    params = {
        "ids": array_literal(order_id for _, order_id in unique),
        "broker_ids": array_literal(broker_id for broker_id, _ in unique),
    }
    rows_by_key: dict[tuple[UUID, UUID], list[Any]] = {}
    for row in await (await conn.execute(_ORDERS_WITH_TRADES, params)).fetchall():
        rows_by_key.setdefault((row.broker_id, row.id), []).append(row)
    views: dict[tuple[UUID, UUID], OrderView] = {}
    for key, rows in rows_by_key.items():
        trades = [
            TradeView(
                trade_id=r.trade_id,
                price=r.trade_price,
                quantity=r.trade_quantity,
                counterparty_broker=r.counterparty,
                executed_at=_utc(r.executed_at),
            )
            for r in rows
            if r.trade_id is not None
        ]
        views[key] = _order_view(rows[0], trades)
    return views


# ------------------------------------------------------------------------------------------------ listing


def encode_cursor(created_at: datetime, order_id: UUID) -> str:
    raw = json.dumps([created_at.isoformat(), order_id.hex]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """Inverse of :func:`encode_cursor`; raises :class:`InvalidCursorError` on anything it did not produce."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, hex_id = json.loads(raw)
        moment = datetime.fromisoformat(stamp)
        # A crafted cursor can hold any JSON: UUID(hex=5) raises AttributeError, which is not bad *input* to us.
        if moment.tzinfo is None or not isinstance(hex_id, str):
            raise ValueError("bad cursor")
        return moment, UUID(hex=hex_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursorError("cursor is not one this api returned", {"field": "cursor"}) from exc


async def list_orders(
    conn: AsyncPgConnection,
    broker_id: UUID,
    *,
    symbol: str | None = None,
    status: OrderStatus | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> OrderPage:
    """The broker's orders, newest first (keyset pagination on ``(created_at, id)`` descending), without trades.

    ``next_cursor`` is None on the last page.
    """
    conditions = ["o.broker_id = %(broker_id)s"]
    params: dict[str, Any] = {"broker_id": broker_id, "limit": limit + 1}
    if symbol is not None:
        conditions.append("o.symbol = %(symbol)s")
        params["symbol"] = symbol
    if status is not None:
        conditions.append("o.status = %(status)s")
        params["status"] = status.value
        if status is not OrderStatus.CLOSED:
            # Implied by the status (ck_orders_closed_has_reason), but the planner does not read constraints:
            # named, it lets the listing read the broker's orders not closed only, through
            # their partial index (alembic 0019), instead of its whole history.
            conditions.append("o.close_reason IS NULL")
    if cursor is not None:
        params["c_at"], params["c_id"] = decode_cursor(cursor)
        conditions.append("(o.created_at, o.id) < (%(c_at)s, %(c_id)s)")
    # Constant fragments only; every value is a bound parameter.
    where = " AND ".join(conditions)
    statement = (
        f"SELECT {_ORDER_COLUMNS} FROM orders o WHERE {where} ORDER BY o.created_at DESC, o.id DESC LIMIT %(limit)s"  # noqa: S608
    )
    rows = await (await conn.execute(statement, params)).fetchall()
    items = [_order_view(r, []) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last.created_at, last.id)
    return OrderPage(items, next_cursor)


# ------------------------------------------------------------------------------------------- market data

# Resting orders whose valid_until has passed are not shown (alembic 0007's book_levels, planned once per server
# connection).
_BOOK = "SELECT * FROM book_levels(CAST(%(symbol)s AS text), CAST(%(depth)s AS integer))"


async def book(conn: AsyncPgConnection, symbol: str, depth: int) -> BookView:
    """Aggregated price levels: bids best (highest) first, asks best (lowest) first, ``depth`` levels each."""
    bids: list[BookLevel] = []
    asks: list[BookLevel] = []
    for row in await (await conn.execute(_BOOK, {"symbol": symbol, "depth": depth})).fetchall():
        level = BookLevel(int(row.price), int(row.total_quantity), int(row.order_count))
        (bids if row.side == Side.BID else asks).append(level)
    bids.sort(key=lambda lv: -lv.price)
    asks.sort(key=lambda lv: lv.price)
    return BookView(symbol, bids, asks)


_RECENT_PRICES = "SELECT price FROM recent_prices(CAST(%(symbol)s AS text), CAST(%(n)s AS integer))"  # alembic 0007


def rounded_average(prices: Sequence[int]) -> int:
    """Mean of positive integer prices, rounded to the nearest cent with halves rounded up (exact integers)."""
    total, count = sum(prices), len(prices)
    return (2 * total + count) // (2 * count)


async def price(conn: AsyncPgConnection, symbol: str, trades: int) -> PriceView | None:
    """Last trade price and the simple (unweighted) average of the last ``trades`` trade prices; None before the
    symbol's first trade."""
    cursor = await conn.execute(_RECENT_PRICES, {"symbol": symbol, "n": trades})
    prices = [int(row.price) for row in await cursor.fetchall()]
    if not prices:
        return None
    return PriceView(symbol, prices[0], rounded_average(prices), len(prices))


_RECENT_TRADES = """
    SELECT id, price, quantity, taker_side, executed_at FROM trades WHERE symbol = %(symbol)s
    ORDER BY executed_at DESC, command_seq DESC, match_no DESC
    LIMIT %(limit)s
"""


async def recent_trades(conn: AsyncPgConnection, symbol: str, limit: int) -> list[PublicTrade]:
    """The symbol's latest trades, newest first, without any broker or order ids (public tape)."""
    rows = await (await conn.execute(_RECENT_TRADES, {"symbol": symbol, "limit": limit})).fetchall()
    return [PublicTrade(r.id, r.price, r.quantity, r.taker_side, _utc(r.executed_at)) for r in rows]


# ---------------------------------------------------------------------------------------------- accounts


async def balance(conn: AsyncPgConnection, broker_id: UUID) -> BalanceView | None:
    row = await (
        await conn.execute("SELECT id, name, balance FROM brokers WHERE id = %(id)s", {"id": broker_id})
    ).fetchone()
    return None if row is None else BalanceView(row.id, row.name, int(row.balance))


async def positions(conn: AsyncPgConnection, broker_id: UUID) -> list[PositionView]:
    """Net shares per symbol (negative = net seller), zero positions omitted, by symbol."""
    cursor = await conn.execute(
        "SELECT symbol, quantity FROM positions WHERE broker_id = %(id)s AND quantity <> 0 ORDER BY symbol",
        {"id": broker_id},
    )
    rows = await cursor.fetchall()
    return [PositionView(r.symbol, int(r.quantity)) for r in rows]


async def trade_count(conn: AsyncPgConnection) -> int:
    row = await (await conn.execute("SELECT count(*) FROM trades")).fetchone()
    return int(row[0]) if row is not None else 0

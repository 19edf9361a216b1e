"""The accept path: turn a broker's request into durable rows of ``orders`` and the command log.

Invariants:

* One transaction per call. An order and its ``place`` command are inserted by ONE statement (a CTE) and share
  the command's sequence number (``orders.seq`` = ``commands.seq``); nothing is written when validation fails.
* Duplicates are safe under concurrency: ``INSERT … ON CONFLICT DO NOTHING`` on the broker's
  ``client_order_id``/``idempotency_key`` unique constraints, then the original order is read back. A concurrent
  duplicate waits for the first insert to commit (or roll back) inside PostgreSQL, so exactly one order exists.
* A cancel or amend command is written only for the broker's own order and only while it is not closed. The
  order row is locked (``FOR NO KEY UPDATE``: does not block the matcher's foreign-key checks) so concurrent
  cancels of one order write one command.
* No wake-up, waiting or Redis here: the caller does that after the commit (see :mod:`exchange.api.services`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from exchange.db.tables import CommandKind, OrderStatus
from exchange.engine.types import OrderType, StpMode, TimeInForce
from exchange.orders.errors import InvalidOrderError, OrderClosedError, OrderNotFoundError
from exchange.orders.models import CommandResult, NewOrder, PlaceResult

SYMBOL_RE = re.compile(r"^[A-Za-z0-9.]{1,10}$")


def normalize_symbol(symbol: str) -> str:
    """Upper-case a ticker; raises :class:`InvalidOrderError` unless it is 1-10 characters of ``[A-Za-z0-9.]``."""
    if not SYMBOL_RE.match(symbol):
        raise InvalidOrderError("symbol must be 1-10 characters of A-Z, 0-9 and '.'", {"field": "symbol"})
    return symbol.upper()


def resolve_time_in_force(
    order_type: OrderType, requested: TimeInForce | None, valid_until: datetime | None, now: datetime
) -> tuple[TimeInForce, datetime | None]:
    """Default and check the time in force; returns ``(time_in_force, valid_until to store)``.

    Rules: ``valid_until`` must be in the future. Defaults: market → ``ioc``; limit with ``valid_until`` → ``gtd``;
    limit without → ``gtc``. Market orders admit only ``ioc``/``fok``; ``gtd`` needs ``valid_until``; ``gtc``
    forbids it. An ``ioc``/``fok`` order never rests, so a (future) ``valid_until`` sent with it cannot matter: it
    is accepted for compatibility with seed clients that always send one, and not stored.
    """
    if valid_until is not None and valid_until <= now:
        raise InvalidOrderError("valid_until must be in the future", {"field": "valid_until"})
    tif = requested
    if tif is None:
        if order_type is OrderType.MARKET:
            tif = TimeInForce.IOC
        else:
            tif = TimeInForce.GTD if valid_until is not None else TimeInForce.GTC
    if order_type is OrderType.MARKET and tif not in (TimeInForce.IOC, TimeInForce.FOK):
        raise InvalidOrderError("a market order is ioc or fok", {"field": "time_in_force"})
    if tif is TimeInForce.GTD:
        if valid_until is None:
            raise InvalidOrderError("time_in_force gtd requires valid_until", {"field": "valid_until"})
        return tif, valid_until
    if tif is TimeInForce.GTC and valid_until is not None:
        raise InvalidOrderError("time_in_force gtc cannot have valid_until (use gtd)", {"field": "valid_until"})
    return tif, None


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
    now: datetime,
) -> NewOrder:
    """Validate the cross-field rules (price vs order type, time in force, expiry) and build a :class:`NewOrder`."""
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


_PLACE = text(
    f"""
    WITH ins AS (
        INSERT INTO orders (id, broker_id, client_order_id, idempotency_key, document_number, symbol, side,
                            order_type, time_in_force, stp, price, quantity, remaining, valid_until, seq)
        VALUES (:id, :broker_id, :client_order_id, :idempotency_key, :document_number, :symbol, :side,
                :order_type, :time_in_force, :stp, :price, :quantity, :quantity, :valid_until,
                nextval('command_seq'))
        ON CONFLICT DO NOTHING
        RETURNING id, symbol, seq
    )
    INSERT INTO commands (seq, symbol, kind, order_id)
    SELECT seq, symbol, '{CommandKind.PLACE.value}', id FROM ins
    RETURNING seq
    """  # noqa: S608  # enum constant only
)

_FIND_DUPLICATE = text(
    """
    SELECT id FROM orders
    WHERE broker_id = :broker_id
      AND (client_order_id = :client_order_id OR idempotency_key = :idempotency_key)
    ORDER BY seq
    LIMIT 1
    """
)


async def place_order(engine: AsyncEngine, order: NewOrder) -> PlaceResult:
    """Insert the order (``pending``) and its ``place`` command in one transaction, or find the original order
    when ``client_order_id``/``idempotency_key`` repeats one of this broker's (then nothing is written)."""
    params = {
        "id": order.order_id,
        "broker_id": order.broker_id,
        "client_order_id": order.client_order_id,
        "idempotency_key": order.idempotency_key,
        "document_number": order.document_number,
        "symbol": order.symbol,
        "side": order.side,
        "order_type": order.order_type,
        "time_in_force": order.time_in_force,
        "stp": order.stp,
        "price": order.price,
        "quantity": order.quantity,
        "valid_until": order.valid_until,
    }
    async with engine.begin() as conn:
        if (await conn.execute(_PLACE, params)).scalar_one_or_none() is not None:
            return PlaceResult(order.order_id, created=True)
        if order.client_order_id is None and order.idempotency_key is None:
            # Only a uuid4 collision could get here; treat it as a transient failure, never a silent duplicate.
            raise RuntimeError(f"order {order.order_id} was not inserted and is not a duplicate")
        original = (await conn.execute(_FIND_DUPLICATE, params)).scalar_one_or_none()
        if original is None:
            raise RuntimeError("duplicate order conflict but the original order is not visible")
        return PlaceResult(original, created=False)


_LOCK_ORDER = text(
    "SELECT symbol, status, order_type FROM orders WHERE id = :id AND broker_id = :broker_id FOR NO KEY UPDATE"
)

_INSERT_CANCEL = text(
    f"""
    INSERT INTO commands (symbol, kind, order_id)
    SELECT :symbol, '{CommandKind.CANCEL.value}', :id
    WHERE NOT EXISTS (
        SELECT 1 FROM commands
        WHERE symbol = :symbol AND processed_at IS NULL AND order_id = :id AND kind = '{CommandKind.CANCEL.value}'
    )
    RETURNING seq
    """  # noqa: S608  # enum constants only
)


async def cancel_order(engine: AsyncEngine, broker_id: UUID, order_id: UUID) -> CommandResult:
    """Write a ``cancel`` command for the broker's own order unless it is closed or a cancel is already pending.

    Raises :class:`OrderNotFoundError` for an unknown order or another broker's.
    """
    async with engine.begin() as conn:
        row = (await conn.execute(_LOCK_ORDER, {"id": order_id, "broker_id": broker_id})).first()
        if row is None:
            raise OrderNotFoundError()
        if row.status == OrderStatus.CLOSED.value:
            return CommandResult(row.symbol, written=False)
        seq = (await conn.execute(_INSERT_CANCEL, {"id": order_id, "symbol": row.symbol})).scalar_one_or_none()
        return CommandResult(row.symbol, written=seq is not None)


@dataclass(frozen=True, slots=True)
class CancelAllResult:
    symbol: str
    order_ids: list[UUID]
    """Orders a cancel command was written for (those already closed or already being cancelled are skipped)."""


_LOCK_OPEN_ORDERS = text(
    f"""
    SELECT id FROM orders
    WHERE broker_id = :broker_id AND symbol = :symbol AND status <> '{OrderStatus.CLOSED.value}'
    ORDER BY id
    FOR NO KEY UPDATE
    """  # noqa: S608  # enum constant only
)

# A separate statement from the lock above on purpose: under READ COMMITTED it takes a fresh snapshot after the
# row locks are granted, so it sees the cancel commands a concurrent cancel-all committed meanwhile.
_INSERT_CANCELS = text(
    f"""
    INSERT INTO commands (symbol, kind, order_id)
    SELECT :symbol, '{CommandKind.CANCEL.value}', o.id
    FROM unnest(CAST(:ids AS uuid[])) WITH ORDINALITY AS o(id, n)
    WHERE NOT EXISTS (
        SELECT 1 FROM commands c
        WHERE c.symbol = :symbol AND c.processed_at IS NULL AND c.order_id = o.id
          AND c.kind = '{CommandKind.CANCEL.value}'
    )
    ORDER BY o.n
    RETURNING order_id
    """  # noqa: S608  # enum constants only
)


async def cancel_all(engine: AsyncEngine, broker_id: UUID, symbol: str) -> CancelAllResult:
    """Cancel commands for every open or pending order of the broker in ``symbol``, in one transaction."""
    symbol = normalize_symbol(symbol)
    async with engine.begin() as conn:
        ids = list((await conn.execute(_LOCK_OPEN_ORDERS, {"broker_id": broker_id, "symbol": symbol})).scalars())
        if not ids:
            return CancelAllResult(symbol, [])
        written = (await conn.execute(_INSERT_CANCELS, {"ids": ids, "symbol": symbol})).scalars().all()
        return CancelAllResult(symbol, list(written))


_INSERT_AMEND = text(
    f"""
    INSERT INTO commands (symbol, kind, order_id, payload)
    VALUES (:symbol, '{CommandKind.AMEND.value}', :id, CAST(:payload AS jsonb))
    """  # noqa: S608  # enum constant only
)


async def amend_order(
    engine: AsyncEngine, broker_id: UUID, order_id: UUID, quantity: int | None, price: int | None
) -> CommandResult:
    """Write an ``amend`` command (new total ``quantity`` and/or limit ``price``) for the broker's own live order.

    The engine decides: an amend it rejects leaves the order unchanged. Raises :class:`OrderNotFoundError`,
    :class:`OrderClosedError`, or :class:`InvalidOrderError` (nothing to change; a price for a market order).
    """
    if quantity is None and price is None:
        raise InvalidOrderError("give quantity and/or price", {"fields": ["quantity", "price"]})
    async with engine.begin() as conn:
        row = (await conn.execute(_LOCK_ORDER, {"id": order_id, "broker_id": broker_id})).first()
        if row is None:
            raise OrderNotFoundError()
        if row.status == OrderStatus.CLOSED.value:
            raise OrderClosedError("the order is closed and cannot be amended", {"order_id": str(order_id)})
        if price is not None and row.order_type == OrderType.MARKET.value:
            raise InvalidOrderError("a market order has no price to amend", {"field": "price"})
        payload = json.dumps({"quantity": quantity, "price": price})
        await conn.execute(_INSERT_AMEND, {"id": order_id, "symbol": row.symbol, "payload": payload})
        return CommandResult(row.symbol, written=True)

"""Builders shared by the engine unit tests: readable ids, order specs and a book driver with auto seq."""

from __future__ import annotations

from uuid import UUID

from exchange.engine import (
    Amend,
    Cancel,
    Event,
    ExpireDue,
    OrderBook,
    OrderSpec,
    OrderType,
    Place,
    RestingOrder,
    Side,
    StpMode,
    TimeInForce,
)
from exchange.engine.reference import ReferenceBook

SYMBOL = "ACME"
BROKER_A = UUID(int=0xA)
BROKER_B = UUID(int=0xB)
BROKER_C = UUID(int=0xC)
T0 = 1_700_000_000_000_000


def oid(n: int) -> UUID:
    """Order ``n``; tests name orders by small ints for readability."""
    return UUID(int=n)


def spec(
    n: int,
    side: Side,
    price: int | None,
    quantity: int,
    *,
    broker: UUID = BROKER_A,
    doc: str = "doc-1",
    order_type: OrderType | None = None,
    tif: TimeInForce | None = None,
    valid_until: int | None = None,
    stp: StpMode = StpMode.NONE,
    symbol: str = SYMBOL,
) -> OrderSpec:
    """A limit GTC order by default; ``price=None`` defaults to a market IOC."""
    if order_type is None:
        order_type = OrderType.MARKET if price is None else OrderType.LIMIT
    if tif is None:
        tif = TimeInForce.IOC if order_type is OrderType.MARKET else TimeInForce.GTC
    return OrderSpec(oid(n), broker, doc, symbol, side, order_type, tif, price, quantity, valid_until, stp)


class Driver:
    """Applies commands to a book (engine or reference) with increasing seq numbers and a settable clock."""

    def __init__(self, book: OrderBook | ReferenceBook, now: int = T0) -> None:
        self.book = book
        self.seq = 0
        self.now = now

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def place(self, order: OrderSpec) -> list[Event]:
        return self.book.apply(Place(self._next(), order), self.now)

    def cancel(self, n: int) -> list[Event]:
        return self.book.apply(Cancel(self._next(), oid(n)), self.now)

    def amend(self, n: int, quantity: int | None = None, price: int | None = None) -> list[Event]:
        return self.book.apply(Amend(self._next(), oid(n), quantity, price), self.now)

    def expire_due(self, limit: int | None = None) -> list[Event]:
        return self.book.apply(ExpireDue(self._next(), limit), self.now)

    def resting(self) -> list[RestingOrder]:
        return self.book.resting_orders()

    def resting_ids(self) -> list[UUID]:
        return [o.order_id for o in self.book.resting_orders()]

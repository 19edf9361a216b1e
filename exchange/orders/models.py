"""Plain read/write models returned by the order services (domain side; the api has its own wire Structs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID


@dataclass(frozen=True, slots=True)
class NewOrder:
    """A validated order request, ready to be written. ``time_in_force`` is already resolved."""

    order_id: UUID
    broker_id: UUID
    document_number: str
    symbol: str
    side: str
    order_type: str
    time_in_force: str
    price: int | None
    quantity: int
    valid_until: datetime | None
    """In UTC (:func:`exchange.orders.accept.resolve_time_in_force`)."""
    stp: str
    client_order_id: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class PlaceResult:
    order_id: UUID
    """The new order's id, or the original order's id when the request was a duplicate."""
    created: bool
    """False when a ``client_order_id``/``Idempotency-Key`` matched an existing order (nothing was written)."""
    created_at: datetime | None = None
    """The new order's ``created_at`` (None for a duplicate)."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    """Outcome of a cancel/amend: ``written`` when a command row was inserted for ``symbol``."""

    symbol: str
    written: bool
    seq: int | None = None
    """The written command's sequence number, where the writer needs it (an amend's: its waiter asks whether the
    command was processed)."""


@dataclass(frozen=True, slots=True)
class TradeView:
    trade_id: UUID
    price: int
    quantity: int
    counterparty_broker: str
    executed_at: datetime


@dataclass(frozen=True, slots=True)
class OrderView:
    id: UUID
    side: str
    order_type: str
    time_in_force: str
    symbol: str
    price: int | None
    quantity: int
    remaining_quantity: int
    status: str
    close_reason: str | None
    valid_until: datetime | None
    created_at: datetime
    updated_at: datetime
    client_order_id: str | None
    document_number: str
    stp: str
    trades: list[TradeView] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class OrderPage:
    items: list[OrderView]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class BookLevel:
    price: int
    total_quantity: int
    order_count: int


@dataclass(frozen=True, slots=True)
class BookView:
    symbol: str
    bids: list[BookLevel]
    asks: list[BookLevel]


@dataclass(frozen=True, slots=True)
class PriceView:
    symbol: str
    last_price: int
    average_price: int
    trades_in_average: int


@dataclass(frozen=True, slots=True)
class PublicTrade:
    trade_id: UUID
    price: int
    quantity: int
    taker_side: str
    executed_at: datetime


@dataclass(frozen=True, slots=True)
class BalanceView:
    broker_id: UUID
    broker_name: str
    balance: int


@dataclass(frozen=True, slots=True)
class PositionView:
    symbol: str
    quantity: int


@dataclass(frozen=True, slots=True)
class BrokerIdentity:
    id: UUID
    name: str


@dataclass(frozen=True, slots=True)
class RegisteredBroker:
    broker_id: UUID
    name: str
    api_key: str
    """Shown once; only its SHA-256 is stored."""
    webhook_url: str | None
    webhook_secret: str

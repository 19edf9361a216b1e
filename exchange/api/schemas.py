"""Wire types: the JSON bodies the api accepts and returns (msgspec Structs), separate from domain types.

Request Structs forbid unknown fields, bound prices and quantities to ``MAX_PRICE_CENTS``/``MAX_QUANTITY``
(so one trade's cash fits 64 bits with room to accumulate), refuse NUL in text, and require timezone-aware
datetimes. :func:`decode_body` is the only way a
controller reads a body: unparsable JSON → 400 ``malformed_json``; well-formed JSON with bad fields → 422
``validation_error`` with the offending path in ``details``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import msgspec

from exchange.api.errors import ApiError
from exchange.orders import models
from exchange.orders.accept import SYMBOL_RE

# Largest price (cents) and quantity (shares) an order may carry. Their product, the cash of one trade, must stay
# far inside PostgreSQL's bigint (2**63 - 1 ≈ 9.2e18) so balances can accumulate many such trades: 10**9 cents
# (ten million per share) times 10**9 shares = 10**18.
MAX_PRICE_CENTS = 10**9
MAX_QUANTITY = 10**9
Price = Annotated[int, msgspec.Meta(gt=0, le=MAX_PRICE_CENTS)]
Quantity = Annotated[int, msgspec.Meta(gt=0, le=MAX_QUANTITY)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
Symbol = Annotated[str, msgspec.Meta(pattern=SYMBOL_RE.pattern)]
# PostgreSQL text cannot hold NUL (0x00): refuse it at the edge as a 422 instead of failing in the database. Written
# so that Python (msgspec) and ECMA-262 (the OpenAPI schema's "pattern") read it alike: no \A or \Z.
_NO_NUL = r"^[^\x00]*$"
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100, pattern=_NO_NUL)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=2048, pattern=_NO_NUL)]
DocumentNumber = Annotated[str, msgspec.Meta(min_length=1, max_length=20, pattern=_NO_NUL)]
ClientOrderId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=_NO_NUL)]
SideName = Literal["bid", "ask"]
OrderTypeName = Literal["limit", "market"]
TimeInForceName = Literal["gtc", "gtd", "ioc", "fok"]
StpName = Literal["none", "cancel_newest", "cancel_oldest", "cancel_both", "decrement"]


class _Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class RegisterRequest(_Request):
    name: Name
    webhook_url: Url | None = None


class PlaceOrderRequest(_Request):
    document_number: DocumentNumber
    side: SideName
    symbol: Symbol
    quantity: Quantity
    order_type: OrderTypeName = "limit"
    price: Price | None = None
    valid_until: AwareDatetime | None = None
    time_in_force: TimeInForceName | None = None
    client_order_id: ClientOrderId | None = None
    stp: StpName = "none"


class AmendOrderRequest(_Request):
    quantity: Quantity | None = None
    price: Price | None = None


T = TypeVar("T")

_PATH = re.compile(r" - at `(?P<path>[^`]+)`$")


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode a JSON request body into ``type_`` or raise the matching :class:`ApiError`."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        message = str(exc)
        details: dict[str, Any] = {}
        match = _PATH.search(message)
        if match:
            details["path"] = match.group("path")
            message = message[: match.start()]
        raise ApiError("validation_error", message, details or None) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec raises the latter for a string's bad UTF-8
        raise ApiError("malformed_json", f"request body is not valid JSON: {exc}") from None


# ------------------------------------------------------------------------------------------------ responses


class _Response(msgspec.Struct, kw_only=True):
    pass


class RegisterResponse(_Response):
    broker_id: UUID
    name: str
    api_key: str
    webhook_url: str | None
    webhook_secret: str


class TradeOut(_Response):
    trade_id: UUID
    price: int
    quantity: int
    counterparty_broker: str
    executed_at: datetime


class OrderSummaryOut(_Response):
    id: UUID
    order_id: UUID
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


class OrderOut(OrderSummaryOut):
    trades: list[TradeOut]


class OrderPageOut(_Response):
    items: list[OrderSummaryOut]
    next_cursor: str | None


class CancelAllOut(_Response):
    symbol: str
    cancelled: int


class BookLevelOut(_Response):
    price: int
    total_quantity: int
    order_count: int


class BookOut(_Response):
    symbol: str
    bids: list[BookLevelOut]
    asks: list[BookLevelOut]


class PriceOut(_Response):
    symbol: str
    last_price: int
    average_price: int
    trades_in_average: int


class PublicTradeOut(_Response):
    trade_id: UUID
    price: int
    quantity: int
    taker_side: str
    executed_at: datetime


class TradesOut(_Response):
    symbol: str
    trades: list[PublicTradeOut]


class BalanceOut(_Response):
    broker_id: UUID
    broker_name: str
    balance: int


class PositionOut(_Response):
    symbol: str
    quantity: int


class TradeCountOut(_Response):
    trade_count: int


class ResetOut(_Response):
    reset: bool


class HealthOut(_Response):
    status: str


class CheckOut(_Response):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class ReadyOut(_Response):
    status: str
    checks: dict[str, CheckOut]


# ------------------------------------------------------------------------------------------------ mapping


def _summary_fields(view: models.OrderView) -> dict[str, Any]:
    return {
        "id": view.id,
        "order_id": view.id,
        "side": view.side,
        "order_type": view.order_type,
        "time_in_force": view.time_in_force,
        "symbol": view.symbol,
        "price": view.price,
        "quantity": view.quantity,
        "remaining_quantity": view.remaining_quantity,
        "status": view.status,
        "close_reason": view.close_reason,
        "valid_until": view.valid_until,
        "created_at": view.created_at,
        "updated_at": view.updated_at,
        "client_order_id": view.client_order_id,
        "document_number": view.document_number,
        "stp": view.stp,
    }


def to_wire(view: object, type_: type[T]) -> T:
    """Map a domain view onto the wire Struct whose fields have the same names (nested views too; attributes the
    Struct does not declare are ignored)."""
    return msgspec.convert(view, type_, from_attributes=True)


def order_out(view: models.OrderView) -> OrderOut:
    return OrderOut(**_summary_fields(view), trades=[to_wire(t, TradeOut) for t in view.trades])


def order_page_out(page: models.OrderPage) -> OrderPageOut:
    return OrderPageOut(items=[OrderSummaryOut(**_summary_fields(v)) for v in page.items], next_cursor=page.next_cursor)

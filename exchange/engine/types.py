"""Value types of the matching engine: orders, commands and events.

Everything here is plain data (frozen, slotted dataclasses and str enums) from the standard library only.
Invariants the types carry:

* Prices are integer cents (> 0), quantities integer shares (> 0); there is no float anywhere.
* Time is an integer number of microseconds since the Unix epoch (UTC), always passed in by the caller.
* Ids (order ids, broker ids) and sequence numbers are inputs; the engine never invents one.
  A trade is identified by the command's ``seq`` plus the fill's ``match_no`` within that command.
* Rejections are events (:class:`Rejected`), never exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

OrderId = UUID
BrokerId = UUID
Micros = int
"""Microseconds since the Unix epoch, UTC."""


class Side(StrEnum):
    BID = "bid"
    ASK = "ask"


class OrderType(StrEnum):
    LIMIT = "limit"
    MARKET = "market"


class TimeInForce(StrEnum):
    GTC = "gtc"
    """Good till cancelled: rests until filled or cancelled; has no ``valid_until``."""
    GTD = "gtd"
    """Good till date: rests until ``valid_until`` (exclusive: at ``valid_until`` it is expired)."""
    IOC = "ioc"
    """Immediate or cancel: trades what it can now, the rest is closed (``unfilled``); never rests. May carry a
    ``valid_until``: applied at or after it, the order is closed ``expired`` without trading."""
    FOK = "fok"
    """Fill or kill: trades its whole quantity in this command or trades nothing and is closed. May carry a
    ``valid_until``, as IOC."""


class StpMode(StrEnum):
    """Self-trade prevention, decided by the incoming (taker) order's mode.

    "Self" means the same broker *and* the same ``document_number`` (the same end client).
    """

    NONE = "none"
    CANCEL_NEWEST = "cancel_newest"
    CANCEL_OLDEST = "cancel_oldest"
    CANCEL_BOTH = "cancel_both"
    DECREMENT = "decrement"


class CloseReason(StrEnum):
    FILLED = "filled"
    CANCELLED = "cancelled"
    """Cancelled by its broker (while not expired: a cancel of an order past its ``valid_until`` closes it
    ``EXPIRED``)."""
    EXPIRED = "expired"
    UNFILLED = "unfilled"
    """IOC/market remainder, or a FOK that could not fill completely."""
    SELF_TRADE = "self_trade_prevented"
    MATCH_LIMIT = "match_limit_reached"
    """A GTC/GTD limit order (placed, or amended to a crossing price) that reached :data:`MAX_TAKER_MATCHES` resting
    orders while its price still crossed the next one: its remainder is closed rather than rested in a crossed
    book. (A market, IOC or FOK order that reaches the cap closes its remainder ``UNFILLED`` as always.)"""
    REJECTED = "rejected"


MAX_TAKER_MATCHES = 1000
"""Resting orders one taker may match in one command (an exchange protection, like venues' sweep protection): each
fill counts one, and so does each resting order that self-trade prevention cancels or decrements (both cost a
maker update and a webhook event); expired makers closed on the way do not count (they are bounded by the matcher's
expiry backlog rule). A taker that has matched this many and reaches one more live resting order within its price
trades no further: its remainder is closed, ``UNFILLED`` for a market/IOC order, ``MATCH_LIMIT`` for a GTC/GTD
limit order, which must not rest crossing the book. A FOK that would need more matches than this to fill in full
is killed whole (``UNFILLED``) before trading. So one command makes at most ``2 * MAX_TAKER_MATCHES + 2`` events
besides the expired makers it closes (:data:`MAX_COMMAND_EVENTS`).

Why a bound: the matcher applies a batch between two round trips of a transaction that may sit idle only 2 s
(``exchange.db.engines.IDLE_HOLDER_LIMIT_MS``); a market order against 100,000 one-lot resting orders made 100,000
fills whose planning and encoding (some 50-100 us a fill on a 2-core machine) outlasted that on every retry and
wedged its symbol. A book may be built with another cap (``OrderBook(symbol, max_taker_matches=...)``), as the
property tests do to reach it often."""

MAX_COMMAND_EVENTS = 2 * MAX_TAKER_MATCHES + 2
"""The most events a ``Place`` or an ``Amend`` produces, expired makers aside: its ``Accepted``/``Amended``, two per
maker matched (a ``Fill`` and its ``Closed(FILLED)``; or a maker's self-trade close or decrement and the taker's
``Decremented``), and the taker's terminal event (a taker ``Closed`` by self-trade prevention is its last)."""


class RejectReason(StrEnum):
    DUPLICATE_ORDER_ID = "duplicate_order_id"
    UNKNOWN_ORDER = "unknown_order"
    INVALID_QUANTITY = "invalid_quantity"
    INVALID_PRICE = "invalid_price"
    INVALID_TIME_IN_FORCE = "invalid_time_in_force"
    WRONG_SYMBOL = "wrong_symbol"
    NOT_AMENDABLE = "not_amendable"
    """Amend that would leave nothing to trade (new total quantity <= already filled quantity), or of a resting
    GTD order already expired at ``now``. (Amend of an order that is not resting is ``UNKNOWN_ORDER``.)"""


@dataclass(frozen=True, slots=True)
class OrderSpec:
    """What a broker asked for; the engine validates it when the ``Place`` command is applied."""

    order_id: OrderId
    broker_id: BrokerId
    document_number: str
    symbol: str
    side: Side
    order_type: OrderType
    time_in_force: TimeInForce
    price: int | None
    quantity: int
    valid_until: Micros | None = None
    stp: StpMode = StpMode.NONE


@dataclass(slots=True)
class RestingOrder:
    """An order resting in the book. ``priority`` is the seq that gives it its place in the FIFO queue of
    its price level: the ``seq`` of its place command, or of the amend that last cost it its priority."""

    order_id: OrderId
    broker_id: BrokerId
    document_number: str
    side: Side
    price: int
    quantity: int
    """Total quantity of the order (after amends)."""
    remaining: int
    priority: int
    valid_until: Micros | None = None
    stp: StpMode = StpMode.NONE


# ----------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Place:
    seq: int
    order: OrderSpec


@dataclass(frozen=True, slots=True)
class Cancel:
    seq: int
    order_id: OrderId


@dataclass(frozen=True, slots=True)
class Amend:
    """Change a resting order. ``quantity`` is the new *total* quantity (filled + remaining), ``price`` the new
    limit; ``None`` keeps the current value. Quantity down at the same price keeps time priority; a price change
    or a quantity increase moves the order to the back of its level (priority = this ``seq``)."""

    seq: int
    order_id: OrderId
    quantity: int | None = None
    price: int | None = None


@dataclass(frozen=True, slots=True)
class ExpireDue:
    """Close every resting order whose ``valid_until`` <= ``now``; with ``limit``, only the first ``limit`` of them
    by ``(valid_until, priority, order_id)``: the earliest deadlines first (a negative limit counts as 0). The
    others stay for a later ``ExpireDue`` and still never trade. The limit keeps one command's work bounded: the
    due orders of a book can be all of it (a sweeper down for hours, a whole book's end-of-day deadline)."""

    seq: int
    limit: int | None = None


Command = Place | Cancel | Amend | ExpireDue


# ------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Accepted:
    seq: int
    order_id: OrderId


@dataclass(frozen=True, slots=True)
class Rested:
    seq: int
    order_id: OrderId
    side: Side
    price: int
    remaining: int


@dataclass(frozen=True, slots=True)
class Fill:
    """One trade between a resting maker and the incoming taker. ``price`` is the seller's price."""

    seq: int
    match_no: int
    """0, 1, 2, ... within the command; (seq, match_no) identifies the trade."""
    price: int
    quantity: int
    maker_order_id: OrderId
    maker_broker_id: BrokerId
    maker_remaining: int
    taker_order_id: OrderId
    taker_broker_id: BrokerId
    taker_remaining: int
    taker_side: Side


@dataclass(frozen=True, slots=True)
class Amended:
    seq: int
    order_id: OrderId
    price: int
    quantity: int
    remaining: int
    priority_kept: bool


@dataclass(frozen=True, slots=True)
class Decremented:
    """Self-trade prevention in ``decrement`` mode took ``quantity`` and ``remaining`` of a live order down by the
    same amount without a trade (the order stays live; ``quantity``/``remaining`` are the new values, so
    ``quantity = remaining + sum of fills`` keeps holding). Emitted for the maker or the taker that survives a
    decrement; the one that reaches zero gets ``Closed(SELF_TRADE)`` with its pre-decrement ``remaining``
    instead. Added by the engine (additive to the original contract)."""

    seq: int
    order_id: OrderId
    quantity: int
    remaining: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The order left the book (or never entered it) for ``reason``; ``remaining`` is what was left untraded.
    Every order that stops being live gets exactly one ``Closed`` event, including ``FILLED``."""

    seq: int
    order_id: OrderId
    reason: CloseReason
    remaining: int


@dataclass(frozen=True, slots=True)
class Rejected:
    seq: int
    order_id: OrderId | None
    reason: RejectReason


Event = Accepted | Rested | Fill | Amended | Decremented | Closed | Rejected

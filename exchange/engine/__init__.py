"""The pure matching engine: :class:`OrderBook` (one per symbol) and the value types it speaks.

``book.apply(command, now) -> list[Event]`` is the only way the book changes; see :mod:`exchange.engine.book`
for the rules and the exact event order, and :mod:`exchange.engine.types` for the contract types.
"""

from exchange.engine.book import DepthLevel, OrderBook
from exchange.engine.hashing import hash_resting
from exchange.engine.types import (
    MAX_COMMAND_EVENTS,
    MAX_TAKER_MATCHES,
    Accepted,
    Amend,
    Amended,
    BrokerId,
    Cancel,
    Closed,
    CloseReason,
    Command,
    Decremented,
    Event,
    ExpireDue,
    Fill,
    Micros,
    OrderId,
    OrderSpec,
    OrderType,
    Place,
    Rejected,
    RejectReason,
    Rested,
    RestingOrder,
    Side,
    StpMode,
    TimeInForce,
)

__all__ = [
    "MAX_COMMAND_EVENTS",
    "MAX_TAKER_MATCHES",
    "Accepted",
    "Amend",
    "Amended",
    "BrokerId",
    "Cancel",
    "CloseReason",
    "Closed",
    "Command",
    "Decremented",
    "DepthLevel",
    "Event",
    "ExpireDue",
    "Fill",
    "Micros",
    "OrderBook",
    "OrderId",
    "OrderSpec",
    "OrderType",
    "Place",
    "RejectReason",
    "Rejected",
    "Rested",
    "RestingOrder",
    "Side",
    "StpMode",
    "TimeInForce",
    "hash_resting",
]

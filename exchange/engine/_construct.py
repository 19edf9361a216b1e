"""Fast constructors for the hot event types.

Why: a frozen dataclass's generated ``__init__`` sets every field through ``object.__setattr__`` (generic attribute
lookup per field), which made event construction the largest single cost of ``apply`` (a ``Fill`` took ~2 us).
Writing the slot member descriptors directly builds an identical instance (same type, same field values, same
equality and hash) at roughly half the cost.

Safety: the field lists are checked against :func:`dataclasses.fields` at import time, so a field added to or
renamed in :mod:`exchange.engine.types` fails loudly at import instead of leaving a slot unset. The property
tests compare these events with the reference's, which uses the ordinary constructors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

from exchange.engine.types import Accepted, BrokerId, Closed, CloseReason, Fill, OrderId, Rested, Side

_Setter = Callable[[object, Any], None]
_new = object.__new__


def _setters(cls: type, *names: str) -> tuple[_Setter, ...]:
    actual = tuple(f.name for f in fields(cls))
    if actual != names:
        raise RuntimeError(f"{cls.__name__} fields changed: {actual} != {names}; update {__name__}")
    return tuple(vars(cls)[name].__set__ for name in names)


_A_SEQ, _A_ID = _setters(Accepted, "seq", "order_id")
_R_SEQ, _R_ID, _R_SIDE, _R_PRICE, _R_REM = _setters(Rested, "seq", "order_id", "side", "price", "remaining")
_C_SEQ, _C_ID, _C_REASON, _C_REM = _setters(Closed, "seq", "order_id", "reason", "remaining")
(_F_SEQ, _F_NO, _F_PRICE, _F_QTY, _F_MID, _F_MBR, _F_MREM, _F_TID, _F_TBR, _F_TREM, _F_SIDE) = _setters(
    Fill,
    "seq",
    "match_no",
    "price",
    "quantity",
    "maker_order_id",
    "maker_broker_id",
    "maker_remaining",
    "taker_order_id",
    "taker_broker_id",
    "taker_remaining",
    "taker_side",
)


def accepted(seq: int, order_id: OrderId) -> Accepted:
    e: Accepted = _new(Accepted)
    _A_SEQ(e, seq)
    _A_ID(e, order_id)
    return e


def rested(seq: int, order_id: OrderId, side: Side, price: int, remaining: int) -> Rested:
    e: Rested = _new(Rested)
    _R_SEQ(e, seq)
    _R_ID(e, order_id)
    _R_SIDE(e, side)
    _R_PRICE(e, price)
    _R_REM(e, remaining)
    return e


def closed(seq: int, order_id: OrderId, reason: CloseReason, remaining: int) -> Closed:
    e: Closed = _new(Closed)
    _C_SEQ(e, seq)
    _C_ID(e, order_id)
    _C_REASON(e, reason)
    _C_REM(e, remaining)
    return e


def fill(
    seq: int,
    match_no: int,
    price: int,
    quantity: int,
    maker_order_id: OrderId,
    maker_broker_id: BrokerId,
    maker_remaining: int,
    taker_order_id: OrderId,
    taker_broker_id: BrokerId,
    taker_remaining: int,
    taker_side: Side,
) -> Fill:
    e: Fill = _new(Fill)
    _F_SEQ(e, seq)
    _F_NO(e, match_no)
    _F_PRICE(e, price)
    _F_QTY(e, quantity)
    _F_MID(e, maker_order_id)
    _F_MBR(e, maker_broker_id)
    _F_MREM(e, maker_remaining)
    _F_TID(e, taker_order_id)
    _F_TBR(e, taker_broker_id)
    _F_TREM(e, taker_remaining)
    _F_SIDE(e, taker_side)
    return e

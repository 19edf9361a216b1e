"""Canonical serialisation and hash of a book's resting state.

Shared by :class:`~exchange.engine.book.OrderBook` and the naive reference so both hash the same bytes; it only
depends on the *list* of resting orders it is given, which each book produces in the canonical order:
bids by price descending then priority ascending, then asks by price ascending then priority ascending.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from exchange.engine.types import RestingOrder

HASH_VERSION = "exchange-book-v1"
"""Bumped whenever the serialisation below changes, so persisted hashes are never compared across formats."""


def canonical_line(order: RestingOrder) -> str:
    """One order as one line. The free-text ``document_number`` is length-prefixed so no content can forge a
    field separator."""
    doc = order.document_number
    valid_until = "-" if order.valid_until is None else str(order.valid_until)
    return (
        f"{order.side.value}|{order.price}|{order.priority}|{order.order_id.hex}|{order.broker_id.hex}|"
        f"{len(doc)}:{doc}|{order.quantity}|{order.remaining}|{valid_until}|{order.stp.value}\n"
    )


def hash_resting(symbol: str, orders: Iterable[RestingOrder]) -> str:
    """sha256 hex digest over ``symbol`` and the resting orders in the order given (must be canonical)."""
    h = hashlib.sha256()
    h.update(f"{HASH_VERSION}\n{len(symbol)}:{symbol}\n".encode())
    h.update("".join(canonical_line(o) for o in orders).encode())
    return h.hexdigest()

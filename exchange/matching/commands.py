"""Turning rows of the command log into engine commands.

The command log holds what was accepted; the engine decides what it means (invalid values become ``Rejected``
events there). Only a row that cannot be turned into a command at all (a place without its order, an unknown
kind) raises :class:`MalformedCommandError`, which the matcher quarantines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from exchange.engine.types import (
    Amend,
    Cancel,
    Command,
    ExpireDue,
    OrderSpec,
    OrderType,
    Place,
    Side,
    StpMode,
    TimeInForce,
)
from exchange.times import to_micros


class MalformedCommandError(ValueError):
    """A command row the engine cannot even be asked about (no order for a place, unknown kind). It fails the same
    way on every attempt, so the matcher quarantines it instead of retrying."""


@dataclass(frozen=True, slots=True)
class LoggedCommand:
    """One unprocessed row of ``commands`` joined with its order (for ``place``)."""

    seq: int
    kind: str
    order_id: UUID | None
    payload: Mapping[str, Any] | None
    broker_id: UUID | None = None
    document_number: str | None = None
    side: str | None = None
    order_type: str | None = None
    time_in_force: str | None = None
    price: int | None = None
    quantity: int | None = None
    valid_until: datetime | None = None
    stp: str | None = None


def to_engine_command(row: LoggedCommand, symbol: str) -> Command:
    if row.kind == "place":
        if (
            row.order_id is None
            or row.broker_id is None
            or row.side is None
            or row.order_type is None
            or row.time_in_force is None
            or row.quantity is None
        ):
            raise MalformedCommandError(f"place command {row.seq} has no order")
        return Place(
            seq=row.seq,
            order=OrderSpec(
                order_id=row.order_id,
                broker_id=row.broker_id,
                document_number=row.document_number or "",
                symbol=symbol,
                side=Side(row.side),
                order_type=OrderType(row.order_type),
                time_in_force=TimeInForce(row.time_in_force),
                price=row.price,
                quantity=row.quantity,
                valid_until=None if row.valid_until is None else to_micros(row.valid_until),
                stp=StpMode(row.stp or StpMode.NONE),
            ),
        )
    if row.kind == "cancel" and row.order_id is not None:
        return Cancel(seq=row.seq, order_id=row.order_id)
    if row.kind == "amend" and row.order_id is not None:
        payload = row.payload or {}
        return Amend(seq=row.seq, order_id=row.order_id, quantity=payload.get("quantity"), price=payload.get("price"))
    if row.kind == "expire":
        return ExpireDue(seq=row.seq)
    raise MalformedCommandError(f"command {row.seq}: unknown kind {row.kind!r}")

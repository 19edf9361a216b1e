"""What a batch of engine events means for the database: the write plan of one matcher transaction.

Pure: events and the book after the batch in, plain rows out; no SQL here. Invariants the plan keeps:

* Every order the events touch gets exactly one final row state (open with its resting remaining/priority, or
  closed with the reason and remaining of its ``Closed`` event).
* Each ``Fill`` yields one trade, a cash transfer (buyer pays, seller receives ``price * quantity``) and a
  share transfer of the same size, so cash and shares net to zero per batch.
* Each ``Fill`` yields exactly one outbox event per side; each close other than ``filled`` yields one event for
  the order's broker, and so do a place that never reached the book (``order.rejected``, see
  :func:`plan_rejected_place`) and each ``Decremented`` of a live order (``order.decremented``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from uuid import UUID

from exchange.engine.types import (
    Amended,
    Closed,
    CloseReason,
    Command,
    Decremented,
    Event,
    Fill,
    Place,
    Rejected,
    RejectReason,
    RestingOrder,
    Side,
)


@dataclass(slots=True)
class OrderUpdate:
    order_id: UUID
    status: str
    remaining: int | None
    close_reason: str | None
    priority: int | None
    price: int | None = None
    """New limit after an amend; ``None`` keeps the stored price."""
    quantity: int | None = None
    """New total quantity after an amend; ``None`` keeps the stored quantity."""


@dataclass(frozen=True, slots=True)
class TradeRow:
    seq: int
    match_no: int
    price: int
    quantity: int
    buy_order_id: UUID
    sell_order_id: UUID
    buy_broker_id: UUID
    sell_broker_id: UUID
    maker_order_id: UUID
    taker_side: Side


@dataclass(frozen=True, slots=True)
class OutboxDraft:
    """An outbox event before its per-broker sequence and id are assigned."""

    broker_id: UUID
    type: str
    order_id: UUID
    fill: Fill | None = None
    close: Closed | None = None
    decrement: Decremented | None = None
    side: Side | None = None
    remaining: int = 0
    reject_reason: str | None = None
    """Why a place was rejected (``order.rejected`` only): an engine ``RejectReason`` or :data:`UNPROCESSABLE`."""


@dataclass(slots=True)
class BatchEffects:
    orders: dict[UUID, OrderUpdate] = field(default_factory=dict)
    trades: list[TradeRow] = field(default_factory=list)
    cash: dict[UUID, int] = field(default_factory=dict)
    shares: dict[UUID, int] = field(default_factory=dict)
    outbox: list[OutboxDraft] = field(default_factory=list)
    last_price: int | None = None
    rejected: dict[int, str] = field(default_factory=dict)
    """The commands the engine rejected (or the matcher quarantined), by sequence number: their reject reason,
    written on the command's row with its ``processed_at`` (a refused amend changes no order, and its request must
    still tell the broker it was refused)."""

    @property
    def touched_brokers(self) -> list[UUID]:
        """Brokers whose row this batch updates, sorted: rows are locked in this order to avoid deadlocks."""
        ids = set(self.cash) | {d.broker_id for d in self.outbox}
        return sorted(ids)


CLOSE_EVENT_TYPES: dict[CloseReason, str] = {
    CloseReason.CANCELLED: "order.cancelled",
    CloseReason.EXPIRED: "order.expired",
    CloseReason.UNFILLED: "order.unfilled",
    CloseReason.SELF_TRADE: "order.cancelled",
    CloseReason.MATCH_LIMIT: "order.cancelled",
    CloseReason.REJECTED: "order.rejected",
}
"""The webhook event of each close but ``filled``. The exchange's own cancels (self-trade prevention, the match cap
of a resting order's remainder) are ``order.cancelled``; their body's ``reason`` says which."""


DECREMENTED_EVENT_TYPE = "order.decremented"
"""A live order's quantity taken down by self-trade prevention (``stp: decrement``); it stays live."""

UNPROCESSABLE = "unprocessable"
"""The reject reason of a place the matcher quarantined: its command failed the same way on every attempt."""


def plan_rejected_place(
    plan: BatchEffects, seq: int, order_id: UUID, broker_id: UUID, side: Side, quantity: int, reason: str
) -> None:
    """A place that never reached the book: its pending order closes ``rejected`` with nothing traded, and its
    broker is told (``order.rejected``), since the api may have answered the place before the matcher decided."""
    plan.orders[order_id] = OrderUpdate(
        order_id=order_id,
        status="closed",
        remaining=quantity,
        close_reason=CloseReason.REJECTED.value,
        priority=None,
    )
    plan.outbox.append(
        OutboxDraft(
            broker_id=broker_id,
            type=CLOSE_EVENT_TYPES[CloseReason.REJECTED],
            order_id=order_id,
            close=Closed(seq, order_id, CloseReason.REJECTED, quantity),
            side=side,
            remaining=quantity,
            reject_reason=reason,
        )
    )


def plan_batch(
    applied: Iterable[tuple[Command, list[Event]]],
    resting_after: dict[UUID, RestingOrder],
    owners: dict[UUID, tuple[UUID, Side]],
) -> BatchEffects:
    """Fold the events of every command of a batch into one write plan.

    ``applied`` is (command, its events) in application order; ``resting_after`` maps every order still resting
    after the batch; ``owners`` maps order id → (broker id, side) for every order the events mention.
    """
    plan = BatchEffects()
    new_price: dict[UUID, int] = {}
    new_quantity: dict[UUID, int] = {}
    for command, events in applied:
        for event in events:
            if isinstance(event, Fill):
                _plan_fill(plan, event, owners)
            elif isinstance(event, Closed):
                _touch(plan, event.order_id)
                if event.reason is not CloseReason.FILLED:
                    broker_id, side = owners[event.order_id]
                    plan.outbox.append(
                        OutboxDraft(
                            broker_id=broker_id,
                            type=CLOSE_EVENT_TYPES[event.reason],
                            order_id=event.order_id,
                            close=event,
                            side=side,
                            remaining=event.remaining,
                        )
                    )
                plan.orders[event.order_id] = OrderUpdate(
                    order_id=event.order_id,
                    status="closed",
                    remaining=event.remaining,
                    close_reason=event.reason.value,
                    priority=None,
                )
            elif isinstance(event, Rejected):
                plan.rejected[event.seq] = event.reason.value
                # A rejected place closes its (pending) order; a rejected cancel/amend changes nothing. A place
                # rejected for its duplicate id names another order, whose state is not this command's to change.
                spec = command.order if isinstance(command, Place) else None
                if (
                    spec is not None
                    and event.order_id == spec.order_id
                    and event.reason is not RejectReason.DUPLICATE_ORDER_ID
                ):
                    plan_rejected_place(
                        plan, event.seq, spec.order_id, spec.broker_id, spec.side, spec.quantity, event.reason.value
                    )
            elif isinstance(event, Amended):
                new_price[event.order_id] = event.price
                new_quantity[event.order_id] = event.quantity
                _touch(plan, event.order_id)
            elif isinstance(event, Decremented):
                # Self-trade prevention shrank a live order's total quantity without a trade: its broker is told,
                # or the order's remaining quantity would drop with no fill to explain it.
                new_quantity[event.order_id] = event.quantity
                _touch(plan, event.order_id)
                broker_id, side = owners[event.order_id]
                plan.outbox.append(
                    OutboxDraft(
                        broker_id=broker_id,
                        type=DECREMENTED_EVENT_TYPE,
                        order_id=event.order_id,
                        decrement=event,
                        side=side,
                        remaining=event.remaining,
                    )
                )
            else:
                _touch(plan, event.order_id)
    for order_id, update in plan.orders.items():
        resting = resting_after.get(order_id)
        if resting is not None:
            # The book after the batch is the truth for every order still resting in it.
            update.status = "open"
            update.remaining = resting.remaining
            update.close_reason = None
            update.priority = resting.priority
            update.price = resting.price
            update.quantity = resting.quantity
        else:
            update.price = new_price.get(order_id)
            update.quantity = new_quantity.get(order_id)
    return plan


def _touch(plan: BatchEffects, order_id: UUID) -> None:
    if order_id not in plan.orders:
        plan.orders[order_id] = OrderUpdate(
            order_id=order_id, status="open", remaining=None, close_reason=None, priority=None
        )


def _plan_fill(plan: BatchEffects, fill: Fill, owners: dict[UUID, tuple[UUID, Side]]) -> None:
    _touch(plan, fill.maker_order_id)
    _touch(plan, fill.taker_order_id)
    if fill.taker_side is Side.BID:
        buy_order, buy_broker = fill.taker_order_id, fill.taker_broker_id
        sell_order, sell_broker = fill.maker_order_id, fill.maker_broker_id
    else:
        buy_order, buy_broker = fill.maker_order_id, fill.maker_broker_id
        sell_order, sell_broker = fill.taker_order_id, fill.taker_broker_id
    plan.trades.append(
        TradeRow(
            seq=fill.seq,
            match_no=fill.match_no,
            price=fill.price,
            quantity=fill.quantity,
            buy_order_id=buy_order,
            sell_order_id=sell_order,
            buy_broker_id=buy_broker,
            sell_broker_id=sell_broker,
            maker_order_id=fill.maker_order_id,
            taker_side=fill.taker_side,
        )
    )
    notional = fill.price * fill.quantity
    plan.cash[buy_broker] = plan.cash.get(buy_broker, 0) - notional
    plan.cash[sell_broker] = plan.cash.get(sell_broker, 0) + notional
    plan.shares[buy_broker] = plan.shares.get(buy_broker, 0) + fill.quantity
    plan.shares[sell_broker] = plan.shares.get(sell_broker, 0) - fill.quantity
    plan.last_price = fill.price
    maker_side = Side.ASK if fill.taker_side is Side.BID else Side.BID
    plan.outbox.append(
        OutboxDraft(
            broker_id=fill.maker_broker_id,
            type="order.fill",
            order_id=fill.maker_order_id,
            fill=fill,
            side=maker_side,
            remaining=fill.maker_remaining,
        )
    )
    plan.outbox.append(
        OutboxDraft(
            broker_id=fill.taker_broker_id,
            type="order.fill",
            order_id=fill.taker_order_id,
            fill=fill,
            side=fill.taker_side,
            remaining=fill.taker_remaining,
        )
    )

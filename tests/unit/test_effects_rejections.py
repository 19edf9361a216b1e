"""The write plan of a place the engine rejects: its order closes ``rejected`` and its broker is told."""

from __future__ import annotations

from exchange.engine import OrderBook, Place, Rejected, RejectReason, Side
from exchange.matching.effects import plan_batch
from tests.unit.support import BROKER_A, BROKER_B, SYMBOL, T0, oid, spec


def test_a_rejected_place_closes_its_order_rejected_and_tells_its_broker_why() -> None:
    book = OrderBook(SYMBOL)
    place = Place(1, spec(1, Side.BID, 0, 5, broker=BROKER_A))  # a limit at price 0: no book takes it
    events = book.apply(place, T0)
    assert events == [Rejected(1, oid(1), RejectReason.INVALID_PRICE)]

    plan = plan_batch([(place, events)], {}, {})

    update = plan.orders[oid(1)]
    assert (update.status, update.close_reason, update.remaining) == ("closed", "rejected", 5)
    [draft] = plan.outbox
    assert (draft.broker_id, draft.type, draft.order_id, draft.side) == (BROKER_A, "order.rejected", oid(1), Side.BID)
    assert (draft.remaining, draft.reject_reason) == (5, "invalid_price")
    assert plan.touched_brokers == [BROKER_A]


def test_a_place_rejected_for_the_id_of_a_resting_order_leaves_that_order_alone_and_tells_nobody() -> None:
    book = OrderBook(SYMBOL)
    first = Place(1, spec(1, Side.ASK, 100, 5, broker=BROKER_B))
    again = Place(2, spec(1, Side.BID, 90, 3, broker=BROKER_A))  # the same order id, another broker's
    applied = [(command, book.apply(command, T0)) for command in (first, again)]
    assert applied[1][1] == [Rejected(2, oid(1), RejectReason.DUPLICATE_ORDER_ID)]

    plan = plan_batch(applied, {o.order_id: o for o in book.resting_orders()}, {})

    update = plan.orders[oid(1)]
    assert (update.status, update.remaining, update.close_reason) == ("open", 5, None)
    assert plan.outbox == []

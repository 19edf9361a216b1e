"""The outbox events of a write plan beyond fills and closes: a rejected place, a self-trade decrement."""

from __future__ import annotations

from exchange.engine import Decremented, OrderBook, Place, Rejected, RejectReason, Side, StpMode
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


def test_each_order_a_self_trade_decrement_shrinks_gets_an_event_for_its_broker() -> None:
    book = OrderBook(SYMBOL)
    makers = [Place(n, spec(n, Side.ASK, 100, 2, broker=BROKER_A, stp=StpMode.DECREMENT)) for n in (1, 2)]
    taker = Place(3, spec(3, Side.BID, 100, 10, broker=BROKER_A, stp=StpMode.DECREMENT))
    applied = [(command, book.apply(command, T0)) for command in (*makers, taker)]
    assert [e for e in applied[2][1] if isinstance(e, Decremented)] == [
        Decremented(3, oid(3), 8, 8),
        Decremented(3, oid(3), 6, 6),
    ]
    owners = {oid(n): (BROKER_A, Side.ASK) for n in (1, 2)} | {oid(3): (BROKER_A, Side.BID)}

    plan = plan_batch(applied, {o.order_id: o for o in book.resting_orders()}, owners)

    decrements = [d for d in plan.outbox if d.type == "order.decremented"]
    assert [(d.order_id, d.remaining, d.decrement and d.decrement.quantity) for d in decrements] == [
        (oid(3), 8, 8),
        (oid(3), 6, 6),
    ]
    assert [(d.type, d.order_id) for d in plan.outbox if d.type != "order.decremented"] == [
        ("order.cancelled", oid(1)),
        ("order.cancelled", oid(2)),
    ]


def test_a_limit_order_closed_at_the_match_cap_tells_its_broker_it_was_cancelled_for_the_cap() -> None:
    book = OrderBook(SYMBOL, max_taker_matches=1)
    applied = [
        (command, book.apply(command, T0))
        for command in (
            Place(1, spec(1, Side.ASK, 100, 1, broker=BROKER_B)),
            Place(2, spec(2, Side.ASK, 101, 1, broker=BROKER_B)),
            Place(3, spec(3, Side.BID, 101, 2, broker=BROKER_A)),
        )
    ]
    owners = {oid(1): (BROKER_B, Side.ASK), oid(2): (BROKER_B, Side.ASK), oid(3): (BROKER_A, Side.BID)}

    plan = plan_batch(applied, {o.order_id: o for o in book.resting_orders()}, owners)

    update = plan.orders[oid(3)]
    assert (update.status, update.close_reason, update.remaining) == ("closed", "match_limit_reached", 1)
    assert [(d.type, d.order_id) for d in plan.outbox if d.close is not None] == [("order.cancelled", oid(3))]

"""One test per matching rule. Every test runs against both the fast engine and the naive reference.

Convention: bids come from BROKER_A and asks from BROKER_B (so they are never "self") unless a test says
otherwise; order ``n`` has id ``oid(n)`` and the n-th command of a test has seq n.
"""

from __future__ import annotations

from typing import Any

import pytest

from exchange.engine import (
    Accepted,
    Amended,
    Closed,
    CloseReason,
    Decremented,
    Fill,
    OrderBook,
    OrderSpec,
    OrderType,
    Place,
    Rejected,
    RejectReason,
    Rested,
    Side,
    StpMode,
    TimeInForce,
)
from exchange.engine.reference import ReferenceBook
from tests.unit.support import BROKER_A, BROKER_B, SYMBOL, T0, Driver, oid, spec

FILLED = CloseReason.FILLED
BID, ASK = Side.BID, Side.ASK


@pytest.fixture(params=["engine", "reference"])
def d(request: pytest.FixtureRequest) -> Driver:
    book = OrderBook(SYMBOL) if request.param == "engine" else ReferenceBook(SYMBOL)
    return Driver(book)


def bid(n: int, price: int | None, quantity: int, **kw: Any) -> OrderSpec:
    kw.setdefault("broker", BROKER_A)
    return spec(n, BID, price, quantity, **kw)


def ask(n: int, price: int | None, quantity: int, **kw: Any) -> OrderSpec:
    kw.setdefault("broker", BROKER_B)
    return spec(n, ASK, price, quantity, **kw)


def fill(
    seq: int,
    match_no: int,
    price: int,
    quantity: int,
    maker: int,
    maker_remaining: int,
    taker: int,
    taker_remaining: int,
    taker_side: Side,
) -> Fill:
    taker_broker, maker_broker = (BROKER_A, BROKER_B) if taker_side is BID else (BROKER_B, BROKER_A)
    return Fill(
        seq,
        match_no,
        price,
        quantity,
        oid(maker),
        maker_broker,
        maker_remaining,
        oid(taker),
        taker_broker,
        taker_remaining,
        taker_side,
    )


def closed(seq: int, n: int, reason: CloseReason, remaining: int = 0) -> Closed:
    return Closed(seq, oid(n), reason, remaining)


def remaining_by_id(d: Driver) -> dict[int, int]:
    return {o.order_id.int: o.remaining for o in d.resting()}


# --------------------------------------------------------------------------------------------------- matching


def test_bid_and_ask_at_the_same_price_trade(d: Driver) -> None:
    d.place(ask(1, 100, 10))
    assert d.place(bid(2, 100, 10)) == [
        Accepted(2, oid(2)),
        fill(2, 0, 100, 10, 1, 0, 2, 0, BID),
        closed(2, 1, FILLED),
        closed(2, 2, FILLED),
    ]
    assert d.resting() == []


def test_bid_below_ask_does_not_trade_and_both_rest(d: Driver) -> None:
    d.place(ask(1, 101, 10))
    assert d.place(bid(2, 100, 10)) == [Accepted(2, oid(2)), Rested(2, oid(2), BID, 100, 10)]
    assert d.resting_ids() == [oid(2), oid(1)]


def test_incoming_bid_above_resting_ask_trades_at_the_ask_price(d: Driver) -> None:
    d.place(ask(1, 90, 5))
    assert d.place(bid(2, 100, 5))[1] == fill(2, 0, 90, 5, 1, 0, 2, 0, BID)


def test_incoming_limit_ask_below_resting_bid_trades_at_its_own_limit(d: Driver) -> None:
    d.place(bid(1, 100, 5))
    assert d.place(ask(2, 90, 5))[1] == fill(2, 0, 90, 5, 1, 0, 2, 0, ASK)


def test_market_ask_trades_at_the_resting_bid_price(d: Driver) -> None:
    d.place(bid(1, 100, 5))
    assert d.place(ask(2, None, 5))[1] == fill(2, 0, 100, 5, 1, 0, 2, 0, ASK)


def test_market_bid_trades_at_the_resting_ask_price(d: Driver) -> None:
    d.place(ask(1, 103, 5))
    assert d.place(bid(2, None, 5))[1] == fill(2, 0, 103, 5, 1, 0, 2, 0, BID)


def test_partial_fill_against_one_counterparty_rests_the_taker_remainder(d: Driver) -> None:
    d.place(ask(1, 100, 4))
    assert d.place(bid(2, 100, 10)) == [
        Accepted(2, oid(2)),
        fill(2, 0, 100, 4, 1, 0, 2, 6, BID),
        closed(2, 1, FILLED),
        Rested(2, oid(2), BID, 100, 6),
    ]


def test_partial_fill_leaves_the_maker_resting_with_its_remainder(d: Driver) -> None:
    d.place(ask(1, 100, 10))
    assert d.place(bid(2, 100, 4)) == [
        Accepted(2, oid(2)),
        fill(2, 0, 100, 4, 1, 6, 2, 0, BID),
        closed(2, 2, FILLED),
    ]
    assert remaining_by_id(d) == {1: 6}


def test_one_order_fills_across_several_counterparties_and_levels(d: Driver) -> None:
    d.place(ask(1, 100, 3))
    d.place(ask(2, 101, 3))
    d.place(ask(3, 102, 3))
    assert d.place(bid(4, 101, 10)) == [
        Accepted(4, oid(4)),
        fill(4, 0, 100, 3, 1, 0, 4, 7, BID),
        closed(4, 1, FILLED),
        fill(4, 1, 101, 3, 2, 0, 4, 4, BID),
        closed(4, 2, FILLED),
        Rested(4, oid(4), BID, 101, 4),
    ]
    assert d.resting_ids() == [oid(4), oid(3)]


def test_three_sellers_at_one_price_fill_in_arrival_order(d: Driver) -> None:
    for n in (1, 2, 3):
        d.place(ask(n, 100, 2))
    events = d.place(bid(4, 100, 5))
    assert [e.maker_order_id for e in events if isinstance(e, Fill)] == [oid(1), oid(2), oid(3)]
    assert remaining_by_id(d) == {3: 1}


def test_better_price_fills_before_an_earlier_worse_price(d: Driver) -> None:
    d.place(ask(1, 101, 5))
    d.place(ask(2, 100, 5))
    events = d.place(bid(3, 101, 5))
    assert events[1] == fill(3, 0, 100, 5, 2, 0, 3, 0, BID)


def test_market_ioc_remainder_is_closed_unfilled(d: Driver) -> None:
    d.place(ask(1, 100, 3))
    assert d.place(bid(2, None, 5)) == [
        Accepted(2, oid(2)),
        fill(2, 0, 100, 3, 1, 0, 2, 2, BID),
        closed(2, 1, FILLED),
        closed(2, 2, CloseReason.UNFILLED, 2),
    ]
    assert d.resting() == []


def test_market_order_on_an_empty_side_closes_unfilled(d: Driver) -> None:
    assert d.place(ask(1, None, 5)) == [Accepted(1, oid(1)), closed(1, 1, CloseReason.UNFILLED, 5)]


# ----------------------------------------------------------------------------- late commits (seq out of order)
# A transaction that took its seq first can commit after later ones: its command is applied after commands with
# higher seqs, and FIFO within a level is still by seq (DESIGN §4), as a book rebuilt from Postgres queues it.


def place_at(d: Driver, seq: int, order: OrderSpec) -> list[Any]:
    return d.book.apply(Place(seq, order), d.now)


def test_a_late_place_queues_ahead_of_every_higher_seq_in_its_level(d: Driver) -> None:
    place_at(d, 3, ask(3, 100, 1))
    place_at(d, 4, ask(4, 100, 1))
    place_at(d, 2, ask(2, 100, 1))  # committed late: seq 2 goes in front of 3 and 4, not just of 4
    events = place_at(d, 5, bid(5, 100, 3))
    assert [e.maker_order_id for e in events if isinstance(e, Fill)] == [oid(2), oid(3), oid(4)]


def test_a_late_place_queues_behind_lower_seqs_and_ahead_of_higher_ones(d: Driver) -> None:
    for n in (1, 3, 5, 6):
        place_at(d, n, ask(n, 100, 1))
    place_at(d, 4, ask(4, 100, 1))
    place_at(d, 2, ask(2, 100, 1))
    assert [o.order_id.int for o in d.resting()] == [1, 2, 3, 4, 5, 6]
    events = place_at(d, 7, bid(7, 100, 6))
    assert [e.maker_order_id.int for e in events if isinstance(e, Fill)] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------------------- expiry


def test_expired_resting_order_is_closed_when_reached_and_never_trades(d: Driver) -> None:
    d.place(ask(1, 99, 5, tif=TimeInForce.GTD, valid_until=T0 + 10))
    d.place(ask(2, 100, 5))
    d.now = T0 + 10  # valid_until is exclusive: at valid_until the order is expired
    assert d.place(bid(3, 100, 5)) == [
        Accepted(3, oid(3)),
        closed(3, 1, CloseReason.EXPIRED, 5),
        fill(3, 0, 100, 5, 2, 0, 3, 0, BID),
        closed(3, 2, FILLED),
        closed(3, 3, FILLED),
    ]


def test_gtd_order_trades_before_its_valid_until(d: Driver) -> None:
    d.place(ask(1, 99, 5, tif=TimeInForce.GTD, valid_until=T0 + 10))
    d.now = T0 + 9
    assert d.place(bid(2, 100, 5))[1] == fill(2, 0, 99, 5, 1, 0, 2, 0, BID)


def test_incoming_gtd_order_already_expired_closes_without_trading(d: Driver) -> None:
    d.place(ask(1, 100, 5))
    assert d.place(bid(2, 100, 5, tif=TimeInForce.GTD, valid_until=T0)) == [
        Accepted(2, oid(2)),
        closed(2, 2, CloseReason.EXPIRED, 5),
    ]
    assert remaining_by_id(d) == {1: 5}


IOC_FOK = [
    pytest.param(OrderType.LIMIT, TimeInForce.IOC, id="limit-ioc"),
    pytest.param(OrderType.LIMIT, TimeInForce.FOK, id="limit-fok"),
    pytest.param(OrderType.MARKET, TimeInForce.IOC, id="market-ioc"),
    pytest.param(OrderType.MARKET, TimeInForce.FOK, id="market-fok"),
]


@pytest.mark.parametrize(("order_type", "tif"), IOC_FOK)
def test_ioc_or_fok_applied_at_or_after_its_valid_until_closes_expired_without_trading(
    d: Driver, order_type: OrderType, tif: TimeInForce
) -> None:
    # The matcher may apply an order long after the api accepted it: its deadline still holds (DESIGN §4).
    d.place(ask(1, 100, 5))
    d.now = T0 + 10
    price = 100 if order_type is OrderType.LIMIT else None
    taker = bid(2, price, 5, order_type=order_type, tif=tif, valid_until=T0 + 10)
    assert d.place(taker) == [Accepted(2, oid(2)), closed(2, 2, CloseReason.EXPIRED, 5)]
    assert remaining_by_id(d) == {1: 5}


@pytest.mark.parametrize(("order_type", "tif"), IOC_FOK)
def test_ioc_or_fok_applied_before_its_valid_until_trades_and_never_rests(
    d: Driver, order_type: OrderType, tif: TimeInForce
) -> None:
    d.place(ask(1, 100, 5))
    d.now = T0 + 9
    price = 100 if order_type is OrderType.LIMIT else None
    assert d.place(bid(2, price, 5, order_type=order_type, tif=tif, valid_until=T0 + 10)) == [
        Accepted(2, oid(2)),
        fill(2, 0, 100, 5, 1, 0, 2, 0, BID),
        closed(2, 1, FILLED),
        closed(2, 2, FILLED),
    ]
    # An IOC remainder is closed, not rested: nothing is left for a later sweep to expire.
    assert d.place(bid(3, 100, 5, tif=TimeInForce.IOC, valid_until=T0 + 10))[-1] == closed(
        3, 3, CloseReason.UNFILLED, 5
    )
    d.now = T0 + 10
    assert d.expire_due() == []
    assert d.resting() == []


def test_fok_past_its_valid_until_is_expired_even_when_it_could_not_fill(d: Driver) -> None:
    d.place(ask(1, 100, 3))
    d.now = T0 + 10
    assert d.place(bid(2, 100, 5, tif=TimeInForce.FOK, valid_until=T0 + 1)) == [
        Accepted(2, oid(2)),
        closed(2, 2, CloseReason.EXPIRED, 5),
    ]


def test_fok_feasibility_ignores_its_own_future_valid_until(d: Driver) -> None:
    d.place(ask(1, 100, 3))
    d.place(ask(2, 101, 3))
    assert d.place(bid(3, 101, 7, tif=TimeInForce.FOK, valid_until=T0 + 5))[-1] == closed(3, 3, CloseReason.UNFILLED, 7)
    assert d.place(bid(4, 101, 6, tif=TimeInForce.FOK, valid_until=T0 + 5))[-1] == closed(4, 4, FILLED)


def test_expire_due_closes_every_due_order_in_priority_order(d: Driver) -> None:
    d.place(ask(1, 105, 1, tif=TimeInForce.GTD, valid_until=T0 + 20))
    d.place(bid(2, 95, 1, tif=TimeInForce.GTD, valid_until=T0 + 10))
    d.place(bid(3, 96, 1))
    d.place(ask(4, 104, 1, tif=TimeInForce.GTD, valid_until=T0 + 30))
    d.now = T0 + 20
    assert d.expire_due() == [closed(5, 1, CloseReason.EXPIRED, 1), closed(5, 2, CloseReason.EXPIRED, 1)]
    assert d.resting_ids() == [oid(3), oid(4)]


def test_expire_due_closes_every_due_order_after_heavy_cancel_and_reprice_churn(d: Driver) -> None:
    # Enough churn that the engine compacts its expiry heap (stale entries of cancelled and re-priced orders)
    # several times: every live GTD order must survive each compaction and expire exactly once.
    until = T0 + 1_000
    for n in range(1, 301):
        d.place(ask(n, 100 + n % 3, 1, tif=TimeInForce.GTD, valid_until=until))
        if n % 4:
            d.cancel(n)
    survivors = list(range(4, 301, 4))
    for n in survivors:
        assert d.amend(n, price=110)[0] == Amended(d.seq, oid(n), 110, 1, 1, False)
    d.now = until
    events = d.expire_due()
    assert events == [closed(d.seq, n, CloseReason.EXPIRED, 1) for n in survivors]
    assert d.resting() == []


def test_a_limited_expire_due_closes_the_earliest_deadlines_first_and_leaves_the_rest_for_the_next(d: Driver) -> None:
    d.place(ask(1, 105, 1, tif=TimeInForce.GTD, valid_until=T0 + 20))
    d.place(bid(2, 95, 1, tif=TimeInForce.GTD, valid_until=T0 + 10))
    d.place(bid(3, 94, 1, tif=TimeInForce.GTD, valid_until=T0 + 20))
    d.place(ask(4, 104, 1, tif=TimeInForce.GTD, valid_until=T0 + 20))
    d.now = T0 + 20
    # Deadline first (2), then priority among equal deadlines (1 before 3); events in priority order.
    assert d.expire_due(limit=2) == [closed(5, 1, CloseReason.EXPIRED, 1), closed(5, 2, CloseReason.EXPIRED, 1)]
    assert d.resting_ids() == [oid(3), oid(4)]
    assert d.expire_due(limit=2) == [closed(6, 3, CloseReason.EXPIRED, 1), closed(6, 4, CloseReason.EXPIRED, 1)]
    assert d.expire_due(limit=2) == []


def test_expire_due_with_nothing_due_emits_nothing(d: Driver) -> None:
    d.place(ask(1, 105, 1, tif=TimeInForce.GTD, valid_until=T0 + 20))
    assert d.expire_due() == []


# ----------------------------------------------------------------------------------------------------- cancel


def test_cancel_closes_the_resting_order_with_its_remaining(d: Driver) -> None:
    d.place(ask(1, 100, 10))
    d.place(bid(2, 100, 4))
    assert d.cancel(1) == [closed(3, 1, CloseReason.CANCELLED, 6)]


def test_cancelled_order_does_not_trade_with_a_later_crossing_order(d: Driver) -> None:
    d.place(ask(1, 100, 5))
    d.cancel(1)
    assert d.place(bid(3, 100, 5)) == [Accepted(3, oid(3)), Rested(3, oid(3), BID, 100, 5)]


def test_cancel_of_an_order_past_its_valid_until_closes_it_expired_as_the_sweep_would(d: Driver) -> None:
    # Expired but not yet swept: an amend already says so, and the close reason (and the broker's webhook) must
    # not depend on whether ExpireDue ran before the cancel.
    d.place(ask(1, 100, 10, tif=TimeInForce.GTD, valid_until=T0 + 10))
    d.place(bid(2, 100, 4))
    d.now = T0 + 60_000_000
    assert d.amend(1, quantity=8) == [Rejected(3, oid(1), RejectReason.NOT_AMENDABLE)]
    assert d.cancel(1) == [closed(4, 1, CloseReason.EXPIRED, 6)]
    assert d.resting() == []


def test_cancel_at_exactly_valid_until_closes_expired_and_just_before_closes_cancelled(d: Driver) -> None:
    d.place(ask(1, 100, 5, tif=TimeInForce.GTD, valid_until=T0 + 10))
    d.place(ask(2, 100, 5, tif=TimeInForce.GTD, valid_until=T0 + 11))
    d.now = T0 + 10  # valid_until is exclusive
    assert d.cancel(2) == [closed(3, 2, CloseReason.CANCELLED, 5)]
    assert d.cancel(1) == [closed(4, 1, CloseReason.EXPIRED, 5)]


def test_cancel_of_an_unknown_order_is_rejected(d: Driver) -> None:
    assert d.cancel(42) == [Rejected(1, oid(42), RejectReason.UNKNOWN_ORDER)]


def test_cancel_of_an_already_closed_order_is_rejected_as_unknown(d: Driver) -> None:
    d.place(ask(1, 100, 5))
    d.cancel(1)
    assert d.cancel(1) == [Rejected(3, oid(1), RejectReason.UNKNOWN_ORDER)]


# ------------------------------------------------------------------------------------------- time in force


def test_gtc_limit_remainder_rests(d: Driver) -> None:
    assert d.place(bid(1, 100, 5))[-1] == Rested(1, oid(1), BID, 100, 5)


def test_gtd_limit_remainder_rests_with_its_valid_until(d: Driver) -> None:
    d.place(bid(1, 100, 5, tif=TimeInForce.GTD, valid_until=T0 + 5))
    assert [o.valid_until for o in d.resting()] == [T0 + 5]


def test_ioc_limit_trades_what_it_can_and_closes_the_rest(d: Driver) -> None:
    d.place(ask(1, 100, 3))
    d.place(ask(2, 102, 3))
    assert d.place(bid(3, 101, 5, tif=TimeInForce.IOC)) == [
        Accepted(3, oid(3)),
        fill(3, 0, 100, 3, 1, 0, 3, 2, BID),
        closed(3, 1, FILLED),
        closed(3, 3, CloseReason.UNFILLED, 2),
    ]
    assert d.resting_ids() == [oid(2)]


def test_fok_fills_completely_across_counterparties(d: Driver) -> None:
    d.place(ask(1, 100, 3))
    d.place(ask(2, 101, 3))
    events = d.place(bid(3, 101, 6, tif=TimeInForce.FOK))
    assert sum(e.quantity for e in events if isinstance(e, Fill)) == 6
    assert events[-1] == closed(3, 3, FILLED)


def test_fok_that_cannot_fill_completely_trades_nothing(d: Driver) -> None:
    d.place(ask(1, 100, 3))
    d.place(ask(2, 102, 3))
    assert d.place(bid(3, 101, 6, tif=TimeInForce.FOK)) == [
        Accepted(3, oid(3)),
        closed(3, 3, CloseReason.UNFILLED, 6),
    ]
    assert remaining_by_id(d) == {1: 3, 2: 3}


def test_fok_does_not_count_expired_liquidity(d: Driver) -> None:
    d.place(ask(1, 100, 3, tif=TimeInForce.GTD, valid_until=T0 + 1))
    d.place(ask(2, 100, 3))
    d.now = T0 + 1
    assert d.place(bid(3, 100, 6, tif=TimeInForce.FOK))[-1] == closed(3, 3, CloseReason.UNFILLED, 6)
    assert d.resting_ids() == [oid(1), oid(2)]  # an infeasible FOK changes nothing, not even expired orders


def test_market_fok_fills_completely_at_any_price(d: Driver) -> None:
    d.place(bid(1, 100, 3))
    d.place(bid(2, 50, 3))
    events = d.place(ask(3, None, 6, tif=TimeInForce.FOK))
    assert [e.price for e in events if isinstance(e, Fill)] == [100, 50]


# -------------------------------------------------------------------------------------- self-trade prevention


def self_pair(d: Driver, stp: StpMode, maker_qty: int, taker_qty: int) -> list[Any]:
    """Resting self ask 1 (broker A, doc-1) and an other-broker ask 2 behind it; self bid 3 comes in."""
    d.place(ask(1, 100, maker_qty, broker=BROKER_A))
    d.place(ask(2, 100, 5))
    return d.place(bid(3, 100, taker_qty, stp=stp))


def test_stp_none_trades_with_the_same_client(d: Driver) -> None:
    events = self_pair(d, StpMode.NONE, 5, 5)
    assert [(e.maker_order_id, e.quantity) for e in events if isinstance(e, Fill)] == [(oid(1), 5)]


def test_same_broker_with_another_document_is_not_a_self_trade(d: Driver) -> None:
    d.place(ask(1, 100, 5, broker=BROKER_A, doc="doc-2"))
    events = d.place(bid(2, 100, 5, stp=StpMode.CANCEL_NEWEST))
    assert [e.maker_order_id for e in events if isinstance(e, Fill)] == [oid(1)]


def test_stp_cancel_newest_closes_the_taker_and_keeps_the_maker(d: Driver) -> None:
    events = self_pair(d, StpMode.CANCEL_NEWEST, 5, 5)
    assert events == [Accepted(3, oid(3)), closed(3, 3, CloseReason.SELF_TRADE, 5)]
    assert d.resting_ids() == [oid(1), oid(2)]


def test_stp_cancel_oldest_closes_the_maker_and_keeps_matching(d: Driver) -> None:
    events = self_pair(d, StpMode.CANCEL_OLDEST, 5, 5)
    assert events == [
        Accepted(3, oid(3)),
        closed(3, 1, CloseReason.SELF_TRADE, 5),
        Fill(3, 0, 100, 5, oid(2), BROKER_B, 0, oid(3), BROKER_A, 0, BID),
        closed(3, 2, FILLED),
        closed(3, 3, FILLED),
    ]


def test_stp_cancel_both_closes_maker_then_taker(d: Driver) -> None:
    events = self_pair(d, StpMode.CANCEL_BOTH, 5, 5)
    assert events == [
        Accepted(3, oid(3)),
        closed(3, 1, CloseReason.SELF_TRADE, 5),
        closed(3, 3, CloseReason.SELF_TRADE, 5),
    ]
    assert d.resting_ids() == [oid(2)]


def test_stp_decrement_with_a_larger_maker_shrinks_it_and_closes_the_taker(d: Driver) -> None:
    events = self_pair(d, StpMode.DECREMENT, 8, 5)
    assert events == [
        Accepted(3, oid(3)),
        Decremented(3, oid(1), 3, 3),
        closed(3, 3, CloseReason.SELF_TRADE, 5),
    ]
    assert [(o.quantity, o.remaining) for o in d.resting()] == [(3, 3), (5, 5)]


def test_stp_decrement_with_a_larger_taker_closes_the_maker_and_keeps_matching(d: Driver) -> None:
    events = self_pair(d, StpMode.DECREMENT, 2, 5)
    assert events == [
        Accepted(3, oid(3)),
        closed(3, 1, CloseReason.SELF_TRADE, 2),
        Decremented(3, oid(3), 3, 3),
        Fill(3, 0, 100, 3, oid(2), BROKER_B, 2, oid(3), BROKER_A, 0, BID),
        closed(3, 3, FILLED),
    ]


def test_stp_decrement_with_equal_sizes_closes_both(d: Driver) -> None:
    events = self_pair(d, StpMode.DECREMENT, 5, 5)
    assert events == [
        Accepted(3, oid(3)),
        closed(3, 1, CloseReason.SELF_TRADE, 5),
        closed(3, 3, CloseReason.SELF_TRADE, 5),
    ]


def test_fok_with_cancel_oldest_skips_self_liquidity(d: Driver) -> None:
    d.place(ask(1, 100, 5, broker=BROKER_A))
    d.place(ask(2, 100, 5))
    assert d.place(bid(3, 100, 6, tif=TimeInForce.FOK, stp=StpMode.CANCEL_OLDEST))[-1] == closed(
        3, 3, CloseReason.UNFILLED, 6
    )
    d.place(ask(4, 100, 1))
    assert d.place(bid(5, 100, 6, tif=TimeInForce.FOK, stp=StpMode.CANCEL_OLDEST))[-1] == closed(5, 5, FILLED)


@pytest.mark.parametrize("stp", [StpMode.CANCEL_NEWEST, StpMode.CANCEL_BOTH, StpMode.DECREMENT])
def test_fok_reaching_self_liquidity_that_would_cancel_or_shrink_it_is_infeasible(d: Driver, stp: StpMode) -> None:
    d.place(ask(1, 100, 5))
    d.place(ask(2, 100, 5, broker=BROKER_A))
    d.place(ask(3, 100, 5))
    assert d.place(bid(4, 100, 6, tif=TimeInForce.FOK, stp=stp)) == [
        Accepted(4, oid(4)),
        closed(4, 4, CloseReason.UNFILLED, 6),
    ]


def test_fok_feasible_before_reaching_self_liquidity(d: Driver) -> None:
    d.place(ask(1, 100, 5))
    d.place(ask(2, 100, 5, broker=BROKER_A))
    assert d.place(bid(3, 100, 5, tif=TimeInForce.FOK, stp=StpMode.CANCEL_NEWEST))[-1] == closed(3, 3, FILLED)


def test_fok_with_stp_none_counts_self_liquidity(d: Driver) -> None:
    d.place(ask(1, 100, 5, broker=BROKER_A))
    assert d.place(bid(2, 100, 5, tif=TimeInForce.FOK))[-1] == closed(2, 2, FILLED)


# ------------------------------------------------------------------------------------------------------ amend


def test_amend_quantity_down_keeps_time_priority(d: Driver) -> None:
    d.place(ask(1, 100, 5))
    d.place(ask(2, 100, 5))
    assert d.amend(1, quantity=3) == [Amended(3, oid(1), 100, 3, 3, True)]
    assert d.resting_ids() == [oid(1), oid(2)]
    assert d.resting()[0].priority == 1


def test_amend_quantity_up_loses_time_priority(d: Driver) -> None:
    d.place(ask(1, 100, 5))
    d.place(ask(2, 100, 5))
    assert d.amend(1, quantity=6) == [Amended(3, oid(1), 100, 6, 6, False)]
    assert d.resting_ids() == [oid(2), oid(1)]
    assert d.resting()[1].priority == 3


def test_amend_price_change_loses_time_priority(d: Driver) -> None:
    d.place(ask(1, 101, 5))
    d.place(ask(2, 100, 5))
    assert d.amend(1, price=100) == [Amended(3, oid(1), 100, 5, 5, False)]
    assert d.resting_ids() == [oid(2), oid(1)]


def test_amend_of_a_partially_filled_order_counts_the_filled_quantity(d: Driver) -> None:
    d.place(ask(1, 100, 10))
    d.place(bid(2, 100, 4))
    assert d.amend(1, quantity=7) == [Amended(3, oid(1), 100, 7, 3, True)]


def test_amend_to_a_crossing_price_trades_as_taker_at_the_sellers_price_then_rests(d: Driver) -> None:
    d.place(bid(1, 100, 3))
    d.place(ask(2, 105, 5))
    assert d.amend(2, price=99) == [
        Amended(3, oid(2), 99, 5, 5, False),
        fill(3, 0, 99, 3, 1, 0, 2, 2, ASK),
        closed(3, 1, FILLED),
        Rested(3, oid(2), ASK, 99, 2),
    ]
    assert [(o.order_id, o.priority) for o in d.resting()] == [(oid(2), 3)]


def test_crossing_amend_that_fills_completely_closes_filled(d: Driver) -> None:
    d.place(ask(1, 100, 5))
    d.place(bid(2, 99, 5))
    assert d.amend(2, price=100)[-1] == closed(3, 2, FILLED)
    assert d.resting() == []


def test_amend_to_filled_quantity_or_below_is_not_amendable(d: Driver) -> None:
    d.place(ask(1, 100, 10))
    d.place(bid(2, 100, 4))
    assert d.amend(1, quantity=4) == [Rejected(3, oid(1), RejectReason.NOT_AMENDABLE)]
    assert remaining_by_id(d) == {1: 6}


def test_amend_of_an_expired_resting_order_is_not_amendable(d: Driver) -> None:
    d.place(ask(1, 100, 10, tif=TimeInForce.GTD, valid_until=T0 + 1))
    d.now = T0 + 1
    assert d.amend(1, quantity=5) == [Rejected(2, oid(1), RejectReason.NOT_AMENDABLE)]


def test_amend_of_an_unknown_order_is_rejected(d: Driver) -> None:
    assert d.amend(9, quantity=5) == [Rejected(1, oid(9), RejectReason.UNKNOWN_ORDER)]


@pytest.mark.parametrize(("quantity", "price", "reason"), [
    (0, None, RejectReason.INVALID_QUANTITY),
    (True, None, RejectReason.INVALID_QUANTITY),
    (None, 0, RejectReason.INVALID_PRICE),
    (None, -3, RejectReason.INVALID_PRICE),
])  # fmt: skip
def test_amend_with_an_invalid_value_is_rejected(
    d: Driver, quantity: int | None, price: int | None, reason: RejectReason
) -> None:
    d.place(ask(1, 100, 10))
    assert d.amend(1, quantity=quantity, price=price) == [Rejected(2, oid(1), reason)]


# ---------------------------------------------------------------------------------------------------- rejects


@pytest.mark.parametrize(("order", "reason"), [
    (bid(1, 100, 5, symbol="OTHER"), RejectReason.WRONG_SYMBOL),
    (bid(1, 100, 0), RejectReason.INVALID_QUANTITY),
    (bid(1, 100, -2), RejectReason.INVALID_QUANTITY),
    (bid(1, 100, True), RejectReason.INVALID_QUANTITY),
    (bid(1, 0, 5), RejectReason.INVALID_PRICE),
    (bid(1, -1, 5), RejectReason.INVALID_PRICE),
    (bid(1, True, 5), RejectReason.INVALID_PRICE),
    (bid(1, None, 5, order_type=OrderType.LIMIT), RejectReason.INVALID_PRICE),
    (bid(1, 100, 5, order_type=OrderType.MARKET, tif=TimeInForce.IOC), RejectReason.INVALID_PRICE),
    (bid(1, None, 5, tif=TimeInForce.GTC), RejectReason.INVALID_TIME_IN_FORCE),
    (bid(1, None, 5, tif=TimeInForce.GTD, valid_until=T0 + 9), RejectReason.INVALID_TIME_IN_FORCE),
    (bid(1, 100, 5, tif=TimeInForce.GTD), RejectReason.INVALID_TIME_IN_FORCE),
    (bid(1, 100, 5, tif=TimeInForce.GTC, valid_until=T0 + 9), RejectReason.INVALID_TIME_IN_FORCE),
    (bid(1, 100, 5, tif=TimeInForce.IOC, valid_until=True), RejectReason.INVALID_TIME_IN_FORCE),
    (bid(1, None, 5, tif=TimeInForce.FOK, valid_until=True), RejectReason.INVALID_TIME_IN_FORCE),
])  # fmt: skip
def test_invalid_place_emits_only_rejected_and_changes_nothing(
    d: Driver, order: OrderSpec, reason: RejectReason
) -> None:
    d.place(ask(7, 100, 5))
    assert d.place(order) == [Rejected(2, oid(1), reason)]
    assert remaining_by_id(d) == {7: 5}


def test_place_with_the_id_of_a_live_order_is_a_duplicate(d: Driver) -> None:
    d.place(ask(1, 100, 5))
    assert d.place(bid(1, 90, 5)) == [Rejected(2, oid(1), RejectReason.DUPLICATE_ORDER_ID)]


def test_place_reusing_the_id_of_a_closed_order_is_left_to_the_persistence_layer(d: Driver) -> None:
    d.place(ask(1, 100, 5))
    d.cancel(1)
    assert d.place(ask(1, 100, 5))[0] == Accepted(3, oid(1))


# ---------------------------------------------------------------------------------------------- the match cap
# A taker matches at most ``max_taker_matches`` resting orders in one command (MAX_TAKER_MATCHES in production; 2
# here): what is left once it has matched that many and reaches one more live crossing order is closed.

CAP = 2


@pytest.fixture(params=["engine", "reference"])
def c(request: pytest.FixtureRequest) -> Driver:
    """A book whose takers match at most :data:`CAP` resting orders, with three one-share asks at 100, 101, 102."""
    book = (OrderBook if request.param == "engine" else ReferenceBook)(SYMBOL, max_taker_matches=CAP)
    driver = Driver(book)
    for n, price in ((1, 100), (2, 101), (3, 102)):
        driver.place(ask(n, price, 1))
    return driver


def swept(seq: int, taker: int) -> list[Any]:
    """The events of a bid ``taker`` (command ``seq``) matching the asks 1 and 2 of :func:`c` for one share each."""
    return [
        fill(seq, 0, 100, 1, 1, 0, taker, 4, BID),
        closed(seq, 1, FILLED),
        fill(seq, 1, 101, 1, 2, 0, taker, 3, BID),
        closed(seq, 2, FILLED),
    ]


@pytest.mark.parametrize("price", [None, 105])
def test_a_market_or_ioc_order_at_the_match_cap_closes_its_remainder_unfilled(c: Driver, price: int | None) -> None:
    assert c.place(bid(4, price, 5, tif=TimeInForce.IOC)) == [
        Accepted(4, oid(4)),
        *swept(4, 4),
        closed(4, 4, CloseReason.UNFILLED, 3),
    ]
    assert c.resting_ids() == [oid(3)]


@pytest.mark.parametrize("tif", [TimeInForce.GTC, TimeInForce.GTD])
def test_a_resting_limit_order_at_the_match_cap_closes_its_remainder_instead_of_resting_crossed(
    c: Driver, tif: TimeInForce
) -> None:
    valid_until = T0 + 1000 if tif is TimeInForce.GTD else None
    assert c.place(bid(4, 105, 5, tif=tif, valid_until=valid_until)) == [
        Accepted(4, oid(4)),
        *swept(4, 4),
        closed(4, 4, CloseReason.MATCH_LIMIT, 3),
    ]
    assert c.resting_ids() == [oid(3)]


def test_a_limit_order_whose_crossing_orders_end_at_the_match_cap_rests_its_remainder(c: Driver) -> None:
    assert c.place(bid(4, 101, 5)) == [Accepted(4, oid(4)), *swept(4, 4), Rested(4, oid(4), BID, 101, 3)]
    assert c.resting_ids() == [oid(4), oid(3)]


def test_a_fok_needing_more_matches_than_the_cap_is_killed_whole(c: Driver) -> None:
    assert c.place(bid(4, None, 3, tif=TimeInForce.FOK)) == [
        Accepted(4, oid(4)),
        closed(4, 4, CloseReason.UNFILLED, 3),
    ]
    assert c.resting_ids() == [oid(1), oid(2), oid(3)]


def test_a_fok_filled_within_the_match_cap_trades(c: Driver) -> None:
    assert c.place(bid(4, None, 2, tif=TimeInForce.FOK)) == [
        Accepted(4, oid(4)),
        fill(4, 0, 100, 1, 1, 0, 4, 1, BID),
        closed(4, 1, FILLED),
        fill(4, 1, 101, 1, 2, 0, 4, 0, BID),
        closed(4, 2, FILLED),
        closed(4, 4, FILLED),
    ]


def test_an_amend_crossing_past_the_match_cap_closes_the_order_instead_of_resting_crossed(c: Driver) -> None:
    c.place(bid(4, 90, 5))
    assert c.amend(4, price=105) == [
        Amended(5, oid(4), 105, 5, 5, False),
        *swept(5, 4),
        closed(5, 4, CloseReason.MATCH_LIMIT, 3),
    ]
    assert c.resting_ids() == [oid(3)]


def test_resting_orders_closed_by_self_trade_prevention_count_against_the_match_cap(c: Driver) -> None:
    # Asks 1 and 2 are the taker's own (same broker and document): cancel_oldest closes them, which is work too.
    d = Driver(type(c.book)(SYMBOL, max_taker_matches=CAP))
    for n, price in ((1, 100), (2, 101)):
        d.place(ask(n, price, 1, broker=BROKER_A))
    d.place(ask(3, 102, 1))
    assert d.place(bid(4, None, 5, stp=StpMode.CANCEL_OLDEST)) == [
        Accepted(4, oid(4)),
        closed(4, 1, CloseReason.SELF_TRADE, 1),
        closed(4, 2, CloseReason.SELF_TRADE, 1),
        closed(4, 4, CloseReason.UNFILLED, 5),
    ]
    assert d.resting_ids() == [oid(3)]


def test_expired_resting_orders_closed_on_the_way_do_not_count_against_the_match_cap(c: Driver) -> None:
    c.place(ask(4, 99, 1, tif=TimeInForce.GTD, valid_until=T0 + 1))
    c.now = T0 + 1
    assert c.place(bid(5, 101, 2)) == [
        Accepted(5, oid(5)),
        closed(5, 4, CloseReason.EXPIRED, 1),
        fill(5, 0, 100, 1, 1, 0, 5, 1, BID),
        closed(5, 1, FILLED),
        fill(5, 1, 101, 1, 2, 0, 5, 0, BID),
        closed(5, 2, FILLED),
        closed(5, 5, FILLED),
    ]

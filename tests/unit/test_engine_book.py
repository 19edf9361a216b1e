"""The fast engine's own surface: queries, copies, rebuild, hashing and lazy deletion."""

from __future__ import annotations

import pytest

from exchange.engine import (
    MAX_COMMAND_EVENTS,
    MAX_TAKER_MATCHES,
    Cancel,
    Closed,
    CloseReason,
    ExpireDue,
    Fill,
    OrderBook,
    Place,
    RestingOrder,
    Side,
    TimeInForce,
)
from tests.unit.support import BROKER_A, BROKER_B, SYMBOL, T0, Driver, oid, spec


def build() -> Driver:
    """Bids 100 (orders 1, 2), 99 (3); asks 101 (4), 103 (5 GTD, 6)."""
    d = Driver(OrderBook(SYMBOL))
    d.place(spec(1, Side.BID, 100, 5))
    d.place(spec(2, Side.BID, 100, 7))
    d.place(spec(3, Side.BID, 99, 1))
    d.place(spec(4, Side.ASK, 101, 2, broker=BROKER_B))
    d.place(spec(5, Side.ASK, 103, 3, broker=BROKER_B, tif=TimeInForce.GTD, valid_until=T0 + 50))
    d.place(spec(6, Side.ASK, 103, 4, broker=BROKER_B))
    return d


def engine(d: Driver) -> OrderBook:
    assert isinstance(d.book, OrderBook)
    return d.book


def test_depth_aggregates_levels_best_first() -> None:
    book = engine(build())
    assert book.depth(10) == ([(100, 12, 2), (99, 1, 1)], [(101, 2, 1), (103, 7, 2)])
    assert book.depth(1) == ([(100, 12, 2)], [(101, 2, 1)])
    assert book.depth(0) == ([], [])


def test_best_prices_and_length() -> None:
    book = engine(build())
    assert (book.best_bid(), book.best_ask(), len(book)) == (100, 101, 6)
    empty = OrderBook(SYMBOL)
    assert (empty.best_bid(), empty.best_ask(), len(empty)) == (None, None, 0)


def test_resting_orders_are_in_canonical_order() -> None:
    book = engine(build())
    assert [o.order_id.int for o in book.resting_orders()] == [1, 2, 3, 4, 5, 6]


def test_get_returns_a_copy_that_cannot_change_the_book() -> None:
    book = engine(build())
    order = book.get(oid(1))
    assert order is not None
    assert order.remaining == 5
    order.remaining = 1
    assert book.depth(1)[0] == [(100, 12, 2)]
    assert book.get(oid(99)) is None


def test_rebuild_reproduces_the_state_hash_and_behaviour() -> None:
    d = build()
    rebuilt = OrderBook.rebuild(SYMBOL, engine(d).resting_orders())
    assert rebuilt.state_hash() == engine(d).state_hash()
    command = ExpireDue(100)
    assert rebuilt.apply(command, T0 + 50) == engine(d).apply(command, T0 + 50)
    assert rebuilt.state_hash() == engine(d).state_hash()


def test_rebuild_does_not_share_order_objects_with_the_caller() -> None:
    resting = engine(build()).resting_orders()
    rebuilt = OrderBook.rebuild(SYMBOL, resting)
    resting[0].remaining = 1
    assert rebuilt.depth(1)[0] == [(100, 12, 2)]


def test_a_rebuild_from_orders_handed_over_keeps_them_and_reproduces_the_book() -> None:
    d = build()
    resting = engine(d).resting_orders()
    rebuilt = OrderBook.rebuild(SYMBOL, resting, handed_over=True)
    assert rebuilt.state_hash() == engine(d).state_hash()
    command = ExpireDue(100)
    assert rebuilt.apply(command, T0 + 50) == engine(d).apply(command, T0 + 50)
    assert rebuilt.state_hash() == engine(d).state_hash()


def test_state_hash_depends_on_the_resting_state() -> None:
    d = build()
    before = engine(d).state_hash()
    assert len(before) == 64
    assert before == engine(build()).state_hash()
    d.amend(2, quantity=6)
    assert engine(d).state_hash() != before


def test_state_hash_depends_on_the_symbol() -> None:
    assert OrderBook("A").state_hash() != OrderBook("B").state_hash()


def _order(n: int, side: Side, price: int, remaining: int = 1, quantity: int = 1) -> RestingOrder:
    return RestingOrder(oid(n), BROKER_A, "d", side, price, quantity, remaining, n)


@pytest.mark.parametrize("orders", [
    [_order(1, Side.BID, 100), _order(2, Side.ASK, 100)],
    [_order(1, Side.BID, 100), _order(1, Side.BID, 99)],
    [_order(1, Side.BID, 100, remaining=0)],
    [_order(1, Side.BID, 100, remaining=2, quantity=1)],
    [_order(1, Side.ASK, 0)],
])  # fmt: skip
def test_rebuild_refuses_an_impossible_state(orders: list[RestingOrder]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message; the type is the contract
        OrderBook.rebuild(SYMBOL, orders)


def test_many_cancels_inside_one_level_keep_fifo_and_counts() -> None:
    d = Driver(OrderBook(SYMBOL))
    for n in range(1, 201):
        d.place(spec(n, Side.ASK, 100, 1, broker=BROKER_B))
    for n in range(1, 200):
        if n % 7:
            d.cancel(n)
    live = [n for n in range(1, 201) if n % 7 == 0 or n == 200]
    assert engine(d).depth(1)[1] == [(100, len(live), len(live))]
    events = d.place(spec(1000, Side.BID, None, len(live)))
    assert [e.order_id.int for e in events if isinstance(e, Closed) and e.reason is CloseReason.FILLED] == [
        *live,
        1000,
    ]
    assert len(engine(d)) == 0


def test_expire_due_after_many_amends_closes_each_order_once() -> None:
    d = Driver(OrderBook(SYMBOL))
    d.place(spec(1, Side.ASK, 110, 100, broker=BROKER_B, tif=TimeInForce.GTD, valid_until=T0 + 5))
    for price in range(111, 140):
        d.amend(1, price=price)
    d.now = T0 + 5
    assert d.expire_due() == [Closed(d.seq, oid(1), CloseReason.EXPIRED, 100)]


def test_the_expiry_heap_drops_stale_entries_so_it_stays_bounded_under_churn() -> None:
    # Cancels and re-pricing amends leave stale heap entries (lazy deletion); compaction keeps the heap within
    # 2 x live + 64 entries, so a long-lived book's memory follows its live GTD orders, not its history.
    d = Driver(OrderBook(SYMBOL))
    for n in range(1, 2001):
        d.place(spec(n, Side.ASK, 100 + n % 5, 1, broker=BROKER_B, tif=TimeInForce.GTD, valid_until=T0 + 10))
        if n % 10:
            d.cancel(n)
        else:
            d.amend(n, price=99 + n % 7)
    book = engine(d)
    assert len(book) == 200
    assert len(book._expiry) <= 2 * len(book) + 64
    d.now = T0 + 10
    assert len(d.expire_due()) == 200


def test_apply_refuses_something_that_is_not_a_command() -> None:
    with pytest.raises(TypeError):
        OrderBook(SYMBOL).apply(Cancel, T0)  # type: ignore[arg-type]


def test_more_due_than_counts_the_live_resting_orders_past_their_valid_until() -> None:
    d = Driver(OrderBook(SYMBOL))
    for n, offset in enumerate([5, 3, 1, 6, 4, 2], start=1):  # heap order unlike placement order
        d.place(spec(n, Side.ASK, 100 + n, 1, tif=TimeInForce.GTD, valid_until=T0 + offset))
    d.cancel(3)  # due at T0+1, but no longer resting
    d.place(spec(8, Side.ASK, 200, 1))  # GTC: never due
    book = d.book
    assert isinstance(book, OrderBook)
    # Due at T0+4: orders 2 (+3), 5 (+4) and 6 (+2).
    assert book.more_due_than(2, T0 + 4)
    assert not book.more_due_than(3, T0 + 4)
    assert not book.more_due_than(0, T0)


def test_a_book_caps_each_taker_at_max_taker_matches_by_default() -> None:
    book = OrderBook(SYMBOL)
    for n in range(1, MAX_TAKER_MATCHES + 2):
        book.apply(Place(n, spec(n, Side.ASK, 100, 1, broker=BROKER_B)), T0)
    seq = MAX_TAKER_MATCHES + 2
    events = book.apply(Place(seq, spec(seq, Side.BID, None, MAX_TAKER_MATCHES + 1)), T0)
    assert sum(isinstance(e, Fill) for e in events) == MAX_TAKER_MATCHES
    assert events[-1] == Closed(seq, oid(seq), CloseReason.UNFILLED, 1)
    assert len(events) <= MAX_COMMAND_EVENTS
    assert len(book) == 1


def test_more_due_than_drops_the_stale_entries_it_meets_so_asking_again_does_not_walk_them() -> None:
    # Orders cancelled before their deadline leave their heap entries behind (lazy deletion) and only an add
    # compacts the heap. Once those deadlines pass, every batch's backlog check would walk all of them again (the
    # matcher asks before each batch): 100,000 cancelled GTD orders cost ~50 ms a call, for good.
    d = Driver(OrderBook(SYMBOL))
    d.place(spec(1, Side.ASK, 100, 1, tif=TimeInForce.GTD, valid_until=T0 + 1))  # live, due first: at the top
    for n in range(2, 2002):
        d.place(spec(n, Side.ASK, 101, 1, tif=TimeInForce.GTD, valid_until=T0 + 2))
    for n in range(2, 2002):
        d.cancel(n)
    book = engine(d)
    assert not book.more_due_than(5, T0 + 3)
    assert len(book._expiry) <= 2 * len(book) + 64
    assert book.more_due_than(0, T0 + 3)

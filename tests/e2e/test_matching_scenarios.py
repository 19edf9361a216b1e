"""The seed's matching scenarios over HTTP, through the real api, queue, matchers, sweeper and pgbouncer.

Each test uses its own symbol(s) and brokers, so tests do not interfere on the shared exchange, and ends with the
DESIGN.md §6 invariants checked in SQL on the whole database (after draining).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.e2e.conftest import Harness, unique_symbol, wait_until


def _trades(order: dict[str, Any]) -> list[tuple[int, int]]:
    return [(t["price"], t["quantity"]) for t in order["trades"]]


def _levels(side: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    return [(lv["price"], lv["total_quantity"], lv["order_count"]) for lv in side]


def test_price_time_priority_fills_the_first_of_three_sellers_at_the_same_price(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    sellers = [h.register_broker(f"seller{i}") for i in range(3)]
    buyer = h.register_broker("buyer")
    asks = [seller.place(symbol, "ask", 5, 100)["order_id"] for seller in sellers]
    for seller, ask in zip(sellers, asks, strict=True):
        assert seller.settled(ask)["status"] == "open"

    bid = buyer.place(symbol, "bid", 5, 100)["order_id"]
    h.drain()

    filled = buyer.order(bid)
    assert (filled["status"], filled["close_reason"], filled["remaining_quantity"]) == ("closed", "filled", 0)
    assert _trades(filled) == [(100, 5)]
    assert filled["trades"][0]["counterparty_broker"] == sellers[0].name
    first = sellers[0].order(asks[0])
    assert (first["status"], first["close_reason"], first["remaining_quantity"]) == ("closed", "filled", 0)
    for seller, ask in zip(sellers[1:], asks[1:], strict=True):
        later = seller.order(ask)
        assert (later["status"], later["remaining_quantity"], later["trades"]) == ("open", 5, [])
    h.check_invariants()


def test_partial_fill_against_a_single_counterparty_leaves_the_rest_resting(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    ask = seller.place(symbol, "ask", 10, 100)["order_id"]
    seller.settled(ask)

    bid = buyer.place(symbol, "bid", 4, 100)["order_id"]
    h.drain()

    assert buyer.order(bid)["close_reason"] == "filled"
    resting = seller.order(ask)
    assert (resting["status"], resting["remaining_quantity"], _trades(resting)) == ("open", 6, [(100, 4)])
    book = buyer.book(symbol)
    assert (_levels(book["asks"]), book["bids"]) == ([(100, 6, 1)], [])
    h.check_invariants()


def test_partial_fill_across_multiple_sellers_at_each_sellers_price(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    sellers = [h.register_broker(f"seller{i}") for i in range(3)]
    buyer = h.register_broker("buyer")
    asks = [
        s.place(symbol, "ask", qty, price)["order_id"]
        for s, qty, price in zip(sellers, (3, 4, 5), (100, 101, 102), strict=True)
    ]
    h.drain()

    bid = buyer.place(symbol, "bid", 10, 102)["order_id"]
    h.drain()

    order = buyer.order(bid)
    assert (order["status"], order["close_reason"], order["remaining_quantity"]) == ("closed", "filled", 0)
    assert sorted(_trades(order)) == [(100, 3), (101, 4), (102, 3)]
    assert [sellers[i].order(asks[i])["status"] for i in range(3)] == ["closed", "closed", "open"]
    assert sellers[2].order(asks[2])["remaining_quantity"] == 2
    assert _levels(buyer.book(symbol)["asks"]) == [(102, 2, 1)]
    h.check_invariants()


def test_no_match_when_bid_is_below_ask_and_both_rest_in_the_book(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    ask = seller.place(symbol, "ask", 5, 101)["order_id"]
    bid = buyer.place(symbol, "bid", 7, 99)["order_id"]
    h.drain()

    assert (seller.order(ask)["status"], buyer.order(bid)["status"]) == ("open", "open")
    assert buyer.order(bid)["trades"] == []
    book = buyer.book(symbol)
    assert (_levels(book["bids"]), _levels(book["asks"])) == ([(99, 7, 1)], [(101, 5, 1)])
    assert buyer.price(symbol).status_code == 404
    h.check_invariants()


def test_price_gap_executes_at_the_resting_asks_price_for_an_incoming_bid(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    seller.place(symbol, "ask", 5, 90)
    h.drain()

    bid = buyer.place(symbol, "bid", 5, 100)["order_id"]
    h.drain()

    assert _trades(buyer.order(bid)) == [(90, 5)]
    h.check_invariants()


def test_price_gap_executes_at_the_incoming_asks_price_against_a_resting_bid(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    bid = buyer.place(symbol, "bid", 5, 100)["order_id"]
    h.drain()

    ask = seller.place(symbol, "ask", 5, 90)["order_id"]
    h.drain()

    assert _trades(seller.order(ask)) == [(90, 5)]
    assert _trades(buyer.order(bid)) == [(90, 5)]
    h.check_invariants()


def test_order_crossed_right_after_it_expired_never_trades_and_is_closed_expired(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    valid_until = datetime.now(UTC) + timedelta(seconds=2)
    bid = buyer.place(symbol, "bid", 5, 100, valid_until=valid_until.isoformat())["order_id"]
    assert buyer.settled(bid)["status"] == "open"

    # Cross it the moment it has expired: whether the sweeper's expire command or the ask comes first, no trade.
    time.sleep(max(0.0, (valid_until - datetime.now(UTC)).total_seconds()) + 0.05)
    ask = seller.place(symbol, "ask", 5, 100)["order_id"]

    expired = wait_until(
        lambda: o if (o := buyer.order(bid))["status"] == "closed" else None, 10, message="the bid to expire"
    )
    h.drain()
    assert (expired["close_reason"], expired["remaining_quantity"], expired["trades"]) == ("expired", 5, [])
    resting = seller.order(ask)
    assert (resting["status"], resting["remaining_quantity"], resting["trades"]) == ("open", 5, [])
    assert buyer.price(symbol).status_code == 404
    h.check_invariants()


def test_sweeper_closes_an_expired_order_nothing_else_touches(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    buyer = h.register_broker("buyer")
    valid_until = datetime.now(UTC) + timedelta(seconds=1)
    bid = buyer.place(symbol, "bid", 5, 100, valid_until=valid_until.isoformat())["order_id"]
    assert buyer.settled(bid)["status"] == "open"

    # No other order on the symbol: only the sweeper's expire command can wake its matcher to close the bid.
    expired = wait_until(
        lambda: o if (o := buyer.order(bid))["status"] == "closed" else None, 10, message="the bid to expire"
    )
    assert (expired["close_reason"], expired["remaining_quantity"], expired["trades"]) == ("expired", 5, [])
    expires = h.query(
        "SELECT count(*) FILTER (WHERE processed_at IS NOT NULL), count(*) FROM commands "
        "WHERE symbol = %s AND kind = 'expire'",
        (symbol,),
    )
    assert expires == [(1, 1)]
    h.check_invariants()


def test_market_bid_matches_resting_asks_and_market_ask_takes_the_bids_price(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    seller.place(symbol, "ask", 2, 100)
    seller.place(symbol, "ask", 3, 105)
    h.drain()

    market_bid = buyer.place(symbol, "bid", 5, order_type="market")["order_id"]
    h.drain()
    order = buyer.order(market_bid)
    assert (order["status"], order["close_reason"], order["remaining_quantity"]) == ("closed", "filled", 0)
    assert sorted(_trades(order)) == [(100, 2), (105, 3)]

    buyer.place(symbol, "bid", 4, 98)
    h.drain()
    market_ask = seller.place(symbol, "ask", 4, order_type="market")["order_id"]
    h.drain()
    assert _trades(seller.order(market_ask)) == [(98, 4)]
    h.check_invariants()


def test_market_order_remainder_is_closed_unfilled_and_never_rests(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    seller.place(symbol, "ask", 3, 100)
    h.drain()

    market = buyer.place(symbol, "bid", 5, order_type="market")["order_id"]
    h.drain()

    order = buyer.order(market)
    assert (order["status"], order["close_reason"], order["remaining_quantity"]) == ("closed", "unfilled", 2)
    assert _trades(order) == [(100, 3)]
    book = buyer.book(symbol)
    assert (book["bids"], book["asks"]) == ([], [])

    lonely = buyer.place(symbol, "bid", 5, order_type="market")["order_id"]
    h.drain()
    order = buyer.order(lonely)
    assert (order["status"], order["close_reason"], order["remaining_quantity"]) == ("closed", "unfilled", 5)
    assert buyer.book(symbol)["bids"] == []
    h.check_invariants()


def test_book_levels_are_aggregated_per_price_and_sorted_best_first(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    for qty, price in ((5, 98), (3, 99), (7, 98), (1, 97)):
        buyer.place(symbol, "bid", qty, price)
    for qty, price in ((4, 102), (8, 103), (2, 101), (6, 102)):
        seller.place(symbol, "ask", qty, price)
    h.drain()

    book = buyer.book(symbol)
    assert book["symbol"] == symbol
    assert _levels(book["bids"]) == [(99, 3, 1), (98, 12, 2), (97, 1, 1)]
    assert _levels(book["asks"]) == [(101, 2, 1), (102, 10, 2), (103, 8, 1)]
    shallow = buyer.book(symbol.lower(), depth=2)
    assert (_levels(shallow["bids"]), _levels(shallow["asks"])) == (
        [(99, 3, 1), (98, 12, 2)],
        [(101, 2, 1), (102, 10, 2)],
    )
    h.check_invariants()


def test_price_reports_last_and_average_and_is_404_before_the_first_trade(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    before = buyer.price(symbol)
    assert before.status_code == 404
    assert {"code", "message"} <= set(before.json())

    for price in (100, 110):
        seller.place(symbol, "ask", 1, price)
        buyer.place(symbol, "bid", 1, price)
        h.drain()

    body = buyer.price(symbol).json()
    assert body == {"symbol": symbol, "last_price": 110, "average_price": 105, "trades_in_average": 2}
    last_only = buyer.price(symbol, trades=1).json()
    assert (last_only["average_price"], last_only["trades_in_average"]) == (110, 1)
    h.check_invariants()


def test_balance_is_negative_for_the_buyer_positive_for_the_seller_and_sums_to_zero(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    assert buyer.balance()["balance"] == 0

    seller.place(symbol, "ask", 10, 250)
    buyer.place(symbol, "bid", 10, 250)
    h.drain()

    bought, sold = buyer.balance(), seller.balance()
    assert (bought["broker_id"], bought["broker_name"]) == (buyer.broker_id, buyer.name)
    assert (bought["balance"], sold["balance"]) == (-2500, 2500)
    assert bought["balance"] + sold["balance"] == 0
    h.check_invariants()


def test_cancelled_order_does_not_trade_with_a_later_crossing_order(e2e_harness: Harness) -> None:
    h = e2e_harness
    symbol = unique_symbol()
    seller, buyer = h.register_broker("seller"), h.register_broker("buyer")
    ask = seller.place(symbol, "ask", 5, 100)["order_id"]
    cancel = seller.cancel(ask)
    assert cancel.status_code == 204, cancel.text
    bid = buyer.place(symbol, "bid", 5, 100)["order_id"]
    h.drain()

    cancelled = seller.order(ask)
    assert (cancelled["status"], cancelled["close_reason"], cancelled["trades"]) == ("closed", "cancelled", [])
    resting = buyer.order(bid)
    assert (resting["status"], resting["remaining_quantity"], resting["trades"]) == ("open", 5, [])
    assert seller.cancel(ask).status_code == 204  # idempotent on a closed order
    h.check_invariants()

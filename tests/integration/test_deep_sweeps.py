"""A taker sweeping a very deep opposite side (100,000+ small resting orders, which one broker can place itself
first) made one fill per resting order, then planned and encoded them all between the matcher's two round trips:
past the idle limit (:data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS`) PostgreSQL ended the session on every
attempt (SQLSTATE 25P03, not a deterministic error: the command was never quarantined) and the symbol was wedged,
every later command of it waiting forever. Now a taker matches at most ``MAX_TAKER_MATCHES`` resting orders, and a
transaction's commands make at most ``MAX_EVENTS_PER_TRANSACTION`` events.

As in ``test_big_books`` and ``test_expiry_backlog``, the idle limit is lowered so that a smaller book (20,000
orders: ~1.9 s of matcher work swept in one command on the project's 2-core machine) shows it quickly.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import Engine, text

from exchange.engine import MAX_COMMAND_EVENTS, MAX_TAKER_MATCHES
from exchange.matching import service
from exchange.matching.service import BookCache, drain, process_symbols
from tests.integration.sql_orders import add_broker, place
from tests.integration.test_big_books import add_resting_asks, limit_idle
from tests.integration.test_expiry_backlog import open_orders
from tests.integration.test_matching_service import assert_conserved

DEEP = 20_000
"""Resting asks of the deep book (10 shares each, 2,000 to 2,999 cents, all of one broker)."""


def order_state(engine: Engine, order_id: uuid.UUID) -> tuple[str, str | None, int]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, close_reason, remaining FROM orders WHERE id = :id"), {"id": order_id}
        ).one()
    return row.status, row.close_reason, row.remaining


def trades_of(engine: Engine, order_id: uuid.UUID) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(text("SELECT count(*) FROM trades WHERE buy_order_id = :id"), {"id": order_id}).scalar_one()
        )


def test_a_market_order_sweeping_a_very_deep_book_does_not_wedge_its_symbol(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit_idle(monkeypatch, 250)
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    add_resting_asks(engine, seller, "DEEP1", DEEP)
    sweep = place(engine, buyer, "DEEP1", "bid", 10 * DEEP, None)  # market: every ask of the book
    cache = BookCache()

    rounds = list(drain(engine, cache, ["DEEP1"]))

    assert "DEEP1" not in cache.failing  # no transaction of it outlasted the idle limit
    assert sum(r.commands for round_ in rounds for r in round_.results) == 1
    assert order_state(engine, sweep) == ("closed", "unfilled", 10 * (DEEP - MAX_TAKER_MATCHES))
    assert trades_of(engine, sweep) == MAX_TAKER_MATCHES
    assert open_orders(engine, "DEEP1") == DEEP - MAX_TAKER_MATCHES
    # The symbol keeps matching: a later order is applied at once.
    bid = place(engine, buyer, "DEEP1", "bid", 1, 1000)
    assert [r.commands for r in process_symbols(engine, cache, ["DEEP1"])] == [1]
    assert order_state(engine, bid) == ("open", None, 1)
    assert_conserved(engine)


def test_a_limit_order_crossing_past_the_match_cap_is_closed_not_rested_crossed(engine: Engine) -> None:
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    add_resting_asks(engine, seller, "DEEP2", 2 * MAX_TAKER_MATCHES)
    sweep = place(engine, buyer, "DEEP2", "bid", 10 * 2 * MAX_TAKER_MATCHES, 5000)

    [result] = process_symbols(engine, BookCache(), ["DEEP2"])

    assert result.trades == MAX_TAKER_MATCHES
    assert order_state(engine, sweep) == ("closed", "match_limit_reached", 10 * MAX_TAKER_MATCHES)
    with engine.connect() as conn:
        payload = conn.execute(
            text("SELECT type, payload FROM webhook_events WHERE order_id = :id AND trade_id IS NULL"), {"id": sweep}
        ).one()
    assert (payload.type, payload.payload["reason"]) == ("order.cancelled", "match_limit_reached")
    assert_conserved(engine)


def test_a_batch_of_deep_sweeps_is_spread_over_transactions_that_each_fit_the_idle_limit(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ten sweeps of MAX_TAKER_MATCHES fills each, pending together: one batch of them all kept the transaction idle
    # past the limit on every attempt, even with every command capped.
    limit_idle(monkeypatch, 400)
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    add_resting_asks(engine, seller, "DEEP3", DEEP)
    sweeps = [place(engine, buyer, "DEEP3", "bid", 10 * MAX_TAKER_MATCHES + 1, None) for _ in range(10)]
    cache = BookCache()

    rounds = list(drain(engine, cache, ["DEEP3"]))

    assert "DEEP3" not in cache.failing
    commands = [r.commands for round_ in rounds for r in round_.results]
    assert sum(commands) == 10
    assert max(commands) == service.MAX_EVENTS_PER_TRANSACTION // MAX_COMMAND_EVENTS  # as many as surely fit
    assert {order_state(engine, s) for s in sweeps} == {("closed", "unfilled", 1)}
    assert open_orders(engine, "DEEP3") == DEEP - 10 * MAX_TAKER_MATCHES
    assert_conserved(engine)


def test_a_book_of_a_group_whose_commands_do_not_fit_goes_first_in_the_next_transaction_after_the_group_is_handed_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for one command's worst case only: the first book's first command takes it, so the first book keeps its
    # second command for later and the second book gets none in the group's transaction. The group's committed
    # results are handed on (published) first: the deferred books' own transactions, deep sweeps perhaps, one each,
    # must not hold them back. The deferred book is then first in the next transaction (where its first command
    # always fits), so no book waits on the others' deep sweeps either.
    monkeypatch.setattr(service, "MAX_EVENTS_PER_TRANSACTION", MAX_COMMAND_EVENTS + 1)
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    for symbol in ("GRPA", "GRPB"):
        place(engine, seller, symbol, "ask", 1, 100)
        place(engine, buyer, symbol, "bid", 1, 100)
    rounds = drain(engine, BookCache(), ["GRPA", "GRPB"])

    first = next(rounds)

    assert [(r.symbol, r.commands, r.more, r.deferred) for r in first.results] == [
        ("GRPA", 1, True, False),
        ("GRPB", 0, True, True),
    ]
    assert (pending(engine, "GRPA"), pending(engine, "GRPB")) == (1, 2)  # GRPB waits only for the hand-on
    assert first.left == ["GRPB", "GRPA"]
    second = next(rounds)
    assert [(r.symbol, r.commands) for r in second.results] == [("GRPB", 1)]
    list(rounds)
    assert (pending(engine, "GRPA"), pending(engine, "GRPB")) == (0, 0)
    assert (open_orders(engine, "GRPA"), open_orders(engine, "GRPB")) == (0, 0)
    assert_conserved(engine)


def pending(engine: Engine, symbol: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM commands WHERE symbol = :s AND processed_at IS NULL"), {"s": symbol}
            ).scalar_one()
        )

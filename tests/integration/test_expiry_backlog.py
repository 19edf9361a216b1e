"""A backlog of due GTD orders (the sweeper down for hours, or a whole book's end-of-day deadline) is expired a bounded
number at a time: one ``expire`` command closing every due order of a big book kept the matcher's transaction idle
past its limit (:data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS`) on every attempt, so the book was wedged: neither
its expiries nor any later command of it were ever applied.

As in ``test_big_books``, the idle limit and the bound are lowered so that a small book shows it quickly.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import Engine, text

from exchange.matching import service
from exchange.matching.service import BookCache, drain, process_symbols
from exchange.sweeper import sweep_once
from tests.integration.redis_support import namespaced_broker
from tests.integration.sql_orders import add_broker, place
from tests.integration.test_big_books import limit_idle
from tests.integration.test_matching_service import assert_conserved

DUE = 20_000
"""Due orders of the book: closing them all in one command keeps the transaction idle several times the lowered
limit below; a bound's worth of them, a few milliseconds."""
BOUND = 500


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    with namespaced_broker(RedisBroker) as broker:
        yield broker


def add_due_asks(engine: Engine, broker: uuid.UUID, symbol: str, n: int) -> None:
    """``n`` open GTD asks on ``symbol`` whose ``valid_until`` has passed, as the matcher leaves resting orders."""
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                INSERT INTO orders (broker_id, document_number, symbol, side, order_type, time_in_force, price,
                                    quantity, remaining, status, seq, priority, valid_until)
                SELECT :broker, '1', :symbol, 'ask', 'limit', 'gtd', 2000 + g % 100, 10, 10, 'open',
                       nextval('command_seq'), currval('command_seq'), now() - interval '1 hour'
                FROM generate_series(1, :n) AS g
                """
            ),
            {"broker": broker, "symbol": symbol, "n": n},
        )
        conn.execute(text("INSERT INTO symbols (symbol) VALUES (:symbol)"), {"symbol": symbol})
        conn.execute(text("ANALYZE orders"))


def open_orders(engine: Engine, symbol: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM orders WHERE symbol = :s AND status = 'open'"), {"s": symbol}
            ).scalar_one()
        )


def test_a_backlog_of_due_orders_bigger_than_a_transaction_is_expired_a_share_at_a_time(
    engine: Engine, broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit_idle(monkeypatch, 250)
    monkeypatch.setattr(service, "MAX_EXPIRIES_PER_TRANSACTION", BOUND, raising=False)
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    add_due_asks(engine, seller, "DUE1", DUE)
    cache = BookCache()
    assert sweep_once(engine, broker, 4, stale_after_s=60).expiring == ["DUE1"]

    rounds = list(drain(engine, cache, ["DUE1"]))

    assert "DUE1" not in cache.failing  # not left in a backoff: every transaction of it committed in the end
    # A bound's worth of expiries in each transaction that closed orders; the last one by the expire command. (On a
    # loaded machine the first, which also rebuilds the cold 20,000-order book, may outlast the lowered limit once:
    # retried at once, it adds a round that closed nothing.)
    closing = [r for r in rounds if any(result.order_ids for result in r.results)]
    assert len(closing) == DUE // BOUND

    assert open_orders(engine, "DUE1") == 0
    with engine.connect() as conn:
        reasons = {
            row.close_reason: row.n
            for row in conn.execute(text("SELECT close_reason, count(*) AS n FROM orders GROUP BY close_reason"))
        }
        events = conn.execute(text("SELECT count(*) FROM webhook_events WHERE type = 'order.expired'")).scalar_one()
    assert reasons == {"expired": DUE}
    assert events == DUE  # one order.expired per order, none twice
    # The book is not wedged: a new order is matched at once.
    bid = place(engine, buyer, "DUE1", "bid", 1, 3000)
    assert [r.commands for r in process_symbols(engine, cache, ["DUE1"])] == [1]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM orders WHERE id = :id"), {"id": bid}).scalar_one() == "open"
    assert_conserved(engine)


def test_the_expires_of_one_transaction_share_its_bound(
    engine: Engine, broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "MAX_EXPIRIES_PER_TRANSACTION", BOUND, raising=False)
    seller = add_broker(engine, "seller")
    add_due_asks(engine, seller, "DUE2", BOUND)
    add_due_asks(engine, seller, "DUE3", BOUND)
    sweep_once(engine, broker, 4, stale_after_s=60)

    results = process_symbols(engine, BookCache(), ["DUE2", "DUE3"])  # one transaction: a group of two books

    assert [(r.commands, r.more) for r in results] == [(0, True), (0, True)]  # their expire commands still to come
    assert (open_orders(engine, "DUE2"), open_orders(engine, "DUE3")) == (BOUND // 2, BOUND // 2)


def test_an_order_reaching_a_backlog_of_expired_orders_is_matched_without_wedging_its_book(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sweeper down: no expire command. The bid crosses every due ask; closing them all inline, in its own
    # command, outlasted the idle limit on every attempt, so the bid (and every later command) was never applied.
    limit_idle(monkeypatch, 250)
    monkeypatch.setattr(service, "MAX_EXPIRIES_PER_TRANSACTION", BOUND, raising=False)
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    add_due_asks(engine, seller, "DUE4", DUE)
    live = place(engine, seller, "DUE4", "ask", 1, 2500)
    bid = place(engine, buyer, "DUE4", "bid", 1, 3000)
    cache = BookCache()

    rounds = list(drain(engine, cache, ["DUE4"]))

    assert "DUE4" not in cache.failing
    assert sum(r.trades for round_ in rounds for r in round_.results) == 1
    with engine.connect() as conn:
        states = {
            row.id: (row.status, row.close_reason)
            for row in conn.execute(
                text("SELECT id, status, close_reason FROM orders WHERE id IN (:a, :b)"), {"a": live, "b": bid}
            )
        }
    assert states == {live: ("closed", "filled"), bid: ("closed", "filled")}
    assert open_orders(engine, "DUE4") == 0
    assert_conserved(engine)

"""Books too big to rebuild between two round trips of a bounded transaction, and symbols whose processing fails on
their own: neither may stop the other books of their partition.

The matcher's transaction may sit idle only :data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS` between two round
trips (2 s). Production's case, 400,000 resting orders, takes seconds to rebuild; here the limit is lowered for the
test (``store.BOUNDED_BEGIN_STATEMENTS``, what every matcher transaction opens with) and the book is smaller, so
that the tests stay fast while its rebuild still outlasts the limit when it is read in one piece.
"""

from __future__ import annotations

import time
import uuid

import prometheus_client
import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from exchange.db.engines import IDLE_HOLDER_LIMIT_MS, pooled_engine
from exchange.matching import store
from exchange.matching.service import FAILURE_BACKOFF_S, BookCache, drain, process_symbol, process_symbols
from tests.integration.sql_orders import add_broker, place, rest_crossed_pair
from tests.integration.test_matching_service import assert_conserved

BIG = 100_000
"""Resting orders of the big book: read and rebuilt in one piece they keep the transaction idle for ~0.3 s on the
project's machines (1.3 s for 400,000), several times the limits below; a chunk of them for a few tens of
milliseconds."""


def limit_idle(monkeypatch: pytest.MonkeyPatch, ms: int) -> None:
    """The idle limit of every matcher transaction from now on in this test."""
    monkeypatch.setattr(
        store, "BOUNDED_BEGIN_STATEMENTS", ("BEGIN", f"SET LOCAL idle_in_transaction_session_timeout = {ms}")
    )


def read_in_one_piece(monkeypatch: pytest.MonkeyPatch) -> int:
    """A book read and rebuilt in one piece, as before chunked rebuilds (a failure of the big book's own); returns
    the chunk it replaced."""
    chunk: int = getattr(store, "REBUILD_CHUNK", 5000)
    monkeypatch.setattr(store, "REBUILD_CHUNK", 10 * BIG, raising=False)
    return chunk


def add_resting_asks(engine: Engine, broker: uuid.UUID, symbol: str, n: int) -> None:
    """``n`` open asks on ``symbol`` from 2,000 to 2,999 cents, as the matcher leaves resting orders."""
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                INSERT INTO orders (broker_id, document_number, symbol, side, order_type, time_in_force, price,
                                    quantity, remaining, status, seq, priority)
                SELECT :broker, '1', :symbol, 'ask', 'limit', 'gtc', 2000 + g % 1000, 10, 10, 'open',
                       nextval('command_seq'), currval('command_seq')
                FROM generate_series(1, :n) AS g
                """
            ),
            {"broker": broker, "symbol": symbol, "n": n},
        )
        conn.execute(text("INSERT INTO symbols (symbol) VALUES (:symbol)"), {"symbol": symbol})
        conn.execute(text("ANALYZE orders"))


def symbol_failures() -> float:
    return prometheus_client.REGISTRY.get_sample_value("exchange_match_symbol_failures_total") or 0.0


def pending_commands(engine: Engine, symbol: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM commands WHERE symbol = :s AND processed_at IS NULL"), {"s": symbol}
            ).scalar_one()
        )


def test_a_book_whose_rebuild_outlasts_the_idle_limit_is_still_matched(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit_idle(monkeypatch, 200)
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    add_resting_asks(engine, seller, "BIGB", BIG)
    bid = place(engine, buyer, "BIGB", "bid", 15, 2000)

    result = process_symbol(engine, BookCache(), "BIGB")  # a cold cache: the whole book is read and rebuilt

    assert (result.commands, result.trades, result.rebuilt) == (1, 2, True)
    with engine.connect() as conn:
        got = conn.execute(text("SELECT status, remaining FROM orders WHERE id = :id"), {"id": bid}).one()
    assert tuple(got) == ("closed", 0)  # 10 + 5 from the two oldest asks at 2,000
    assert_conserved(engine)


def test_a_symbol_whose_processing_fails_does_not_stop_the_next_symbol_of_its_partition(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit_idle(monkeypatch, 100)
    read_in_one_piece(monkeypatch)  # the big book's transaction outlasts the idle limit every time
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    add_resting_asks(engine, seller, "BIGF", BIG)
    place(engine, buyer, "BIGF", "bid", 1, 2000)
    place(engine, seller, "NEXT", "ask", 1, 100)
    bid = place(engine, buyer, "NEXT", "bid", 1, 100)
    failures = symbol_failures()
    cache = BookCache()

    rounds = list(drain(engine, cache, ["BIGF", "NEXT"]))  # one message of the partition names both, BIGF first

    matched = {r.symbol: (r.commands, r.trades) for round_ in rounds for r in round_.results if r.commands}
    assert matched == {"NEXT": (2, 1)}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM orders WHERE id = :id"), {"id": bid}).scalar_one() == "closed"
    assert pending_commands(engine, "BIGF") == 1  # left pending, never skipped
    # A database error: tried again at once, alone (it may have been passing), then left alone for a backoff.
    assert symbol_failures() == failures + 2
    assert cache.failing["BIGF"].failures == 2
    assert_conserved(engine)


def test_a_symbol_that_failed_is_left_alone_until_its_backoff_is_over(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit_idle(monkeypatch, 100)
    chunk = read_in_one_piece(monkeypatch)
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    add_resting_asks(engine, seller, "BIGW", BIG)
    place(engine, buyer, "BIGW", "bid", 1, 2000)
    cache = BookCache()
    process_symbols(engine, cache, ["BIGW"])  # a database error: tried again at once on the next call ...
    process_symbols(engine, cache, ["BIGW"])  # ... then left alone
    failures = symbol_failures()

    for _ in range(3):  # the sweeper's and the api's wake-ups meanwhile
        assert [r.commands for r in process_symbols(engine, cache, ["BIGW"])] == [0]
    assert symbol_failures() == failures  # not tried again: no rebuild, no failure

    monkeypatch.setattr(store, "REBUILD_CHUNK", chunk)  # the book mended (here: read in chunks again)
    limit_idle(monkeypatch, IDLE_HOLDER_LIMIT_MS)
    cache.failing["BIGW"].retry_at = 0.0  # the backoff is over
    assert [(r.commands, r.trades) for r in process_symbols(engine, cache, ["BIGW"])] == [(1, 1)]
    assert "BIGW" not in cache.failing
    assert pending_commands(engine, "BIGW") == 0


def test_a_database_that_cannot_be_reached_still_fails_the_whole_batch() -> None:
    unreachable = pooled_engine("postgresql://postgres@127.0.0.1:1/nothing")
    cache = BookCache()
    try:
        with pytest.raises((psycopg.Error, DBAPIError)):
            process_symbols(unreachable, cache, ["DWN1", "DWN2"])
    finally:
        unreachable.dispose()
    assert cache.failing == {}  # the database's failure: no symbol is held back once it is reachable again


def test_a_healthy_symbol_whose_transaction_was_ended_once_is_matched_in_the_same_drain(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The matcher frozen or starved past the idle limit once (25P03): the book is fine, and must not wait for a
    # backoff (nor a sweep) to be matched.
    limit_idle(monkeypatch, 200)
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    place(engine, seller, "ONCE", "ask", 1, 100)
    bid = place(engine, buyer, "ONCE", "bid", 1, 100)
    write_batch = store.write_batch
    frozen = []

    def frozen_once(*args: object, **kwargs: object) -> object:
        if not frozen:
            frozen.append(True)
            time.sleep(0.4)  # past the idle limit between the transaction's two round trips
        return write_batch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "write_batch", frozen_once)
    failures = symbol_failures()

    rounds = list(drain(engine, BookCache(), ["ONCE"]))

    assert frozen
    assert symbol_failures() == failures + 1
    assert sum(r.trades for round_ in rounds for r in round_.results) == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM orders WHERE id = :id"), {"id": bid}).scalar_one() == "closed"
    assert_conserved(engine)


def test_a_symbol_left_pending_for_a_backoff_says_when_the_backoff_ends(engine: Engine) -> None:
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    rest_crossed_pair(engine, "XBAD", buyer, seller)  # its rebuild fails: a failure of its own, not the database's
    place(engine, buyer, "XBAD", "bid", 1, 50)
    cache = BookCache()
    before = time.monotonic()

    [failed] = process_symbols(engine, cache, ["XBAD"])
    [skipped] = process_symbols(engine, cache, ["XBAD"])  # a wake-up during the backoff

    retry_at = cache.failing["XBAD"].retry_at
    assert before + FAILURE_BACKOFF_S <= retry_at <= time.monotonic() + FAILURE_BACKOFF_S
    # For the matcher to wake it then: nothing else would before the sweeper.
    assert (failed.commands, failed.more, failed.retry_at) == (0, False, retry_at)
    assert (skipped.commands, skipped.more, skipped.retry_at) == (0, False, retry_at)
    assert pending_commands(engine, "XBAD") == 1

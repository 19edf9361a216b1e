"""Transactions that span round trips are bounded (:data:`exchange.db.engines.BOUNDED_BEGIN`): a process frozen
inside one keeps its locks for :data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS` at most.

The frozen holder here is a real transaction whose client stops sending (as a stopped, swapping or cut-off process
does); the one waiting for its locks is the real matcher, which holds its books while it waits for an order's or
a broker's row.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, text

from exchange.db.engines import IDLE_HOLDER_LIMIT_MS, AsyncPool, bounded_transaction, transaction
from exchange.matching.service import BatchResult, BookCache, process_symbol
from exchange.orders.accept import _LOCK_ORDER
from tests.integration.sql_orders import add_broker, place

LIMIT_S = IDLE_HOLDER_LIMIT_MS / 1000


def trades(engine: Engine, symbol: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM trades WHERE symbol = :s"), {"s": symbol}).scalar_one())


def crossing_pair(engine: Engine, symbol: str) -> tuple[UUID, UUID, UUID]:
    """A resting ask (matched first, so its row is locked) and a bid that crosses it, both pending for the matcher;
    returns (seller, ask order, buyer)."""
    seller, buyer = add_broker(engine, f"seller-{symbol}"), add_broker(engine, f"buyer-{symbol}")
    ask = place(engine, seller, symbol, "ask", 1, 100)
    place(engine, buyer, symbol, "bid", 1, 100)
    return seller, ask, buyer


def match_in_thread(engine: Engine, symbol: str) -> tuple[threading.Thread, list[BatchResult], list[float]]:
    """Start the matcher on ``symbol``; the lists get its result and how long it took."""
    results: list[BatchResult] = []
    took: list[float] = []

    def run() -> None:
        start = time.monotonic()
        results.append(process_symbol(engine, BookCache(), symbol))
        took.append(time.monotonic() - start)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results, took


@pytest.mark.anyio
async def test_an_api_transaction_frozen_on_an_order_row_keeps_the_matcher_waiting_only_until_the_idle_limit(
    engine: Engine, api_pool: AsyncPool
) -> None:
    """An amend locks its order's row; an api worker frozen there (before its insert and ``COMMIT``) would keep
    the matcher, and with it every book of the batch, waiting until it woke."""
    seller, ask, _ = crossing_pair(engine, "AMDX")
    holders: list[psycopg.AsyncConnection[Any]] = []
    matcher: list[threading.Thread] = []

    async def freeze_holding_the_order_row() -> None:
        async with transaction(api_pool) as conn:
            holders.append(conn)
            assert await (await conn.execute(_LOCK_ORDER, {"id": ask, "broker_id": seller})).fetchone()
            thread, results, took = match_in_thread(engine, "AMDX")
            matcher.append(thread)
            await asyncio.sleep(LIMIT_S + 1.5)  # frozen: the client sends nothing
            assert [(r.commands, r.trades) for r in results] == [(2, 1)], "the frozen amend still blocks the book"
            assert LIMIT_S - 0.5 <= took[0] <= LIMIT_S + 1.5
            await conn.execute("SELECT 1")  # it wakes up: its transaction and session are gone

    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
        await freeze_holding_the_order_row()
    matcher[0].join()
    assert holders[0].closed  # the pool does not hand it out again
    assert trades(engine, "AMDX") == 1


def test_a_worker_frozen_on_a_broker_row_keeps_the_matcher_waiting_only_until_the_idle_limit(
    engine: Engine, fresh_migrated_database_url: str
) -> None:
    """A webhook record that changes a broker (its consecutive failures, its endpoint) locks the broker's row; a
    worker frozen before its ``COMMIT`` would keep every matcher trade of that broker waiting until it woke."""
    seller, _, _ = crossing_pair(engine, "BRKX")
    matcher: list[threading.Thread] = []

    def freeze_holding_the_broker_row(conn: psycopg.Connection[Any]) -> None:
        with bounded_transaction(conn):
            conn.execute("SELECT 1 FROM brokers WHERE id = %s FOR UPDATE", (seller,))
            thread, results, took = match_in_thread(engine, "BRKX")
            matcher.append(thread)
            time.sleep(LIMIT_S + 1.5)  # frozen
            assert [(r.commands, r.trades) for r in results] == [(2, 1)], "the frozen worker still blocks the book"
            assert LIMIT_S - 0.5 <= took[0] <= LIMIT_S + 1.5
            conn.execute("SELECT 1")  # it wakes up: its transaction and session are gone

    with psycopg.connect(fresh_migrated_database_url) as conn:
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            freeze_holding_the_broker_row(conn)
        assert conn.broken
    matcher[0].join()
    assert trades(engine, "BRKX") == 1


def test_a_bounded_transaction_commits_and_gives_the_connection_back_in_its_mode(
    fresh_migrated_database_url: str,
) -> None:
    with psycopg.connect(fresh_migrated_database_url) as conn:
        assert not conn.autocommit
        with bounded_transaction(conn):
            timeout = conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()
            conn.execute("CREATE TABLE kept (x int)")
        assert timeout == (f"{IDLE_HOLDER_LIMIT_MS // 1000}s",)
        assert not conn.autocommit
        assert conn.info.transaction_status == TransactionStatus.IDLE
        # the limit was the transaction's own: the session is back to the server's default
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("0",)
        conn.rollback()
    with psycopg.connect(fresh_migrated_database_url) as other:
        assert other.execute("SELECT to_regclass('kept') IS NOT NULL").fetchone() == (True,)


def test_a_bounded_transaction_that_raises_rolls_back_and_gives_the_connection_back_in_its_mode(
    fresh_migrated_database_url: str,
) -> None:
    with psycopg.connect(fresh_migrated_database_url) as conn:

        def create_then_fail() -> None:
            with bounded_transaction(conn):
                conn.execute("CREATE TABLE dropped (x int)")
                conn.execute("SELECT 1 / 0")

        with pytest.raises(psycopg.errors.DivisionByZero):
            create_then_fail()
        assert not conn.autocommit
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.execute("SELECT to_regclass('dropped') IS NULL").fetchone() == (True,)

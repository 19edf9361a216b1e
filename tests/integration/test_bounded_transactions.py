"""Transactions that span round trips are bounded (:data:`exchange.db.engines.BOUNDED_BEGIN`): a process frozen
inside one keeps its locks for :data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS` at most.

The frozen holder here is a real transaction whose client stops sending (as a stopped, swapping or cut-off process
does); the one waiting for its locks is the real matcher, which holds its books while it waits for a broker's row.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine

from exchange.db.engines import IDLE_HOLDER_LIMIT_MS, bounded_transaction
from exchange.matching.service import BatchResult, BookCache, process_symbol
from tests.integration.sql_orders import crossing_pair, trades

LIMIT_S = IDLE_HOLDER_LIMIT_MS / 1000


def match_while_frozen(engine: Engine, symbol: str) -> tuple[list[tuple[int, int]], float]:
    """Run the matcher on ``symbol`` while the caller's transaction sits idle (the caller sends nothing until this
    returns): its batch's (commands, trades), and how long it took (it gives up waiting after the limit + 1.5 s)."""
    results: list[BatchResult] = []
    start = time.monotonic()
    thread = threading.Thread(target=lambda: results.append(process_symbol(engine, BookCache(), symbol)), daemon=True)
    thread.start()
    thread.join(timeout=LIMIT_S + 1.5)
    return [(r.commands, r.trades) for r in results], time.monotonic() - start


def test_a_worker_frozen_on_a_broker_row_keeps_the_matcher_waiting_only_until_the_idle_limit(
    engine: Engine, fresh_migrated_database_url: str
) -> None:
    """A webhook record that changes a broker (its consecutive failures, its endpoint) locks the broker's row; a
    worker frozen before its ``COMMIT`` would keep every matcher trade of that broker waiting until it woke."""
    seller = crossing_pair(engine, "BRKX")

    def freeze_holding_the_broker_row(conn: psycopg.Connection[Any]) -> None:
        with bounded_transaction(conn) as cursor:
            cursor.execute("SELECT 1 FROM brokers WHERE id = %s FOR UPDATE", (seller,))
            matched, took = match_while_frozen(engine, "BRKX")
            assert matched == [(2, 1)], "the frozen worker still blocks the book"
            assert LIMIT_S - 0.5 <= took <= LIMIT_S + 1.5
            cursor.execute("SELECT 1")  # it wakes up: its transaction and session are gone

    with psycopg.connect(fresh_migrated_database_url) as conn:
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            freeze_holding_the_broker_row(conn)
        assert conn.broken
    assert trades(engine, "BRKX") == 1


def test_a_bounded_transaction_commits_and_gives_the_connection_back_in_its_mode(
    fresh_migrated_database_url: str,
) -> None:
    with psycopg.connect(fresh_migrated_database_url) as conn:
        assert not conn.autocommit
        limit = "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'"  # in ms
        with bounded_transaction(conn) as cursor:
            inside = cursor.execute(limit).fetchone()
            cursor.execute("CREATE TABLE kept (x int)")
        assert inside == (str(IDLE_HOLDER_LIMIT_MS),)
        assert not conn.autocommit
        assert conn.info.transaction_status == TransactionStatus.IDLE
        # the limit was the transaction's own: the session is back to the server's default
        assert conn.execute(limit).fetchone() == ("0",)
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

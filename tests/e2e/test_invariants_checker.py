"""The invariant checker itself: silent on a consistent database, loud on each kind of corruption (no processes)."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from sqlalchemy import create_engine

from exchange.db.urls import sqlalchemy_url
from tests.invariants import check_invariants, invariant_violations


def _broker(conn: psycopg.Connection, balance: int = 0) -> uuid.UUID:
    broker_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO brokers (id, name, api_key_hash, webhook_secret, balance) VALUES (%s, 'b', %s, 'whsec_x', %s)",
        (broker_id, uuid.uuid4().hex * 2, balance),
    )
    return broker_id


def _open_order(
    conn: psycopg.Connection, broker_id: uuid.UUID, side: str, price: int, *, processed: bool = True
) -> None:
    order_id = uuid.uuid4()
    seq = conn.execute("SELECT nextval('command_seq')").fetchone()[0]  # type: ignore[index]
    status, priority = ("open", seq) if processed else ("pending", None)
    conn.execute(
        "INSERT INTO orders (id, broker_id, document_number, symbol, side, order_type, time_in_force, price,"
        " quantity, remaining, status, seq, priority) VALUES (%s, %s, '1', 'CHK', %s, 'limit', 'gtc', %s, 5, 5,"
        " %s, %s, %s)",
        (order_id, broker_id, side, price, status, seq, priority),
    )
    conn.execute(
        "INSERT INTO commands (seq, symbol, kind, order_id, processed_at)"
        " VALUES (%s, 'CHK', 'place', %s, CASE WHEN %s THEN now() END)",
        (seq, order_id, processed),
    )


def test_invariant_checker_passes_a_consistent_database_through_every_connection_kind(
    fresh_migrated_database_url: str,
) -> None:
    with psycopg.connect(fresh_migrated_database_url, autocommit=True) as conn:
        broker = _broker(conn)
        _open_order(conn, broker, "bid", 99)
        _open_order(conn, broker, "ask", 100)
        check_invariants(conn)
    check_invariants(fresh_migrated_database_url)
    engine = create_engine(sqlalchemy_url(fresh_migrated_database_url))
    try:
        check_invariants(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("corruption", "expected"),
    [
        ("crossed", "no crossed book"),
        ("cash", "sum of all broker balances is 0"),
        ("pending", "no unprocessed commands remain"),
        ("closed_without_reason", "closed orders have a close_reason"),
    ],
)
def test_invariant_checker_reports_each_kind_of_corruption(
    fresh_migrated_database_url: str, corruption: str, expected: str
) -> None:
    with psycopg.connect(fresh_migrated_database_url, autocommit=True) as conn:
        broker = _broker(conn, balance=7 if corruption == "cash" else 0)
        _open_order(conn, broker, "bid", 101 if corruption == "crossed" else 99)
        _open_order(conn, broker, "ask", 100, processed=corruption != "pending")
        if corruption == "closed_without_reason":
            conn.execute("ALTER TABLE orders DROP CONSTRAINT ck_orders_closed_has_reason")
            conn.execute("UPDATE orders SET status = 'closed' WHERE side = 'bid'")
    problems = invariant_violations(fresh_migrated_database_url)
    assert any(expected in p for p in problems), problems
    with pytest.raises(AssertionError, match="invariants violated"):
        check_invariants(fresh_migrated_database_url)
    if corruption == "pending":
        assert invariant_violations(fresh_migrated_database_url, drained=False) == []

"""Plans of hot statements, as auto_explain reports them for the statements inside the PL/pgSQL functions (each
call rolled back): the matcher's writes probe ``orders`` by primary key, the webhook recorder updates events by
primary key, the webhook claim reads due events through their partial index, the api's reads (order views, book
levels, recent prices) reach their rows through indexes.

Joined to a ``json_to_recordset`` alone (always planned as 100 rows), PostgreSQL hashed the whole table while it
held a few thousand to some 20,000 orders: a sequential scan per batch, the bench's whole run long. 5,000 orders of
100 brokers and a batch of 10 orders are inside that range. The functions keep one generic plan per server
connection until a table it reads is analysed again, so the plans are also checked after being made on small
tables (analysed or not) that then grew.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
import pytest
from sqlalchemy import Connection, Engine, text

from exchange.db.arrays import array_literal
from exchange.db.tables import OrderStatus
from exchange.matching import store
from exchange.orders import accept, queries
from exchange.orders.models import NewOrder
from exchange.webhooks import queries as webhook_queries
from exchange.webhooks import store as webhook_store
from ops.bench_db import most_rows_read

ROWS = 5000
BROKERS = 100
BATCH = 10


def _insert_brokers(conn: Connection, *, webhook_url: str | None, n: int = BROKERS) -> None:
    conn.execute(
        text(
            """
            INSERT INTO brokers (name, api_key_hash, webhook_url, webhook_secret)
            SELECT 'broker ' || g, encode(sha256(g::text::bytea), 'hex'), :url, 'whsec_x'
            FROM generate_series(1, :n) AS g
            """
        ),
        {"n": n, "url": webhook_url},
    )


def _insert_orders(conn: Connection, n: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """``n`` more open orders spread over the brokers; returns the first ``BATCH`` ``(broker_id, order_id)`` keys."""
    conn.execute(
        text(
            """
            INSERT INTO orders (id, broker_id, document_number, symbol, side, order_type, time_in_force, price,
                                quantity, remaining, seq)
            SELECT gen_random_uuid(), b.id, '1', 'S' || (g % 450), 'bid', 'limit', 'gtc', 100, 10, 10,
                   nextval('command_seq')
            FROM generate_series(1, :n) AS g
            JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM brokers) AS b ON b.k = g % :brokers
            """
        ),
        {"n": n, "brokers": BROKERS},
    )
    rows = conn.execute(text("SELECT broker_id, id FROM orders ORDER BY seq LIMIT :n"), {"n": BATCH})
    return [(row.broker_id, row.id) for row in rows]


def _analyse(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))


@pytest.fixture
def filled(engine: Engine) -> tuple[Engine, list[tuple[uuid.UUID, uuid.UUID]]]:
    """5,000 orders of 100 brokers, analysed; returns the engine and 10 ``(broker_id, order_id)`` keys."""
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        keys = _insert_orders(conn, ROWS)
    _analyse(engine)
    return engine, keys


Keys = tuple[Engine, list[tuple[uuid.UUID, uuid.UUID]]]


@contextmanager
def _psycopg_connection(engine: Engine) -> Iterator[psycopg.Connection[Any]]:
    """A pooled connection's psycopg connection, as the matcher and the webhook worker use theirs."""
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        assert isinstance(conn, psycopg.Connection)
        yield conn
    finally:
        raw.close()


def _nested_plans(
    conn: psycopg.Connection[Any], call: str, params: dict[str, Any], times: int, *, analyse: bool = False
) -> list[str]:
    """The plans auto_explain reports, as notices, for the statements run inside ``call`` (run ``times`` times);
    with ``analyse``, with the rows each node produced and its loops."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    settings = ["log_min_duration = 0", "log_nested_statements = on", "log_level = notice"]
    if analyse:
        settings += ["log_analyze = on", "log_timing = off"]
    for setting in settings:
        conn.execute(f"SET auto_explain.{setting}")
    for _ in range(times):
        conn.execute(call, params)
    conn.rollback()
    return notices


def _plans_kept_while_growing(
    engine: Engine,
    statement: str,
    params: dict[str, Any],
    grow: Callable[[Connection], dict[str, Any]],
    *,
    analyse: bool = False,
) -> list[str]:
    """Run ``statement`` once on a server connection (its plans are made now and kept by it; rolled back), let
    ``grow`` add rows on another connection without ANALYZE (nothing tells the first one to plan again), and return
    the plans auto_explain reports for ``statement`` run on the first with the parameters ``grow`` returns."""
    with _psycopg_connection(engine) as pg:
        pg.execute(statement, params)
        pg.rollback()
        with engine.begin() as other:
            later = grow(other)
        return _nested_plans(pg, statement, later, times=1, analyse=analyse)


def _looks_up(plan: str, table: str, index: str) -> bool:
    """``plan`` reads ``table`` only through ``index``, each time with an index condition: lookups, never a whole
    table or a whole index."""
    lines = plan.splitlines()
    scans = [n for n, line in enumerate(lines) if f" on {index} " in line or f"using {index} on" in line]
    keyed = all(any("Index Cond:" in line for line in lines[n + 1 : n + 3]) for n in scans)
    return bool(scans) and keyed and f"Seq Scan on {table}" not in plan


def _assert_brokers_looked_up(plans: list[str]) -> None:
    """Every plan that reads ``brokers`` looks its rows up by primary key: a batch's few brokers, never all of them
    (``json_to_recordset`` is estimated at 100 rows, and joined at that estimate the table was hashed whole)."""
    reading = [plan for plan in plans if "on brokers" in plan]
    assert reading, plans
    for plan in reading:
        assert _looks_up(plan, "brokers", "pk_brokers"), plan


def _probes_orders_by_primary_key(plan: str) -> bool:
    return _looks_up(plan, "orders", "pk_orders")


SMALL_TABLES = pytest.mark.parametrize("analysed", [False, True], ids=["not-analysed", "analysed"])
"""Plans made on small tables that were analysed (their real sizes weighed) or not (sizes guessed)."""


def _write_params(keys: list[tuple[uuid.UUID, uuid.UUID]]) -> dict[str, Any]:
    """A ``matcher_write`` batch that opens the ``keys``' orders, each with a fresh outbox event."""
    updates = [
        {"order_id": str(order_id), "status": "open", "remaining": 5, "close_reason": None, "priority": 1}
        for _, order_id in keys
    ]
    events: list[dict[str, Any]] = [
        {"id": str(uuid.uuid4()), "broker_id": str(broker_id), "type": "order.fill", "order_id": str(order_id),
         "trade_id": None, "payload": {}}
        for broker_id, order_id in keys
    ]  # fmt: skip
    brokers = [{"id": str(b), "delta": 0, "events": 1} for b in sorted({broker_id for broker_id, _ in keys})]
    return {
        "now": datetime.now(UTC),
        "orders": json.dumps(updates),
        "order_ids": array_literal(order_id for _, order_id in keys),
        "trades": None,
        "brokers": json.dumps(brokers),
        "events": json.dumps(events),
        "event_order_ids": array_literal(order_id for _, order_id in keys),
        "shares": None,
        "seqs": "{}",
        "books": "{}",
        "prices": "{}",
    }


def _assert_write_probes_orders_by_primary_key(plans: list[str]) -> None:
    updates = [p for p in plans if "UPDATE orders" in p]
    outbox = [p for p in plans if "INSERT INTO webhook_events" in p]
    assert len(updates) == 1, plans
    assert len(outbox) == 1, plans
    assert _probes_orders_by_primary_key(updates[0]), updates[0]
    assert _probes_orders_by_primary_key(outbox[0]), outbox[0]
    _assert_brokers_looked_up(plans)


def test_matcher_write_probes_orders_by_primary_key(filled: Keys) -> None:
    # The orders update and the outbox's join to orders, as matcher_write (alembic 0005) plans them: once per server
    # connection, for any batch (an array parameter of order ids is estimated at 10 ids).
    engine, keys = filled
    with _psycopg_connection(engine) as pg:
        _assert_write_probes_orders_by_primary_key(_nested_plans(pg, store._WRITE, _write_params(keys), times=1))


@SMALL_TABLES
def test_matcher_write_plans_made_while_orders_was_small_still_probe_by_primary_key_once_it_is_big(
    engine: Engine, analysed: bool
) -> None:
    # A server connection keeps its plans until a table they read is analysed. Plans made on a fresh database (a
    # few orders: scanning them all is cheapest) chose sequential scans of orders and kept them while the table
    # grew to thousands of rows; matcher_write forbids sequential scans (every table has an index that serves it).
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        keys = _insert_orders(conn, BATCH)
    if analysed:
        _analyse(engine)
    params = _write_params(keys)

    def grow(other: Connection) -> dict[str, Any]:
        _insert_orders(other, ROWS)
        return params

    _assert_write_probes_orders_by_primary_key(_plans_kept_while_growing(engine, store._WRITE, params, grow))


CLAIM_INDEX = "ix_webhook_events_pending_broker_next_attempt_at"
"""Each broker's pending events by due time: the claim finds the brokers with due events and reads each one's."""


@pytest.mark.parametrize(
    ("full_brokers", "index"),
    [([], "ix_webhook_events_pending_next_attempt_at"), ([uuid.uuid4()], CLAIM_INDEX)],
    ids=["oldest-due-path", "per-broker-path"],
)
def test_webhook_claim_reads_due_events_through_their_index_with_its_cached_generic_plan(
    engine: Engine, full_brokers: list[uuid.UUID], index: str
) -> None:
    # 20,000 delivered events and 100 due ones: a plan that scans the table instead of the pending-events index
    # would read them all on every claim. The function plans once per server connection (generic plan), so the
    # plan must be right without knowing the limit: the first call plans, the later ones reuse it. Either path
    # (alembic 0019: per broker only while one is at its cap).
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url="http://127.0.0.1:9/hook")
        conn.execute(
            text(
                """
                INSERT INTO webhook_events (broker_id, sequence, type, payload, status, delivered_at)
                SELECT b.id, g, 'trade_executed', '{}', CASE WHEN g > 1 THEN 'delivered' ELSE 'pending' END,
                       CASE WHEN g > 1 THEN now() END
                FROM generate_series(1, 201) AS g CROSS JOIN brokers AS b
                """
            )
        )
    _analyse(engine)
    params = {
        "room_brokers": [],
        "room_left": [],
        "full_brokers": full_brokers,
        "limit": 32,
        "per_broker": 16,
        "lease": 30,
    }
    with _psycopg_connection(engine) as pg:
        plans = [p for p in _nested_plans(pg, webhook_store._CLAIM, params, times=3) if "webhook_events" in p]
    assert len(plans) == 3, plans
    assert all(index in plan for plan in plans), plans[0]
    assert not any("Seq Scan on webhook_events" in plan for plan in plans), plans[0]


def _most_rows_read(plan: str, table: str) -> int:
    """The most rows any scan of ``table`` in an analysed ``plan`` read, per loop (``ops.bench_db``'s rule)."""
    return most_rows_read([plan], table)


def test_a_claim_reads_none_of_the_due_events_of_a_broker_at_its_cap(engine: Engine) -> None:
    # A hanging receiver: its broker has 5,000 due events, the oldest of all, and this worker already has its
    # deliveries to it in flight (full_brokers). Filtered after being read, each of them was read by every claim
    # (28-31 ms at 100,000 instead of ~2 ms), however few events of other brokers it then took.
    backlog = 5000
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url="http://127.0.0.1:9/hook")
        hanging = conn.execute(text("SELECT id FROM brokers ORDER BY name LIMIT 1")).scalar_one()
        conn.execute(
            text(
                """
                INSERT INTO webhook_events (broker_id, sequence, type, payload, next_attempt_at)
                SELECT :hanging, g, 'order.fill', '{}', now() - interval '1 hour' FROM generate_series(1, :n) AS g
                """
            ),
            {"hanging": hanging, "n": backlog},
        )
        conn.execute(
            text(
                """
                INSERT INTO webhook_events (broker_id, sequence, type, payload, next_attempt_at)
                SELECT b.id, 1, 'order.fill', '{}', now() - interval '1 minute' FROM brokers AS b WHERE b.id <> :hanging
                """
            ),
            {"hanging": hanging},
        )
    _analyse(engine)
    params = {"room_brokers": [], "room_left": [], "full_brokers": [hanging], "limit": 32, "per_broker": 16,
              "lease": 30}  # fmt: skip
    with _psycopg_connection(engine) as pg:
        plans = [p for p in _nested_plans(pg, webhook_store._CLAIM, params, times=2, analyse=True) if "due AS" in p]
        claimed = pg.execute(webhook_store._CLAIM, params).fetchall()
        pg.rollback()

    assert len(plans) == 2, plans
    assert all(_most_rows_read(plan, "webhook_events") < BROKERS * 2 for plan in plans), plans[-1]
    assert not any("Seq Scan on webhook_events" in plan for plan in plans), plans[-1]
    assert len(claimed) == 32
    assert hanging not in {row[2] for row in claimed}  # (id, attempts, broker_id, …)


def _claim_plan_kept_while_the_outbox_grew(
    engine: Engine,
    made_on: str,
    *,
    one_broker_full: bool,
    brokers: int = BROKERS,
    growth: int = 50,
    history: int = 0,
) -> str:
    """The plan of the claim's ``due`` statement made on an outbox of ``brokers`` brokers as ``made_on`` says (empty
    and analysed, or one pending event per broker, analysed or not), kept while ``growth`` events per broker
    arrived (after ``history`` delivered ones, the first ones delivered too); ``one_broker_full``: the first broker
    at its cap (the per-broker path)."""
    if made_on == "empty-analysed":
        _analyse(engine)
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url="http://127.0.0.1:9/hook", n=brokers)
        full = conn.execute(text("SELECT id FROM brokers ORDER BY name LIMIT 1")).scalar_one()
        if made_on != "empty-analysed":
            _insert_pending_events(conn, per_broker=1, first_sequence=1)
    if made_on == "small-analysed":
        _analyse(engine)
    params = {"room_brokers": [], "room_left": [], "full_brokers": [full] if one_broker_full else [], "limit": 20,
              "per_broker": 64, "lease": 30}  # fmt: skip

    def grow(other: Connection) -> dict[str, Any]:
        if history:
            _deliver_pending_events(other)
            _insert_pending_events(other, per_broker=history, first_sequence=2)
            _deliver_pending_events(other)
        _insert_pending_events(other, per_broker=growth, first_sequence=2 + history)
        return params

    kept = _plans_kept_while_growing(engine, webhook_store._CLAIM, params, grow, analyse=True)
    [plan] = [p for p in kept if "due AS" in p]
    return plan


@pytest.mark.parametrize("made_on", ["empty-analysed", "small-not-analysed", "small-analysed"])
def test_webhook_claim_plans_made_while_few_events_were_pending_still_read_only_what_they_claim_once_many_are(
    engine: Engine, made_on: str
) -> None:
    # The bench's workers claim once on an empty outbox, then 5,000 events arrive: a plan made then locked each
    # claimed event through a pending-events index, reading every pending event for each (5x PostgreSQL's CPU per
    # delivery).
    plan = _claim_plan_kept_while_the_outbox_grew(engine, made_on, one_broker_full=False)

    assert _most_rows_read(plan, "webhook_events") <= BROKERS, plan
    assert "Seq Scan on webhook_events" not in plan, plan


def _index_conditions(plan: str, index: str) -> list[str]:
    """The index condition of every scan of ``index`` in ``plan`` ('' for a scan without one: the whole index)."""
    lines = plan.splitlines()
    found = []
    for n, line in enumerate(lines):
        if f"using {index} on" in line or f" on {index} " in line:
            found.append(next((c.strip() for c in lines[n + 1 : n + 4] if "Index Cond:" in c), ""))
    return found


@pytest.mark.parametrize("made_on", ["empty-analysed", "small-not-analysed", "small-analysed"])
def test_a_per_broker_claim_planned_while_few_events_were_pending_locks_each_event_by_a_key_once_many_are(
    engine: Engine, made_on: str
) -> None:
    # Planned on an empty analysed outbox, the per-broker claim locked each candidate by its id alone through
    # uq_webhook_events_broker_id_id (alembic 0021), which its broker leads: the whole index per lock (35,000
    # buffers and 240-270 ms for a claim of 32 among 300,000 events). A broker-led index must be read with its
    # broker (alembic 0022 names it).
    plan = _claim_plan_kept_while_the_outbox_grew(engine, made_on, one_broker_full=True)

    for index in ("uq_webhook_events_broker_id_id", "uq_webhook_events_broker_id_sequence"):
        assert all("broker_id" in cond for cond in _index_conditions(plan, index)), plan
    assert _most_rows_read(plan, "webhook_events") <= BROKERS, plan
    assert "Seq Scan on webhook_events" not in plan, plan


@pytest.mark.parametrize("made_on", ["empty-analysed", "small-not-analysed", "small-analysed"])
def test_a_per_broker_claim_planned_on_one_pending_event_of_each_of_200_brokers_locks_each_event_by_a_unique_key(
    engine: Engine, made_on: str
) -> None:
    # alembic 0024: on one pending event for each of 200 brokers (analysed or not), every index that serves the
    # lock's "id = c.id AND broker_id = c.broker_id" cost the same, and the plan kept read
    # uq_webhook_events_broker_id_sequence by the broker alone, filtering by id: the broker's history, from its
    # first event to the one locked, per lock (500-1,000 rows a lock at 100,000-200,000 events). The lock names the
    # sequence too: a unique key of each index. Here each broker's 2 due events follow 101 delivered ones.
    plan = _claim_plan_kept_while_the_outbox_grew(
        engine, made_on, one_broker_full=True, brokers=200, growth=2, history=100
    )

    for index, key in (("uq_webhook_events_broker_id_sequence", "(sequence = "),
                       ("uq_webhook_events_broker_id_id", "(id = ")):  # fmt: skip
        assert all(key in cond for cond in _index_conditions(plan, index)), plan  # the whole key, not the broker
    assert _most_rows_read(plan, "webhook_events") <= 20, plan  # the claim's limit: a broker's due events at most
    assert "Seq Scan on webhook_events" not in plan, plan


def _explained(engine: Engine, statement: str, params: dict[str, Any]) -> str:
    """``statement``'s plan as the api's connection makes it (its parameters bound), run, with the rows each node
    produced and filtered out."""
    with _psycopg_connection(engine) as pg:
        rows = pg.execute(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {statement}", params).fetchall()
        pg.rollback()
    return "\n".join(str(row[0]) for row in rows)


class _Recorder:
    """An api connection that records the statement it is given and answers no rows."""

    def __init__(self) -> None:
        self.statement = ""
        self.params: dict[str, Any] = {}

    async def execute(self, statement: str, params: dict[str, Any]) -> _Recorder:
        self.statement, self.params = statement, params
        return self

    async def fetchall(self) -> list[Any]:
        return []


HISTORY = 5000
"""Closed orders or delivered events in one broker's history: what a broker-scoped read must not go through."""


@pytest.mark.parametrize("status", [OrderStatus.OPEN, OrderStatus.PENDING])
def test_listing_a_brokers_open_or_pending_orders_reads_none_of_its_closed_history(
    engine: Engine, status: OrderStatus
) -> None:
    # The broker's orders not closed are its oldest (every broker's first 40): newest first through (broker_id,
    # created_at), the listing read every closed order after them (72 ms for a broker with 101,000).
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        broker = conn.execute(text("SELECT id FROM brokers ORDER BY name LIMIT 1")).scalar_one()
        conn.execute(
            text(
                """
                INSERT INTO orders (id, broker_id, document_number, symbol, side, order_type, time_in_force, price,
                                    quantity, remaining, status, close_reason, seq, priority, created_at)
                SELECT gen_random_uuid(), b.id, '1', 'S1', 'bid', 'limit', 'gtc', 100, 10,
                       CASE WHEN g > :live THEN 0 ELSE 10 END,
                       CASE WHEN g > :live THEN 'closed' WHEN g % 2 = 0 THEN 'open' ELSE 'pending' END,
                       CASE WHEN g > :live THEN 'filled' END, nextval('command_seq'),
                       CASE WHEN g <= :live THEN currval('command_seq') END,
                       now() - make_interval(secs => :n - g)
                FROM brokers AS b, generate_series(1, CASE WHEN b.id = :broker THEN :n ELSE 100 END) AS g
                """
            ),
            {"broker": broker, "live": 40, "n": HISTORY},
        )
    _analyse(engine)
    recorder = _Recorder()
    asyncio.run(queries.list_orders(cast(Any, recorder), broker, status=status, limit=10))

    plan = _explained(engine, recorder.statement, recorder.params)

    assert "ix_orders_broker_live_created" in plan, plan
    assert _most_rows_read(plan, "orders") <= 40, plan


def test_a_brokers_endpoint_counts_read_only_its_pending_and_failed_events(engine: Engine) -> None:
    # 5,000 delivered events, 30 pending, 5 failed: the counts read every event of the broker (81 ms at 101,000).
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url="http://127.0.0.1:9/hook")
        broker = conn.execute(text("SELECT id FROM brokers ORDER BY name LIMIT 1")).scalar_one()
        conn.execute(
            text(
                """
                INSERT INTO webhook_events (broker_id, sequence, type, payload, status, delivered_at)
                SELECT b.id, g, 'order.fill', '{}',
                       CASE WHEN g <= 30 THEN 'pending' WHEN g <= 35 THEN 'failed' ELSE 'delivered' END,
                       CASE WHEN g > 35 THEN now() END
                FROM brokers AS b, generate_series(1, CASE WHEN b.id = :broker THEN :n ELSE 50 END) AS g
                """
            ),
            {"broker": broker, "n": HISTORY},
        )
    _analyse(engine)

    plan = _explained(engine, webhook_queries._ENDPOINT, {"broker_id": broker})

    assert CLAIM_INDEX in plan, plan
    assert "ix_webhook_events_failed_broker" in plan, plan
    assert _most_rows_read(plan, "webhook_events") <= 30, plan


def test_the_admins_failing_endpoints_read_only_the_failed_and_retried_events(engine: Engine) -> None:
    # Every broker has delivered events; a few have failed ones or retries. The list read all of webhook_events (a
    # parallel sequential scan: 1.6 s at 300,000 events).
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url="http://127.0.0.1:9/hook")
        conn.execute(
            text(
                """
                WITH k AS (SELECT id, row_number() OVER (ORDER BY id) AS k FROM brokers)
                INSERT INTO webhook_events (broker_id, sequence, type, payload, status, delivered_at, last_error)
                SELECT k.id, g, 'order.fill', '{}',
                       CASE WHEN k.k % 10 = 0 AND g <= 3 THEN 'failed' WHEN k.k % 10 = 1 AND g <= 3 THEN 'pending'
                            ELSE 'delivered' END,
                       CASE WHEN k.k % 10 IN (0, 1) AND g <= 3 THEN NULL ELSE now() END,
                       CASE WHEN k.k % 10 IN (0, 1) AND g <= 3 THEN 'HTTP 500' END
                FROM k, generate_series(1, 200) AS g
                """
            )
        )
        conn.execute(text("UPDATE brokers SET webhook_consecutive_failures = 3 WHERE id IN "
                          "(SELECT broker_id FROM webhook_events WHERE status = 'failed')"))  # fmt: skip
    _analyse(engine)

    plan = _explained(engine, webhook_queries._FAILING, {"limit": 500})

    assert "Seq Scan on webhook_events" not in plan, plan
    assert "ix_webhook_events_failed_broker" in plan, plan
    assert "ix_webhook_events_retrying_broker" in plan, plan
    assert _most_rows_read(plan, "webhook_events") <= 30, plan  # the events being retried, none delivered


def _insert_pending_events(conn: Connection, per_broker: int, first_sequence: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """``per_broker`` pending events of every broker; returns ``(event_id, broker_id)`` of the first ``BATCH``."""
    rows = conn.execute(
        text(
            """
            INSERT INTO webhook_events (broker_id, sequence, type, payload, attempts)
            SELECT b.id, :first + g, 'trade_executed', '{}', 1
            FROM generate_series(0, :n - 1) AS g CROSS JOIN brokers AS b
            RETURNING id, broker_id
            """
        ),
        {"n": per_broker, "first": first_sequence},
    )
    return [(row.id, row.broker_id) for row in rows][:BATCH]


def _deliver_pending_events(conn: Connection) -> None:
    """Every pending event delivered."""
    conn.execute(text("UPDATE webhook_events SET status = 'delivered', delivered_at = now() WHERE status = 'pending'"))


def _record_params(events: list[tuple[uuid.UUID, uuid.UUID]]) -> dict[str, Any]:
    """A ``webhook_record`` batch: each of ``events`` delivered at its first attempt."""
    batch = [
        {"ord": n, "id": str(event_id), "broker_id": str(broker_id), "attempt": 1, "kind": "delivered",
         "started": datetime.now(UTC).isoformat(), "url": "http://127.0.0.1:9/hook", "status_code": 200,
         "latency_ms": 1, "error": None, "excerpt": "", "delay": None, "reason": None}
        for n, (event_id, broker_id) in enumerate(events, 1)
    ]  # fmt: skip
    return {"batch": json.dumps(batch), "limit": 20}


@SMALL_TABLES
def test_webhook_record_plans_made_while_few_events_were_pending_still_update_events_by_primary_key(
    engine: Engine, analysed: bool
) -> None:
    # The recorder's plans are kept per server connection until webhook_events is analysed. Made while a handful of
    # events were pending, they read every pending event through the pending-events index to update the batch's
    # few; with thousands pending (a slow receiver's backlog) each record then read them all.
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url="http://127.0.0.1:9/hook")
        first = _insert_pending_events(conn, per_broker=1, first_sequence=1)
    if analysed:
        _analyse(engine)

    def grow(other: Connection) -> dict[str, Any]:
        return _record_params(_insert_pending_events(other, per_broker=50, first_sequence=2))

    kept = _plans_kept_while_growing(engine, webhook_store._RECORD, _record_params(first), grow)
    plans = [p for p in kept if "o AS" in p]
    assert len(plans) == 1, plans
    assert _looks_up(plans[0], "webhook_events", "pk_webhook_events"), plans[0]
    _assert_brokers_looked_up(kept)
    assert "ix_webhook_events_pending_next_attempt_at" not in plans[0], plans[0]


ORDERS_GATE = "EXISTS (SELECT FROM orders)"
"""The check ``order_views`` and ``write_cancels`` make before their lookup (alembic 0023)."""

READS = {
    "order_views": (
        queries._ORDERS_WITH_TRADES,
        ("pk_orders", "ix_trades_buy_order_id", "ix_trades_sell_order_id", "pk_brokers"),
    ),
    "book_levels": (queries._BOOK, ("ix_orders_open_book",)),
    "recent_prices": (queries._RECENT_PRICES, ("ix_trades_symbol_executed_at",)),
}
"""The api's reads (alembic 0007): statement, and the indexes through which its plan must reach every row."""


@pytest.mark.parametrize("made_on", ["empty-analysed", "small-not-analysed", "small-analysed"])
@pytest.mark.parametrize("read", list(READS))
def test_api_read_plans_made_while_tables_were_small_still_use_their_indexes_once_they_are_big(
    engine: Engine, made_on: str, read: str
) -> None:
    statement, indexes = READS[read]
    if made_on == "empty-analysed":  # a fresh database's first plans, with statistics that say "no rows"
        _analyse(engine)
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        keys = _insert_orders(conn, BATCH)
    if made_on == "small-analysed":
        _analyse(engine)
    params = {
        "ids": [order_id for _, order_id in keys],
        "broker_ids": [broker_id for broker_id, _ in keys],
        "symbol": "S1",
        "depth": 10,
        "n": 50,
    }

    def grow(other: Connection) -> dict[str, Any]:
        _insert_orders(other, ROWS)
        return params

    kept = _plans_kept_while_growing(engine, statement, params, grow)
    # Not order_views' check for a first order (alembic 0023), which reads one index entry.
    [plan] = [p for p in kept if ("Index" in p or "Seq Scan" in p) and ORDERS_GATE not in p]
    for index in indexes:
        table = next(name for name in ("orders", "trades", "brokers") if name in index)
        assert _looks_up(plan, table, index), plan


def _insert_place_commands(conn: Connection) -> None:
    """An unprocessed ``place`` command for every order that has none."""
    conn.execute(
        text(
            "INSERT INTO commands (seq, symbol, kind, order_id) SELECT o.seq, o.symbol, 'place', o.id FROM orders o"
            " WHERE NOT EXISTS (SELECT 1 FROM commands c WHERE c.seq = o.seq)"
        )
    )


PENDING_GATE = "EXISTS (SELECT FROM commands)"
"""The check ``matcher_pending`` makes before its read until its server connection has seen a command (alembic
0024)."""

MADE_ON = pytest.mark.parametrize("made_on", ["empty-analysed", "small-not-analysed", "small-analysed"])
"""Plans made on a fresh database's statistics ("no rows"), or on small tables not analysed or analysed."""


def _orders_with_pending_commands(engine: Engine, made_on: str) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """``BATCH`` orders, each with an unprocessed place command, under the statistics ``made_on`` names; returns
    their ``(broker_id, order_id)`` keys."""
    if made_on == "empty-analysed":
        _analyse(engine)
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        keys = _insert_orders(conn, BATCH)
        _insert_place_commands(conn)
    if made_on == "small-analysed":
        _analyse(engine)
    return keys


def _growing_pending_commands(params: dict[str, Any]) -> Callable[[Connection], dict[str, Any]]:
    """A ``grow`` for :func:`_plans_kept_while_growing`: ``ROWS`` more orders with unprocessed place commands."""

    def grow(other: Connection) -> dict[str, Any]:
        _insert_orders(other, ROWS)
        _insert_place_commands(other)
        return params

    return grow


@MADE_ON
def test_matcher_pending_plans_made_while_tables_were_small_still_read_each_symbols_range_once_they_are_big(
    engine: Engine, made_on: str
) -> None:
    # alembic 0010: kept per server connection, the plan must stay a bounded range scan of the unprocessed
    # commands of each symbol with the orders probed by primary key, not a scan of the whole backlog.
    _orders_with_pending_commands(engine, made_on)
    params = {"symbols": array_literal(["S1", "S2", "S3"]), "limit": 50}

    kept = _plans_kept_while_growing(engine, store._PENDING, params, _growing_pending_commands(params))
    [plan] = [p for p in kept if ("Index" in p or "Seq" in p) and PENDING_GATE not in p]
    assert _looks_up(plan, "commands", "ix_commands_unprocessed_symbol_seq"), plan
    assert _probes_orders_by_primary_key(plan), plan


@MADE_ON
def test_cancel_plans_made_while_tables_were_small_still_probe_orders_and_pending_commands_once_they_are_big(
    engine: Engine, made_on: str
) -> None:
    # alembic 0012: the group's orders by primary key, and each one's pending cancel through the unprocessed
    # commands' index, never a scan of every order or of the command log.
    keys = _orders_with_pending_commands(engine, made_on)
    params = {
        "ids": array_literal(order_id for _, order_id in keys),
        "broker_ids": array_literal(broker_id for broker_id, _ in keys),
    }

    kept = _plans_kept_while_growing(engine, accept._INSERT_CANCELS, params, _growing_pending_commands(params))
    [plan] = [p for p in kept if "decided AS" in p]  # not the foreign-key checks of the commands written
    assert _probes_orders_by_primary_key(plan), plan
    assert _looks_up(plan, "commands", "ix_commands_pending_cancel"), plan


def test_matcher_pending_first_called_before_any_command_probes_each_commands_order_once_there_are_many(
    engine: Engine,
) -> None:
    # alembic 0024: planned while orders had no page and its statistics said empty (a fresh database's matcher,
    # called before any order), the read kept a whole scan of pk_orders per command, the id as a join filter:
    # 8.9 s per call of 3 symbols x 50 commands at 200,000 orders. It is now first planned once a command exists.
    _analyse(engine)  # a fresh database's statistics: every table empty
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
    params = {"symbols": array_literal(["S1", "S2", "S3"]), "limit": 50}

    with _psycopg_connection(engine) as pg:
        assert pg.execute(store._PENDING, params).fetchall() == []  # the first call, on no command at all
        pg.rollback()
        with engine.begin() as other:
            [(_, first)] = _insert_orders(other, 1)  # in S1
            _insert_place_commands(other)
        assert [row[3] for row in pg.execute(store._PENDING, params)] == [first]  # one command: one page of each
        pg.rollback()
        with engine.begin() as other:
            _insert_orders(other, ROWS)  # no ANALYZE: the plans made above are kept
            _insert_place_commands(other)
        kept = _nested_plans(pg, store._PENDING, params, times=1, analyse=True)
    [plan] = [p for p in kept if "ORDER BY c.seq" in p]
    assert _looks_up(plan, "commands", "ix_commands_unprocessed_symbol_seq"), plan
    assert _probes_orders_by_primary_key(plan), plan
    assert _most_rows_read(plan, "orders") <= 1, plan  # each command's order found by one probe


ORDER_LOOKUPS = {
    "write_cancels": (accept._INSERT_CANCELS, array_literal, "decided AS"),
    "order_views": (queries._ORDERS_WITH_TRADES, list, "unnest"),
}
"""The functions that look orders up by id alone (the symbol unknown): statement, how its id arrays are passed,
and a text of the plan that looks them up (not the foreign-key checks of what it writes)."""


@pytest.mark.parametrize("function", list(ORDER_LOOKUPS))
def test_an_order_lookup_by_id_first_called_on_an_empty_analysed_table_probes_the_primary_key_once_it_is_big(
    engine: Engine, function: str
) -> None:
    # alembic 0023: planned while orders had no page and its statistics said empty, every path to an order cost
    # the same and the plan kept read uq_orders_symbol_id (symbol, id) whole per order, by its id (not its
    # leading column): 200,000 orders later, 54-65 ms for 10 orders. The lookup now waits for a first order.
    statement, arrays, marker = ORDER_LOOKUPS[function]
    _analyse(engine)  # a fresh database's statistics: every table empty
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        brokers = [row[0] for row in conn.execute(text("SELECT id FROM brokers ORDER BY id LIMIT :n"), {"n": BATCH})]
    unknown = {"ids": arrays(uuid.uuid4() for _ in brokers), "broker_ids": arrays(brokers)}

    with _psycopg_connection(engine) as pg:
        pg.execute(statement, unknown)  # the first call, on no order at all
        pg.rollback()
        with engine.begin() as other:
            [(broker, order)] = _insert_orders(other, 1)
        pg.execute(statement, {"ids": arrays([order]), "broker_ids": arrays([broker])})  # one order: one page
        pg.rollback()
        with engine.begin() as other:
            keys = _insert_orders(other, ROWS)  # no ANALYZE: the plans made above are kept
        params = {"ids": arrays(o for _, o in keys), "broker_ids": arrays(b for b, _ in keys)}
        kept = _nested_plans(pg, statement, params, times=1, analyse=True)
    [plan] = [p for p in kept if marker in p and "Index" in p and " on orders" in p]
    for index in ("uq_orders_symbol_id", "uq_orders_symbol_broker_id_id"):
        assert all("symbol" in cond for cond in _index_conditions(plan, index)), plan
    assert _probes_orders_by_primary_key(plan), plan
    assert f"rows=1 loops={BATCH})" in plan, plan  # each order found by one probe


def test_a_cancels_pending_check_probes_only_unprocessed_cancels_however_long_the_symbols_backlog(
    engine: Engine,
) -> None:
    # alembic 0018: each order's pending cancel through the unprocessed cancels' own index, by order id. Through
    # the symbol's unprocessed commands ((symbol, seq), filtered by order and kind) it read the symbol's whole
    # backlog per order while the matcher was behind.
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        _insert_orders(conn, ROWS)
        conn.execute(text("UPDATE orders SET symbol = 'S1'"))  # one symbol, all of it pending
        _insert_place_commands(conn)
        keys = [(r.broker_id, r.id) for r in conn.execute(text("SELECT broker_id, id FROM orders LIMIT :n"),
                                                          {"n": BATCH})]  # fmt: skip
    _analyse(engine)
    params = {
        "ids": array_literal(order_id for _, order_id in keys),
        "broker_ids": array_literal(broker_id for broker_id, _ in keys),
    }
    with _psycopg_connection(engine) as pg:
        plans = _nested_plans(pg, accept._INSERT_CANCELS, params, times=1, analyse=True)
    [plan] = [p for p in plans if "decided AS" in p]
    assert _looks_up(plan, "commands", "ix_commands_pending_cancel"), plan
    assert "ix_commands_unprocessed_symbol_seq" not in plan, plan


def _rows_read(plan: str) -> list[tuple[int, str]]:
    """Every node of an analysed plan with the rows it produced over all its loops (rows x loops), largest first."""
    nodes = []
    for line in plan.splitlines():
        found = re.search(r"actual (?:time=\S+ )?rows=(\d+) loops=(\d+)", line)
        if found:
            nodes.append((int(found[1]) * int(found[2]), line.strip()))
    return sorted(nodes, reverse=True)


CANCEL_ALL_ORDERS = 2000


def test_a_cancel_all_of_thousands_of_orders_decides_each_once_with_no_nested_loop_rescans(engine: Engine) -> None:
    # alembic 0018: write_cancels' cached generic plan joined the orders it decided to the commands it wrote by a
    # nested loop, N x N rows for a cancel-all of N orders (20,000 orders: 35 s, holding every cancel bucket's
    # lock). Decided once and returned from that decision, no node produces more than a few rows per order.
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        broker = conn.execute(text("SELECT id FROM brokers ORDER BY id LIMIT 1")).scalar_one()
        conn.execute(
            text(
                """
                INSERT INTO orders (broker_id, document_number, symbol, side, order_type, time_in_force, price,
                                    quantity, remaining, status, seq, priority)
                SELECT :b, '1', 'MM', 'ask', 'limit', 'gtc', 2000 + g, 1, 1, 'open', nextval('command_seq'),
                       currval('command_seq')
                FROM generate_series(1, :n) AS g
                """
            ),
            {"b": broker, "n": CANCEL_ALL_ORDERS},
        )
    _analyse(engine)
    with _psycopg_connection(engine) as pg:
        live = pg.execute(accept._LIVE_BY_BUCKET, {"broker_id": broker, "symbol": "MM"}).fetchall()
        [(ids, n)] = accept.chunk_texts([row[1] for row in live], CANCEL_ALL_ORDERS)  # every order in one chunk
        params = {"broker_id": broker, "ids": ids, "n": n}
        plans = _nested_plans(pg, accept._CANCEL_CHUNK, params, times=1, analyse=True)
    [plan] = [p for p in plans if "INSERT INTO commands" in p]
    assert _probes_orders_by_primary_key(plan), plan
    assert f"rows=1 loops={CANCEL_ALL_ORDERS})" in plan, plan  # every order fetched, once
    [(largest, node), *_] = _rows_read(plan)
    assert largest <= 2 * CANCEL_ALL_ORDERS, (node, plan)
    assert "Seq Scan" not in plan, plan


def test_cancel_all_finds_the_brokers_live_orders_through_the_open_orders_index_once(engine: Engine) -> None:
    # A cancel-all's orders are the broker's orders in the symbol that are not closed: ix_orders_open_book holds
    # exactly the orders not closed, by symbol. "status <> 'closed'" could not use it (the broker's whole history
    # was read), and the inlined CTE put the orders' subquery in both of write_cancels' arguments (read twice). The
    # chunked cancel-all reads them once, in its first statement, and hands each chunk's ids to write_cancels.
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        _insert_orders(conn, ROWS)
        conn.execute(text("UPDATE orders SET status = 'closed', close_reason = 'filled', remaining = 0"
                          " WHERE seq % 10 <> 0"))  # fmt: skip
        broker = conn.execute(text("SELECT broker_id FROM orders WHERE symbol = 'S10' LIMIT 1")).scalar_one()
    _analyse(engine)
    with _psycopg_connection(engine) as pg:
        plan = "\n".join(
            row[0] for row in pg.execute("EXPLAIN " + accept._LIVE_BY_BUCKET, {"broker_id": broker, "symbol": "S10"})
        )
    reads = [line for line in plan.splitlines() if " on orders" in line]
    assert len(reads) == 1, plan
    assert _looks_up(plan, "orders", "ix_orders_open_book"), plan


def test_the_cancel_bucket_function_is_inlined_as_its_expression_into_write_cancels_and_the_cancel_alls_read(
    engine: Engine,
) -> None:
    # cancel_bucket (alembic 0026) names the bucket expression once; inlined, its callers' plans compute the
    # expression itself, as they did before the function existed: no SQL function call per order id.
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        keys = _insert_orders(conn, ROWS)
    broker = keys[0][0]
    params = {"ids": array_literal(i for _, i in keys), "broker_ids": array_literal(b for b, _ in keys)}
    with _psycopg_connection(engine) as pg:
        pg.execute("LOAD 'auto_explain'")
        pg.execute("SET auto_explain.log_verbose = on")
        plans = _nested_plans(pg, accept._INSERT_CANCELS, params, 1)
        plans.append("\n".join(row[0] for row in pg.execute("EXPLAIN VERBOSE " + accept._LIVE_BY_BUCKET,
                                                            {"broker_id": broker, "symbol": "S1"})))  # fmt: skip
    locks = [plan for plan in plans if "pg_advisory_xact_lock" in plan]
    assert len(locks) == 1, plans
    for plan in (locks[0], plans[-1]):  # the nodes' Output lines: the lock's plan also prints its query's text
        outputs = [line for line in plan.splitlines() if line.strip().startswith("Output:")]
        assert any("hashtext(" in line for line in outputs), plan
        assert not any("cancel_bucket(" in line for line in outputs), plan


def _insert_symbols(conn: Connection, n: int, first: int) -> None:
    conn.execute(
        text("INSERT INTO symbols (symbol) SELECT 'S' || g FROM generate_series(:first, :first + :n - 1) AS g"),
        {"n": n, "first": first},
    )


@MADE_ON
def test_matcher_lock_plans_made_while_symbols_were_few_still_read_versions_by_primary_key_once_they_are_many(
    engine: Engine, made_on: str
) -> None:
    # alembic 0013: the versions of a transaction's few books, never every symbol's row.
    if made_on == "empty-analysed":
        _analyse(engine)
    with engine.begin() as conn:
        _insert_symbols(conn, BATCH, first=0)
    if made_on == "small-analysed":
        _analyse(engine)
    params = {"keys": array_literal([1, 2, 3]), "symbols": array_literal(["S1", "S2", "S3"])}

    def grow(other: Connection) -> dict[str, Any]:
        _insert_symbols(other, ROWS, first=BATCH)
        return params

    kept = _plans_kept_while_growing(engine, store._LOCK_VERSIONS, params, grow)
    [plan] = [p for p in kept if "symbols" in p and ("Index" in p or "Seq Scan" in p)]
    assert _looks_up(plan, "symbols", "pk_symbols"), plan


@pytest.mark.parametrize("key", ["client_order_id", "idempotency_key"])
def test_a_replays_original_is_looked_up_through_both_columns_of_each_unique_index(engine: Engine, key: str) -> None:
    # The original of a replayed order, for a broker with thousands of orders: "client_order_id = … OR
    # idempotency_key = …" used neither unique index on both its columns and read every order of the broker
    # (680,000 orders: 200,000 index entries, 113 ms per replay). Each key has its own lookup now.
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        _insert_orders(conn, ROWS)
        broker = conn.execute(text("SELECT id FROM brokers ORDER BY id LIMIT 1")).scalar_one()
        conn.execute(
            text("UPDATE orders SET broker_id = :b, client_order_id = 'c' || seq, idempotency_key = 'k' || seq"),
            {"b": broker},
        )  # one broker's long history, every order with both keys
    _analyse(engine)
    params = {
        "broker_ids": [broker],
        "client_order_ids": ["c10" if key == "client_order_id" else None],
        "idempotency_keys": ["k10" if key == "idempotency_key" else None],
    }
    with _psycopg_connection(engine) as pg:
        plan = "\n".join(row[0] for row in pg.execute("EXPLAIN " + accept._FIND_DUPLICATES, params))
    lines = plan.splitlines()
    for index, column in (("uq_orders_broker_id_client_order_id", "client_order_id"),
                          ("uq_orders_broker_id_idempotency_key", "idempotency_key")):  # fmt: skip
        assert _looks_up(plan, "orders", index), plan
        [at] = [n for n, line in enumerate(lines) if f"using {index} on" in line or f" on {index} " in line]
        condition = next(line for line in lines[at + 1 : at + 3] if "Index Cond:" in line)
        assert "broker_id" in condition, plan
        assert column in condition, plan
    assert "ix_orders_broker_created" not in plan, plan


def test_the_sweepers_expiry_scan_reads_only_due_orders_through_their_index(engine: Engine) -> None:
    from exchange.sweeper import _LOG_EXPIRIES

    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        _insert_orders(conn, ROWS)
        conn.execute(text("UPDATE orders SET time_in_force = 'gtd', valid_until = now() + interval '1 day'"))
    _analyse(engine)
    with engine.connect() as conn:
        plan = "\n".join(row[0] for row in conn.execute(text(f"EXPLAIN {_LOG_EXPIRIES.text}")))

    assert "ix_orders_open_valid_until" in plan, plan
    assert "Index Cond: (valid_until <= statement_timestamp())" in plan, plan


def test_the_sweepers_pending_expire_check_reads_only_pending_expires_however_long_the_backlog(
    engine: Engine,
) -> None:
    # alembic 0018: with the matcher behind (every order's place command unprocessed) and orders due in many
    # symbols, the check for an expire already pending read the unprocessed commands' indexes whole per due
    # symbol, under the expiry lock; ix_commands_pending_expire holds the unprocessed expires alone.
    from exchange.sweeper import _LOG_EXPIRIES

    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        _insert_orders(conn, ROWS)
        _insert_place_commands(conn)
        conn.execute(
            text(
                "UPDATE orders SET status = 'open', priority = seq, time_in_force = 'gtd',"
                " valid_until = now() - interval '1 second' WHERE seq % 7 = 0"
            )
        )
    _analyse(engine)
    with engine.connect() as conn:
        plan = "\n".join(row[0] for row in conn.execute(text(f"EXPLAIN (ANALYZE, TIMING OFF) {_LOG_EXPIRIES.text}")))
        conn.rollback()

    assert "ix_commands_pending_expire" in plan, plan
    assert "ix_commands_unprocessed" not in plan, plan
    assert "Seq Scan on commands" not in plan, plan


# 50 outbox events of every broker, as CTE ``e`` (id, broker_id, sequence) for an INSERT of their attempts to follow.
_FIFTY_EVENTS_PER_BROKER = """
    WITH e AS (
        INSERT INTO webhook_events (broker_id, sequence, type, payload)
        SELECT b.id, g, 'order.fill', '{}' FROM generate_series(1, 50) AS g, brokers b
        RETURNING id, broker_id, sequence
    )
    """


def test_the_ops_pages_recent_errors_read_the_latest_failed_attempts_through_their_index(engine: Engine) -> None:
    from exchange.ops.data import _RECENT_ERRORS

    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url="https://h.example/x")
        conn.execute(
            text(
                _FIFTY_EVENTS_PER_BROKER
                + """
                INSERT INTO webhook_attempts (event_id, broker_id, attempted_at, url, status_code, error)
                SELECT id, broker_id, now() - make_interval(secs => sequence), 'https://h.example/x',
                       CASE WHEN sequence % 100 = 7 THEN 500 ELSE 200 END,
                       CASE WHEN sequence % 100 = 7 THEN 'HTTP 500' END
                FROM e
                """
            )
        )
    _analyse(engine)
    with engine.connect() as conn:
        statement = _RECENT_ERRORS.replace("%(limit)s", "20")  # the psycopg placeholder the ops page binds
        plan = "\n".join(row[0] for row in conn.execute(text(f"EXPLAIN {statement}")))

    assert "ix_webhook_attempts_failed_attempted_at" in plan, plan
    assert "Seq Scan on webhook_attempts" not in plan, plan


@pytest.mark.parametrize("after", [datetime.min.replace(tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)])
def test_the_sweepers_retention_reads_the_oldest_attempts_through_their_index_and_deletes_them_by_key(
    engine: Engine, after: datetime
) -> None:
    from exchange.sweeper import _DELETE_OLD_ATTEMPTS

    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url="https://h.example/x")
        conn.execute(
            text(
                _FIFTY_EVENTS_PER_BROKER
                + """
                INSERT INTO webhook_attempts (event_id, broker_id, attempted_at, url, status_code)
                SELECT id, broker_id, now() - make_interval(hours => (sequence * 4 + r)::int), 'https://h.example/x',
                       200
                FROM e, generate_series(1, 4) AS r
                """
            )
        )
    _analyse(engine)
    with engine.connect() as conn:
        # A backlog: some 3,500 attempts past the retention, more than a batch.
        params = {"after": after, "hours": 168, "batch": 1000}
        plan = "\n".join(row[0] for row in conn.execute(text(f"EXPLAIN {_DELETE_OLD_ATTEMPTS.text}"), params))

    assert "Index Scan using ix_webhook_attempts_attempted_at on webhook_attempts" in plan, plan
    assert "Index Cond: ((attempted_at >= " in plan, plan  # the batch starts where the last one ended
    assert "Index Scan using pk_webhook_attempts" in plan, plan
    assert "Seq Scan on webhook_attempts" not in plan, plan
    assert "Sort" not in plan, plan


def test_the_ops_pages_books_probe_each_shown_symbols_best_prices_and_read_no_other_order(engine: Engine) -> None:
    # The books summed every open order of every symbol, then kept 50 rows: a parallel sequential scan of all
    # orders, 412 ms at 1,000,000 orders over 450 symbols, on every refresh of every open /ops tab.
    from exchange.ops.data import _BOOKS, MAX_SYMBOLS

    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        _insert_orders(conn, ROWS)
        conn.execute(
            text(
                "UPDATE orders SET status = 'open', priority = seq, price = 100 + seq % 13,"
                " side = CASE WHEN seq % 2 = 0 THEN 'bid' ELSE 'ask' END"
            )
        )
        _insert_symbols(conn, 450, 0)
        conn.execute(text("UPDATE symbols SET last_trade_at = now() - make_interval(secs => substr(symbol, 2)::int)"))
    _analyse(engine)

    plan = _explained(engine, _BOOKS, {"limit": MAX_SYMBOLS})

    assert _looks_up(plan, "orders", "ix_orders_open_book"), plan
    assert _most_rows_read(plan, "orders") <= 1, plan  # per probe: the best resting order of its side


LEADING_COLUMNS = {
    "uq_orders_symbol_broker_id_id": "symbol",
    "uq_orders_symbol_id": "symbol",
    "uq_webhook_events_broker_id_id": "broker_id",
}
"""alembic 0021's unique indexes (for composite foreign keys; the id last) and the column each one leads with."""


def _hot_calls(
    keys: list[tuple[uuid.UUID, uuid.UUID]], events: list[tuple[uuid.UUID, uuid.UUID]], full: uuid.UUID
) -> list[tuple[str, dict[str, Any]]]:
    """Every hot PL/pgSQL function that reads orders or webhook_events, with parameters naming ``keys``' orders and
    ``events`` (an empty webhook batch without them)."""
    ids, broker_ids = (array_literal(o for _, o in keys), array_literal(b for b, _ in keys))
    claim = {"room_brokers": [], "room_left": [], "limit": 32, "per_broker": 64, "lease": 30}
    return [
        (store._WRITE, _write_params(keys)),
        (store._PENDING, {"symbols": array_literal(["S1", "S2", "S3"]), "limit": 50}),
        (accept._INSERT_CANCELS, {"ids": ids, "broker_ids": broker_ids}),
        (queries._ORDERS_WITH_TRADES, {"ids": [o for _, o in keys], "broker_ids": [b for b, _ in keys]}),
        (webhook_store._RECORD, _record_params(events) if events else {"batch": "[]", "limit": 20}),
        (webhook_store._CLAIM, {**claim, "full_brokers": []}),
        (webhook_store._CLAIM, {**claim, "full_brokers": [full]}),
    ]


def test_hot_functions_first_called_on_an_empty_analysed_database_read_no_0021_index_without_its_leading_column(
    engine: Engine,
) -> None:
    # A fresh database, analysed empty: each function's first call plans every statement it runs on tables with no
    # page, where reading a whole index costs what a probe does. Those plans are kept while the tables grow. A
    # lookup by id alone through a 0021 index (the id last) reads the whole index: 0022 (the claim's lock) and 0023
    # (order_views, write_cancels) removed the ones found; none may come back.
    _analyse(engine)
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url="http://127.0.0.1:9/hook")
        conn.execute(text("UPDATE brokers SET event_seq = 1000"))  # the matcher's events follow the ones below
        brokers = [row[0] for row in conn.execute(text("SELECT id FROM brokers ORDER BY id LIMIT :n"), {"n": BATCH})]
    unknown = [(broker, uuid.uuid4()) for broker in brokers]
    with _psycopg_connection(engine) as pg:
        for statement, params in _hot_calls(unknown, [], brokers[0]):
            pg.execute(statement, params)
            pg.rollback()
        with engine.begin() as other:
            keys = _insert_orders(other, ROWS)
            _insert_place_commands(other)
            events = _insert_pending_events(other, per_broker=50, first_sequence=1)
        plans = [
            plan
            for statement, params in _hot_calls(keys, events, brokers[0])
            for plan in _nested_plans(pg, statement, params, times=1, analyse=True)
        ]

    assert any("uq_webhook_events_broker_id_id" in plan for plan in plans), plans  # the claim's lock, by its key
    for plan in [p for p in plans if ORDERS_GATE not in p]:  # the gate reads one entry of any index: no lookup
        for index, leading in LEADING_COLUMNS.items():
            assert all(leading in cond for cond in _index_conditions(plan, index)), plan


def _accept_params(brokers: list[uuid.UUID], *, idempotency_key: str | None) -> dict[str, str]:
    """``accept._PLACE_MANY``'s parameters for one limit order per broker; the last one carries ``idempotency_key``."""
    orders = [
        NewOrder(
            order_id=uuid.uuid4(),
            broker_id=broker,
            document_number="1",
            symbol=f"S{n}",
            side="bid",
            order_type="limit",
            time_in_force="gtc",
            price=100,
            quantity=5,
            valid_until=None,
            stp="none",
            idempotency_key=idempotency_key if n == len(brokers) - 1 else None,
        )
        for n, broker in enumerate(brokers)
    ]
    return accept._columns(orders)


def test_accepting_a_group_without_keys_probes_no_unique_index_of_orders_for_a_conflict(engine: Engine) -> None:
    # alembic 0025: with no client order id or idempotency key in the group, no row can be a duplicate the caller
    # resolves, so the insert has no ON CONFLICT: before each row, ON CONFLICT DO NOTHING probed every unique index
    # of orders (pk_orders and 0021's two keys) and inserted the row speculatively.
    with engine.begin() as conn:
        _insert_brokers(conn, webhook_url=None)
        brokers = list(conn.execute(text("SELECT id FROM brokers ORDER BY id LIMIT :n"), {"n": BATCH}).scalars())
    plans = {}
    for key in (None, "k"):  # a connection each: the notices of one call only
        with _psycopg_connection(engine) as pg:
            params = _accept_params(brokers, idempotency_key=key)
            plans[key] = [p for p in _nested_plans(pg, accept._PLACE_MANY, params, times=1) if "Insert on orders" in p]

    [plain_insert] = plans[None]
    assert "Conflict" not in plain_insert, plain_insert
    [keyed_insert] = plans["k"]  # a duplicate key is still skipped, then read back
    assert "Conflict Resolution: NOTHING" in keyed_insert, keyed_insert

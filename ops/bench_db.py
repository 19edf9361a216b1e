"""The database audit's figures, reproducible: each query or operation it measured, timed on a dataset of the size it
named, with the plan PostgreSQL used for it and a check that the plan reads the index its migration added.

    uv run python -m ops.bench_db [--sizes small|full] [--repeat N] [--json PATH] [--database-url URL]
                                  [--revision REV] [--only DATASET ...]

Creates a scratch database ``exchange_bench_db_<pid>`` on the server of ``--database-url`` (default
EXCHANGE_TEST_POSTGRES_URL, else the local server), migrates it to ``--revision`` (default head), and for each
dataset empties the tables, builds it, runs ``VACUUM ANALYZE`` (what autovacuum would have done to a table that
size) and measures its scenarios; the database is dropped at the end. Orders a broker sent are written by the
accept path's own statement (``accept._PLACE_MANY``, the ``accept_orders`` function, on orders built by
``accept.new_order``); rows the matcher or the webhook workers would have changed since (orders opened or closed,
commands processed, events delivered, failed or retried) are written by bulk SQL in the states that code leaves
them. What is timed is the project's own statement or function (``accept.cancel_all``'s statements: its read and
every chunk, ``write_cancels``, ``accept._FIND_DUPLICATES``, ``sweeper._LOG_EXPIRIES``, ``webhooks.store.claim``,
``orders.queries.list_orders``, ``webhooks.queries.endpoint`` and ``failing_endpoints``); a statement that writes
runs in a transaction that is rolled back, so every repetition does the same work (except the hanging-receiver
claim, which commits as a worker's does). The ``kept_plans`` dataset is the exception to the ``VACUUM ANALYZE``:
``matcher_pending`` and the per-broker claim are first called on a fresh database (analysed empty, or its first
events analysed), then timed and explained on that same connection once the tables grew without an ANALYZE, with
the plans it kept (alembic 0024).

Each scenario's plan is the one ``auto_explain`` reports for the statements run (those inside PL/pgSQL functions
too, with the rows each node read), taken on a connection of its own before the timed runs; the check is that it
reads the named indexes with an index condition (and, where the audit found one, never the scan it replaced). The
tool exits 1 if any check fails: ``--revision 0017`` shows the plans the audit started from.

Times are milliseconds of wall clock per call, from the client (one round trip on a local server included), median
and max of the repetitions. Nothing about time is asserted: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row

from exchange.db import migrate
from exchange.db.arrays import array_literal
from exchange.db.engines import pooled_engine
from exchange.db.tables import OrderStatus
from exchange.engine.types import OrderType, StpMode
from exchange.matching import store as matching_store
from exchange.orders import accept
from exchange.orders import queries as order_queries
from exchange.orders.models import NewOrder
from exchange.sweeper import _LOG_EXPIRIES
from exchange.webhooks import queries as webhook_queries
from exchange.webhooks import store as webhook_store
from ops.bench.ceiling import create_scratch_database, drop_database

ADMIN_URL = os.environ.get("EXCHANGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CLAIM_INDEX = "ix_webhook_events_pending_broker_next_attempt_at"
RANGE = "(broker_id <= g.broker_id) AND (next_attempt_at <= statement_timestamp())"
"""The index condition of the per-broker reading (alembic 0022): one broker's pending events, up to the due time."""
CLAIM_LIMIT, CLAIM_PER_BROKER = 32, 16
"""A delivery worker's claim: ``exchange webhooks``' default batch and per-broker cap."""


@dataclass(frozen=True, slots=True)
class Sizes:
    brokers: int
    cancel_all: int
    """Resting orders of one broker in one symbol, all cancelled by one cancel-all."""
    replay_history: int
    """Orders of the broker whose retry's original is looked up."""
    backlog: int
    """Unprocessed place commands in the due symbols (a matcher behind) while the sweeper logs expiries."""
    due_symbols: int
    claim_backlog: int
    """Due events of the hanging receiver's broker, at this worker's per-broker cap."""
    claim_events: int
    """Due events of each other broker."""
    claim_rounds: int
    """Fresh ANALYZE samples: each round re-analyses ``webhook_events`` and plans the claim anew."""
    claims_per_round: int
    history: int
    """Orders (and events) of the one broker whose listing (and endpoint) is read."""
    live: int
    """Of those, orders not closed (the oldest)."""
    total: int
    """Orders (and events) of all brokers together."""
    repeat: int


SIZES = {
    "full": Sizes(
        brokers=200, cancel_all=20_000, replay_history=200_000, backlog=100_000, due_symbols=50,
        claim_backlog=100_000, claim_events=10, claim_rounds=10, claims_per_round=5, history=101_000, live=1_000,
        total=300_000, repeat=7,
    ),
    "small": Sizes(
        brokers=20, cancel_all=1_000, replay_history=3_000, backlog=2_000, due_symbols=5, claim_backlog=2_000,
        claim_events=10, claim_rounds=2, claims_per_round=2, history=2_000, live=100, total=4_000, repeat=2,
    ),
}  # fmt: skip
"""``full``: the audit's sizes (ops/MEASURED.md, "Audits of the engine and the database"). ``small``: the same
shapes, seconds in all (the test's)."""


@dataclass(slots=True)
class Scenario:
    name: str
    what: str
    then: str
    """What the audit measured, from ops/MEASURED.md."""
    indexes: list[str]
    times_ms: list[float] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    plans: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def plan_ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["runs"] = len(self.times_ms)
        out["median_ms"] = statistics.median(self.times_ms) if self.times_ms else None
        out["max_ms"] = max(self.times_ms) if self.times_ms else None
        out["plan_ok"] = self.plan_ok
        return out


# ------------------------------------------------------------------------------------------------ plans

_AUTO_EXPLAIN = [
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_nested_statements = on",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_timing = off",
    "SET auto_explain.log_buffers = on",
    "SET auto_explain.log_level = notice",
]


def _keep(plans: list[str], plan: str) -> None:
    """Keep ``plan`` unless it is a foreign key's check (one per row written: thousands of one-row lookups)."""
    if "Query Text: SELECT 1 FROM ONLY" not in plan:
        plans.append(plan)


@contextmanager
def explaining(conn: psycopg.Connection[Any]) -> Iterator[list[str]]:
    """The plans of every statement run on ``conn`` inside the block (nested ones too), as auto_explain reports
    them; explaining is off again after it."""
    plans: list[str] = []
    conn.add_notice_handler(lambda diag: _keep(plans, diag.message_primary or ""))
    for setting in _AUTO_EXPLAIN:
        conn.execute(setting)
    conn.commit()  # the settings outlive a rolled-back statement: every statement of the block is explained
    try:
        yield plans
    finally:
        conn.execute("SET auto_explain.log_min_duration = -1")


async def explaining_async(
    conn: psycopg.AsyncConnection[Any], run: Callable[[], Coroutine[Any, Any, object]]
) -> list[str]:
    """As :func:`explaining`, for the api's async connections: the plans of what ``run`` runs on ``conn``."""
    plans: list[str] = []
    conn.add_notice_handler(lambda diag: _keep(plans, diag.message_primary or ""))
    for setting in _AUTO_EXPLAIN:
        await conn.execute(setting)
    await run()
    await conn.execute("SET auto_explain.log_min_duration = -1")
    return plans


def index_scans(plan: str, index: str) -> list[str]:
    """The index conditions of every scan of ``index`` in ``plan`` ('' for a scan without one: a whole index)."""
    lines = plan.splitlines()
    found = []
    for n, line in enumerate(lines):
        if f"using {index} on" in line or f" on {index} " in line or line.rstrip().endswith(f" on {index}"):
            cond = next((c.strip() for c in lines[n + 1 : n + 4] if "Index Cond:" in c), "")
            found.append(cond)
    return found


def looks_up(plans: Sequence[str], index: str, condition: str | None = "") -> bool:
    """Some plan reads ``index`` with an index condition (one containing ``condition``); with ``condition``
    None, reads it at all (an index of a few entries, read whole)."""
    scans = [c for plan in plans for c in index_scans(plan, index)]
    if condition is None:
        return bool(scans)
    return any(c and condition in c for c in scans)


def most_rows_read(plans: Sequence[str], table: str) -> int:
    """The most rows any one loop of a scan of ``table`` read: those it produced and those its filter dropped."""
    most = 0
    for plan in plans:
        for node in re.split(r"\n\s*->", plan):
            header = node.split("\n", 1)[0]
            if f" on {table} " not in header:
                continue
            produced = re.search(r"actual rows=(\d+)", header)
            removed = re.search(r"Rows Removed by (?:Filter|Index Recheck): (\d+)", node)
            most = max(most, int(produced.group(1) if produced else 0) + int(removed.group(1) if removed else 0))
    return most


def check_indexes(scenario: Scenario, plans: list[str], conditions: dict[str, str | None] | None = None) -> None:
    """Record whether ``plans`` read each of the scenario's indexes (see :func:`looks_up`)."""
    scenario.plans = plans
    for index in scenario.indexes:
        scenario.checks[f"reads {index}"] = looks_up(plans, index, (conditions or {}).get(index, ""))


# ------------------------------------------------------------------------------------------------ datasets


def reset(conn: psycopg.Connection[Any]) -> None:
    conn.execute("TRUNCATE brokers, orders, commands, webhook_events, webhook_attempts, trades, symbols CASCADE")


def vacuum_analyse(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")


def add_brokers(conn: psycopg.Connection[Any], n: int, *, prefix: str = "b") -> list[uuid.UUID]:
    """``n`` brokers with a webhook URL, in name order."""
    rows = conn.execute(
        """
        INSERT INTO brokers (name, api_key_hash, webhook_url, webhook_secret)
        SELECT %(p)s || lpad(g::text, 6, '0'), encode(sha256((%(p)s || g)::bytea), 'hex'),
               'http://127.0.0.1:9/hook', 'whsec_x'
        FROM generate_series(1, %(n)s) AS g
        RETURNING id, name
        """,
        {"n": n, "p": prefix},
    ).fetchall()
    return [row[0] for row in sorted(rows, key=lambda row: row[1])]


def place(conn: psycopg.Connection[Any], orders: Sequence[NewOrder], *, chunk: int = 5000) -> None:
    """The accept path's write of ``orders`` (each order pending, with its unprocessed place command)."""
    for start in range(0, len(orders), chunk):
        rows = conn.execute(accept._PLACE_MANY, accept._columns(orders[start : start + chunk])).fetchall()
        assert len(rows) == len(orders[start : start + chunk]), "an order was a duplicate"
    conn.commit()


def limit_order(
    broker: uuid.UUID,
    symbol: str,
    price: int,
    *,
    side: str = "ask",
    client_order_id: str | None = None,
    idempotency_key: str | None = None,
    valid_until: datetime | None = None,
    now: datetime | None = None,
) -> NewOrder:
    return accept.new_order(
        order_id=uuid.uuid4(), broker_id=broker, document_number="12345678901", symbol=symbol, side=side,
        order_type=OrderType.LIMIT, price=price, quantity=10, valid_until=valid_until, time_in_force=None,
        stp=StpMode.NONE, client_order_id=client_order_id, idempotency_key=idempotency_key,
        now=now or datetime.now(UTC),
    )  # fmt: skip


def open_all(conn: psycopg.Connection[Any]) -> None:
    """The matcher's work on every pending order: its place command processed, the order resting (open)."""
    conn.execute("UPDATE orders SET status = 'open', updated_at = now() WHERE status = 'pending'")
    conn.execute("UPDATE commands SET processed_at = now() WHERE kind = 'place' AND processed_at IS NULL")
    conn.commit()


def history(
    conn: psycopg.Connection[Any], broker: uuid.UUID, n: int, live: int, *, keys: bool = False, symbols: int = 50
) -> None:
    """``n`` orders of ``broker``, one a second up to now, as the exchange leaves them: the ``live`` oldest not
    closed (alternately open and pending, a pending one with its place command unprocessed), the rest closed
    (filled, or cancelled with something left), every one with its place command. With ``keys``, each has a
    ``client_order_id`` and an ``Idempotency-Key``."""
    conn.execute(
        """
        WITH o AS (
            INSERT INTO orders (broker_id, client_order_id, idempotency_key, document_number, symbol, side,
                                order_type, time_in_force, price, quantity, remaining, placed_price, placed_quantity,
                                status, close_reason, seq, priority, created_at, updated_at)
            SELECT %(b)s, CASE WHEN %(keys)s THEN 'c' || g END, CASE WHEN %(keys)s THEN 'k' || g END, '12345678901',
                   'S' || (g %% %(symbols)s), CASE WHEN g %% 2 = 0 THEN 'bid' ELSE 'ask' END, 'limit', 'gtc',
                   100 + g %% 7, 10,
                   CASE WHEN g <= %(live)s OR g %% 3 = 0 THEN 10 ELSE 0 END, 100 + g %% 7, 10,
                   CASE WHEN g > %(live)s THEN 'closed' WHEN g %% 2 = 0 THEN 'open' ELSE 'pending' END,
                   CASE WHEN g <= %(live)s THEN NULL WHEN g %% 3 = 0 THEN 'cancelled' ELSE 'filled' END,
                   nextval('command_seq'), currval('command_seq'),
                   now() - make_interval(secs => %(n)s - g), now() - make_interval(secs => %(n)s - g)
            FROM generate_series(1, %(n)s) AS g
            RETURNING id, symbol, seq, created_at, status
        )
        INSERT INTO commands (seq, symbol, kind, order_id, created_at, processed_at)
        SELECT seq, symbol, 'place', id, created_at, CASE WHEN status <> 'pending' THEN created_at END FROM o
        """,
        {"b": broker, "n": n, "live": live, "keys": keys, "symbols": symbols},
    )
    conn.commit()


def events(
    conn: psycopg.Connection[Any], broker: uuid.UUID, n: int, *, pending: int, failed: int, due: bool = False
) -> None:
    """``n`` outbox events of ``broker``, one a second up to now, as the workers leave them: the newest
    ``pending`` pending (the older half of them being retried after a failed attempt; with ``due``, all due now,
    else all claimed by a worker, due in 30 s), the ``failed`` before them failed after their retries, the rest
    delivered."""
    conn.execute(
        """
        INSERT INTO webhook_events (broker_id, sequence, type, payload, status, attempts, next_attempt_at,
                                    last_error, created_at, delivered_at)
        SELECT %(b)s, g, 'order.fill', '{}',
               CASE WHEN g > %(n)s - %(pending)s THEN 'pending' WHEN g > %(n)s - %(pending)s - %(failed)s
                    THEN 'failed' ELSE 'delivered' END,
               CASE WHEN g > %(n)s - %(pending)s / 2 THEN 0 WHEN g > %(n)s - %(pending)s - %(failed)s THEN 3
                    ELSE 1 END,
               CASE WHEN %(due)s THEN now() - interval '1 minute' - make_interval(secs => (%(n)s - g) / 1000.0)
                    ELSE now() + interval '30 seconds' END,
               CASE WHEN g > %(n)s - %(pending)s / 2 OR g <= %(n)s - %(pending)s - %(failed)s THEN NULL
                    ELSE 'HTTP 500' END,
               now() - make_interval(secs => %(n)s - g),
               CASE WHEN g <= %(n)s - %(pending)s - %(failed)s THEN now() - make_interval(secs => %(n)s - g) END
        FROM generate_series(1, %(n)s) AS g
        """,
        {"b": broker, "n": n, "pending": pending, "failed": failed, "due": due},
    )
    conn.execute("UPDATE brokers SET event_seq = %(n)s WHERE id = %(b)s", {"b": broker, "n": n})
    conn.commit()


# ------------------------------------------------------------------------------------------------ timing


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) * 1000


def rolled_back(conn: psycopg.Connection[Any], statement: str, params: dict[str, Any]) -> Callable[[], object]:
    """``statement`` in a transaction that is rolled back after its rows are read."""

    def run() -> object:
        rows = conn.execute(statement, params).fetchall()
        conn.rollback()
        return rows

    return run


def measure_rolled_back(url: str, scenario: Scenario, statement: str, params: dict[str, Any], repeat: int) -> list[str]:
    """Plan (on a connection of its own), then ``repeat`` timed runs of ``statement`` rolled back each time."""
    with psycopg.connect(url) as conn, explaining(conn) as plans:
        rolled_back(conn, statement, params)()
    with psycopg.connect(url) as conn:
        rolled_back(conn, statement, params)()  # the server connection's plans made, as a worker's are
        scenario.times_ms = [timed(rolled_back(conn, statement, params)) for _ in range(repeat)]
    return plans


def id_in_bucket_of(conn: psycopg.Connection[Any], order_id: uuid.UUID) -> uuid.UUID:
    """A new order id in ``order_id``'s cancel bucket (``write_cancels``' lock key: alembic 0014), of 10,000 random
    candidates (each in it with chance 1/256)."""
    row = conn.execute(
        "SELECT i FROM unnest(CAST(%(candidates)s AS uuid[])) AS i"
        " WHERE cancel_bucket(i) = cancel_bucket(%(id)s) LIMIT 1",
        {"candidates": array_literal(uuid.uuid4() for _ in range(10_000)), "id": order_id},
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


# ------------------------------------------------------------------------------------------------ scenarios


def cancels(url: str, sizes: Sizes) -> list[Scenario]:
    """A cancel-all of ``cancel_all`` resting orders; the same orders cancelled by ``write_cancels`` as one group;
    another broker's cancel of one order sent while the cancel-all holds the cancels' locks. Among ``total`` orders
    of the other brokers and ``backlog`` commands the matcher has not processed (the audit's database)."""
    with psycopg.connect(url) as conn:
        reset(conn)
        mm, other, *rest = add_brokers(conn, max(3, sizes.brokers))
        orders = [limit_order(mm, "MM", 1000 + n) for n in range(sizes.cancel_all)]
        # In the first order's cancel bucket: a random id missed every bucket of a small cancel-all's (1,000
        # orders: 2 % of runs), and the scenario then measured nothing.
        lone = replace(limit_order(other, "OT", 1000), order_id=id_in_bucket_of(conn, orders[0].order_id))
        place(conn, [*orders, lone])
        open_all(conn)
        for broker in rest:  # every broker's history
            history(conn, broker, sizes.total // len(rest), live=40)
        backlog = [limit_order(rest[n % len(rest)], f"S{n % 50}", 90, side="bid") for n in range(sizes.backlog)]
        place(conn, backlog)  # the matcher behind, as in the audit
    vacuum_analyse(url)
    repeat = sizes.repeat

    cancel_all = Scenario(
        "cancel_all",
        f"the api's chunked cancel-all (accept.cancel_all's statements: _LIVE_BY_BUCKET, then _CANCEL_CHUNK per "
        f"{accept.CANCEL_ALL_CHUNK:,} orders) of {sizes.cancel_all:,} resting orders",
        "write_cancels 41.2 s at 0017, 1.25 s at 0018; through the one-statement _CANCEL_ALL 1.02 s (20,000 orders)",
        ["pk_orders", "ix_commands_pending_cancel"],
    )
    params = {"broker_id": mm, "symbol": "MM"}
    with psycopg.connect(url) as conn, explaining(conn) as plans:
        chunked_cancel_all(conn, params, chunks=1)  # the plans of the read and of one chunk
    check_indexes(cancel_all, plans)
    # The read: by an index condition on the symbol and the broker (the partial index of the orders not closed, or
    # (symbol, broker_id, id), whichever the statistics favour here, where the broker has no closed orders in the
    # symbol), and no more rows than the orders it cancels.
    read_plans = [plan for plan in plans if "_LIVE_BY_BUCKET" in plan or "close_reason IS NULL" in plan]
    cancel_all.checks["the read takes the broker's orders in the symbol by an index, no others"] = (
        any(
            looks_up(read_plans, index)
            for index in ("ix_orders_open_book", "ix_orders_broker_live_created", "uq_orders_symbol_broker_id_id")
        )
        and most_rows_read(read_plans, "orders") <= sizes.cancel_all
    )
    nested = max((rows for plan in plans for rows, _ in _rows_by_node(plan)), default=0)
    cancel_all.extra["largest_node_rows"] = nested
    cancel_all.checks["no node reads more than 2 rows per order"] = nested <= 2 * sizes.cancel_all
    with psycopg.connect(url) as conn:
        chunked_cancel_all(conn, params)  # the server connection's plans made, as the api's are
        steps = [chunked_cancel_all(conn, params) for _ in range(repeat)]
    cancel_all.times_ms = [sum(step) for step in steps]
    cancel_all.extra["chunks"] = len(steps[0]) - 1
    cancel_all.extra["read_ms"] = [step[0] for step in steps]
    cancel_all.extra["chunk_ms_median"] = [statistics.median(step[1:]) for step in steps if len(step) > 1]

    group = Scenario(
        "write_cancels", f"write_cancels of the same {sizes.cancel_all:,} orders as one group (accept._INSERT_CANCELS)",
        "41.2 s at 0017, 1.25 s at 0018 (20,000 orders; 10,000: 10.3 s, 0.75 s)",
        ["pk_orders", "ix_commands_pending_cancel"],
    )  # fmt: skip
    keys = {"ids": array_literal(o.order_id for o in orders), "broker_ids": array_literal(mm for _ in orders)}
    check_indexes(group, measure_rolled_back(url, group, accept._INSERT_CANCELS, keys, repeat))

    behind = Scenario(
        "cancel_behind_cancel_all",
        "another broker's cancel of one order, sent as soon as the chunk of a chunked cancel-all that shares its "
        "cancel bucket holds that bucket's lock",
        "sent 1 s into a 20,000-order cancel-all: waited 59.7 s at 0017, 0.52 s at 0018 (one statement)",
        ["pk_orders", "ix_commands_pending_cancel"],
    )
    one = {"ids": array_literal([lone.order_id]), "broker_ids": array_literal([other])}
    with psycopg.connect(url) as conn, explaining(conn) as plans:
        rolled_back(conn, accept._INSERT_CANCELS, one)()
    check_indexes(behind, plans)
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT cancel_bucket(%(lone)s), bool_or(cancel_bucket(i) = cancel_bucket(%(lone)s))"
            " FROM unnest(CAST(%(ids)s AS uuid[])) AS i",
            {"ids": keys["ids"], "lone": lone.order_id},
        ).fetchone()
    assert found is not None
    bucket, shared = found
    behind.extra["lone_bucket"], behind.extra["shares_a_bucket"] = bucket, shared
    behind.checks["the lone order's lock is one the cancel-all takes"] = bool(shared)
    cancel_all_ms: list[float] = []
    held: list[bool] = []
    for _ in range(repeat):
        wait_ms, whole_ms, was_held = _cancel_behind(url, params, one, int(bucket))
        behind.times_ms.append(wait_ms)
        cancel_all_ms.append(whole_ms)
        held.append(was_held)
    behind.extra["cancel_all_ms"] = cancel_all_ms
    behind.extra["sent_while_held"] = held
    return [cancel_all, group, behind]


def chunked_cancel_all(
    conn: psycopg.Connection[Any],
    params: dict[str, Any],
    *,
    chunks: int | None = None,
    after_read: Callable[[], None] | None = None,
) -> list[float]:
    """``accept.cancel_all``'s statements, in its order: ``_LIVE_BY_BUCKET`` once, then ``_CANCEL_CHUNK`` for each
    chunk ``chunk_texts`` cuts (at most ``CANCEL_ALL_CHUNK`` orders), each statement its own transaction, as in
    the api's autocommit; each rolled back (not committed), so the next run does the same work. With ``chunks``,
    only that many chunks. Returns each statement's milliseconds: the read's, then every chunk's."""
    started = time.perf_counter()
    live = conn.execute(accept._LIVE_BY_BUCKET, params).fetchall()
    conn.rollback()
    steps = [(time.perf_counter() - started) * 1000]
    if after_read is not None:
        after_read()
    for ids, n in accept.chunk_texts([row[1] for row in live], accept.CANCEL_ALL_CHUNK)[:chunks]:
        steps.append(
            timed(rolled_back(conn, accept._CANCEL_CHUNK, {"broker_id": params["broker_id"], "ids": ids, "n": n}))
        )
    return steps


def _cancel_behind(url: str, cancel_all: dict[str, Any], one: dict[str, Any], bucket: int) -> tuple[float, float, bool]:
    """A chunked cancel-all on one connection and, as soon as one of its chunks holds the lock of ``bucket`` (the
    lone order's), the lone cancel on another; returns the lone cancel's time, the cancel-all's (both rolled back)
    and whether the lock was seen held when the lone cancel was sent (a chunk may end between the two)."""
    with psycopg.connect(url) as big, psycopg.connect(url) as small:
        pid = big.info.backend_pid
        whole: list[float] = []
        worker = threading.Thread(target=lambda: whole.append(sum(chunked_cancel_all(big, cancel_all))))
        held = False
        with psycopg.connect(url, autocommit=True) as watch:
            worker.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and worker.is_alive():
                row = watch.execute(
                    "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND classid = 3084"
                    " AND objid = %s AND objsubid = 2 AND granted",
                    (pid, bucket),
                ).fetchone()
                if row is not None and row[0] > 0:
                    held = True
                    break
        wait = timed(rolled_back(small, accept._INSERT_CANCELS, one))
        worker.join()
    return wait, whole[0], held


def _rows_by_node(plan: str) -> list[tuple[int, str]]:
    """Every node of an analysed plan with the rows it produced over all its loops."""
    nodes = []
    for line in plan.splitlines():
        found = re.search(r"actual (?:time=\S+ )?rows=(\d+) loops=(\d+)", line)
        if found:
            nodes.append((int(found[1]) * int(found[2]), line.strip()))
    return nodes


def replay(url: str, sizes: Sizes) -> list[Scenario]:
    """The original of a retried order (accept._FIND_DUPLICATES), for a broker with a long history of orders that
    each have a client_order_id and an Idempotency-Key."""
    with psycopg.connect(url) as conn:
        reset(conn)
        broker, *_ = add_brokers(conn, sizes.brokers)
        history(conn, broker, sizes.replay_history, live=0, keys=True)
    vacuum_analyse(url)
    scenario = Scenario(
        "replay_original", f"a retry's original among {sizes.replay_history:,} orders of its broker",
        "146.6 ms, 12,668 buffers at 0017; 0.38 ms, 7 buffers at 0018 (200,000 orders)",
        ["uq_orders_broker_id_client_order_id", "uq_orders_broker_id_idempotency_key"],
    )  # fmt: skip
    middle = sizes.replay_history // 2
    params = {"broker_ids": [broker], "client_order_ids": [f"c{middle}"], "idempotency_keys": [f"k{middle}"]}
    plans = measure_rolled_back(url, scenario, accept._FIND_DUPLICATES, params, sizes.repeat)
    check_indexes(scenario, plans, dict.fromkeys(scenario.indexes, "broker_id"))
    scenario.checks["not through the broker's history (ix_orders_broker_created)"] = not any(
        "ix_orders_broker_created" in plan for plan in plans
    )
    return [scenario]


def sweeper(url: str, sizes: Sizes) -> list[Scenario]:
    """The sweeper's expiry logging (sweeper._LOG_EXPIRIES) with GTD orders due in ``due_symbols`` symbols whose
    ``backlog`` place commands the matcher has not processed yet."""
    with psycopg.connect(url) as conn:
        reset(conn)
        brokers = add_brokers(conn, sizes.brokers)
        then = datetime.now(UTC) - timedelta(hours=1)
        due = [
            limit_order(brokers[s % len(brokers)], f"S{s}", 100, valid_until=then + timedelta(minutes=1), now=then)
            for s in range(sizes.due_symbols)
            for _ in range(2)
        ]
        place(conn, due)
        open_all(conn)  # resting, expired, not swept yet
        backlog = [
            limit_order(brokers[n % len(brokers)], f"S{n % sizes.due_symbols}", 90 + n % 10, side="bid")
            for n in range(sizes.backlog)
        ]
        place(conn, backlog)  # pending: the matcher is behind
    vacuum_analyse(url)
    scenario = Scenario(
        "sweeper_expiries",
        f"the sweeper's expiry logging, {sizes.due_symbols} due symbols, {sizes.backlog:,} pending commands",
        "852 ms, 52,363 buffers at 0017; 1.6 ms at 0018 (50 symbols, 100,000 commands)",
        ["ix_commands_pending_expire", "ix_orders_open_valid_until"],
    )
    plans = measure_rolled_back(url, scenario, _LOG_EXPIRIES.text, {}, sizes.repeat)
    check_indexes(scenario, plans, {"ix_commands_pending_expire": None})  # one entry per symbol: read whole
    scenario.checks["not through the unprocessed commands' indexes"] = not any(
        "ix_commands_unprocessed" in plan or "Seq Scan on commands" in plan for plan in plans
    )
    return [scenario]


def claim(url: str, sizes: Sizes) -> list[Scenario]:
    """The delivery worker's claim (webhooks.store.claim) while one broker's receiver hangs: its
    ``claim_backlog`` events are the oldest due and the worker is at its cap for it; every other broker has
    ``claim_events`` due after its history of delivered events (``total`` events in all). Each round re-analyses
    ``webhook_events`` (a new sample) and starts new server connections, whose first claim plans anew.

    The plan is checked to read each eligible broker's due events as a range of
    ``ix_webhook_events_pending_broker_next_attempt_at`` bounded by the broker and the due time (alembic 0022),
    reading no more than a few claims' worth of rows per loop: read through ``uq_webhook_events_broker_id_sequence``
    instead (whose leading ``broker_id`` serves the broker's range too; 0019's row comparisons were read so), a
    claim reads the whole history of every broker it takes events from; through the due-time index, every due event
    of the brokers before it."""
    with psycopg.connect(url) as conn:
        reset(conn)
        hanging, *others = add_brokers(conn, sizes.brokers)
        conn.execute(
            """
            INSERT INTO webhook_events (broker_id, sequence, type, payload, next_attempt_at, attempts, last_error)
            SELECT %(b)s, g, 'order.fill', '{}', now() - interval '1 hour' + make_interval(secs => g / 1000.0), 1,
                   'timed out'
            FROM generate_series(1, %(n)s) AS g
            """,
            {"b": hanging, "n": sizes.claim_backlog},
        )
        each = (sizes.total - sizes.claim_backlog) // max(1, len(others))
        for other in others:
            events(conn, other, max(each, sizes.claim_events), pending=sizes.claim_events, failed=0, due=True)
        conn.commit()
    vacuum_analyse(url)
    scenario = Scenario(
        "webhook_claim_hanging_receiver",
        f"a claim of {CLAIM_LIMIT} while one broker at its cap has {sizes.claim_backlog:,} due events",
        "28-31 ms at 0018, 2.0-2.5 ms at c2db730; final review: 600-840 ms in 2 of 7 plans, then ~3 ms in 10 of 10",
        [CLAIM_INDEX],
    )
    busy = {hanging: CLAIM_PER_BROKER}
    params = {"room_brokers": [], "room_left": [], "full_brokers": [hanging], "limit": CLAIM_LIMIT,
              "per_broker": CLAIM_PER_BROKER, "lease": 30}  # fmt: skip
    ranged, bounded, claimed_hanging = 0, 0, 0
    most = 0
    for _ in range(sizes.claim_rounds):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE webhook_events")
        with psycopg.connect(url) as conn, explaining(conn) as plans:
            rolled_back(conn, webhook_store._CLAIM, params)()
        plans = [p for p in plans if "webhook_events" in p]
        scenario.plans = plans
        ranged += looks_up(plans, CLAIM_INDEX, RANGE)
        read = most_rows_read(plans, "webhook_events")
        most = max(most, read)
        bounded += read <= 4 * CLAIM_LIMIT
        engine = pooled_engine(url, pool_size=1, max_overflow=0)
        try:
            for _ in range(sizes.claims_per_round):
                started = time.perf_counter()
                got = webhook_store.claim(engine, limit=CLAIM_LIMIT, lease_s=30, per_broker=CLAIM_PER_BROKER, busy=busy)
                scenario.times_ms.append((time.perf_counter() - started) * 1000)
                claimed_hanging += sum(c.broker_id == hanging for c in got.claims)
                scenario.extra.setdefault("claimed", []).append(len(got.claims))
        finally:
            engine.dispose()
    rounds = sizes.claim_rounds
    scenario.extra.update(rounds=rounds, most_rows_read=most, ranged_rounds=ranged, bounded_rounds=bounded)
    scenario.checks[f"reads {CLAIM_INDEX} as each broker's range, every round"] = ranged == rounds
    scenario.checks[f"no scan reads more than {4 * CLAIM_LIMIT} rows a loop, every round"] = bounded == rounds
    scenario.checks["claims none of the full broker's events"] = claimed_hanging == 0
    return [scenario, _claim_long_history(url, sizes, params)]


def overdue(url: str, sizes: Sizes) -> list[Scenario]:
    """The sweeper's reading of overdue webhook events (webhooks.store.overdue) while one broker's ``claim_backlog``
    events are all overdue (every worker dead or behind), among ``total`` events of every broker: once when a hint
    is due (no hint for a period: it lists the 1,000 oldest), in a sweep just after a hint (nothing came due since:
    no hint) and with none overdue (an idle exchange): both read one index entry. It writes nothing: the due times
    stay."""
    with psycopg.connect(url) as conn:
        reset(conn)
        behind, *others = add_brokers(conn, sizes.brokers)
        conn.execute(
            """
            INSERT INTO webhook_events (broker_id, sequence, type, payload, next_attempt_at)
            SELECT %(b)s, g, 'order.fill', '{}', now() - interval '1 hour' + make_interval(secs => g / 1000.0)
            FROM generate_series(1, %(n)s) AS g
            """,
            {"b": behind, "n": sizes.claim_backlog},
        )
        each = (sizes.total - sizes.claim_backlog) // max(1, len(others))
        for other in others:
            events(conn, other, max(each, sizes.claim_events), pending=sizes.claim_events, failed=0)
        conn.commit()
    vacuum_analyse(url)
    index = "ix_webhook_events_pending_next_attempt_at"
    scenarios = []
    cases = [
        ("hint", "a hint due", 10.0, None, 1_000),
        ("no_hint", "just hinted", 10.0, datetime.now(UTC), 1),
        ("none_overdue", "none overdue (requeue period 2 h), no hint remembered", 7_200.0, None, 1),
    ]
    for name, case, older, hinted_at, most in cases:
        scenario = Scenario(
            f"sweeper_overdue_{name}",
            f"the sweeper's overdue reading, {case}, {sizes.claim_backlog:,} events pending",
            "its requeue at 62085d9 updated 1,000 events a sweep: 49-68 ms on 200,000 pending", [index],
        )  # fmt: skip
        params = {"older": older, "hinted_at": hinted_at, "limit": 1_000}
        plans = measure_rolled_back(url, scenario, webhook_store._OVERDUE, params, sizes.repeat)
        check_indexes(scenario, plans, {index: "next_attempt_at <="})
        read = most_rows_read(plans, "webhook_events")
        scenario.extra["most_rows_read"] = read
        scenario.checks[f"no scan reads more than {most:,} rows a loop"] = read <= most
        scenarios.append(scenario)
    return scenarios


def _claim_long_history(url: str, sizes: Sizes, params: dict[str, Any]) -> Scenario:
    """The same claim (rolled back, the same work each time) once a broker with ``history`` delivered events has
    two events due, the oldest of all but the full broker's: the claim must read its due events, not its history."""
    scenario = Scenario(
        "webhook_claim_long_history",
        f"a claim of {CLAIM_LIMIT} (rolled back) taking 2 due events of a broker with {sizes.history:,} delivered",
        "not measured by the audit", [CLAIM_INDEX],
    )  # fmt: skip
    with psycopg.connect(url) as conn:
        [broker] = add_brokers(conn, 1, prefix="long")
        events(conn, broker, sizes.history + 2, pending=2, failed=0, due=True)
        conn.execute(
            "UPDATE webhook_events SET next_attempt_at = now() - interval '10 minutes'"
            " WHERE broker_id = %s AND status = 'pending'",
            (broker,),
        )
        conn.commit()
    vacuum_analyse(url)
    plans = [p for p in measure_rolled_back(url, scenario, webhook_store._CLAIM, params, sizes.repeat)
             if "webhook_events" in p]  # fmt: skip
    check_indexes(scenario, plans, {CLAIM_INDEX: RANGE})
    read = most_rows_read(plans, "webhook_events")
    scenario.extra["most_rows_read"] = read
    scenario.checks[f"no scan reads more than {4 * CLAIM_LIMIT} rows a loop"] = read <= 4 * CLAIM_LIMIT
    return scenario


KEPT_PLAN_BROKERS = 200
"""Brokers with one pending event each when the kept claim plan is made: the outbox on which (analysed) 0023's lock
was planned through ``uq_webhook_events_broker_id_sequence`` (100 brokers were planned through a unique key)."""


def kept_plans(url: str, sizes: Sizes) -> list[Scenario]:
    """Plans a server connection made on a fresh database (analysed empty) or on its first rows, then kept while
    the tables grew without an ANALYZE (until the next one: about a minute under autovacuum), as a worker's
    connection behind pgbouncer keeps them. Timed and explained on that same connection (alembic 0024)."""
    return [_pending_kept_from_empty(url, sizes), _claim_kept_from_first_events(url, sizes)]


def _pending_kept_from_empty(url: str, sizes: Sizes) -> Scenario:
    """``matcher_pending`` (the matcher's read) first called before any command, then ``total`` orders, every other
    one pending with its place command unprocessed, over 450 symbols; the call reads 3 symbols' 50 oldest."""
    with psycopg.connect(url) as conn:
        reset(conn)
        conn.commit()
    vacuum_analyse(url)
    scenario = Scenario(
        "kept_pending_from_empty",
        f"matcher_pending of 3 symbols x 50, first called before any command, then {sizes.total:,} orders",
        "0023: 7.85-8.9 s at 200,000 orders, 14.4-26.9 s here at 300,000 (pk_orders read whole per command)",
        ["pk_orders"],
    )  # fmt: skip
    params = {"symbols": array_literal(["S1", "S2", "S3"]), "limit": 50}
    with psycopg.connect(url) as kept:
        rolled_back(kept, matching_store._PENDING, params)()  # no command yet: what it plans now, it keeps
        with psycopg.connect(url) as conn:
            [broker] = add_brokers(conn, 1, prefix="mp")
            history(conn, broker, sizes.total, sizes.total, symbols=450)
        with explaining(kept) as plans:
            rolled_back(kept, matching_store._PENDING, params)()
        scenario.times_ms = [timed(rolled_back(kept, matching_store._PENDING, params)) for _ in range(sizes.repeat)]
    plans = [p for p in plans if "ORDER BY c.seq" in p]
    check_indexes(scenario, plans, {"pk_orders": "(id = c.order_id)"})
    read = most_rows_read(plans, "orders")
    scenario.extra["most_rows_read"] = read
    scenario.checks["reads each command's order alone"] = read <= 1
    return scenario


def _claim_kept_from_first_events(url: str, sizes: Sizes) -> Scenario:
    """The per-broker claim first called on one pending event of each of ``KEPT_PLAN_BROKERS`` brokers (analysed),
    then those delivered and each broker given a history of delivered events with 2 due at its end (``total``
    events in all, at least ``8 * CLAIM_LIMIT`` a broker): each lock must find its event by a unique key, not read
    the broker's history up to it."""
    with psycopg.connect(url) as conn:
        reset(conn)
        brokers = add_brokers(conn, KEPT_PLAN_BROKERS)
        conn.execute(
            "INSERT INTO webhook_events (broker_id, sequence, type, payload, next_attempt_at)"
            " SELECT id, 1000000000, 'order.fill', '{}', now() - interval '1 hour' FROM brokers"
        )
        conn.commit()
    vacuum_analyse(url)
    each = max(sizes.total // KEPT_PLAN_BROKERS, 8 * CLAIM_LIMIT)
    scenario = Scenario(
        "kept_claim_from_first_events",
        f"a claim of {CLAIM_LIMIT} (rolled back), first called on 1 event of each of {KEPT_PLAN_BROKERS} brokers, "
        f"then {each:,} events each",
        "0023: 7.3-17.5 ms here (each lock read its broker's history, 1,499 rows); 25-34 ms at 1,000 events each",
        [CLAIM_INDEX],
    )  # fmt: skip
    params = {"room_brokers": [], "room_left": [], "full_brokers": brokers[:1], "limit": CLAIM_LIMIT,
              "per_broker": CLAIM_PER_BROKER, "lease": 30}  # fmt: skip
    with psycopg.connect(url) as kept:
        rolled_back(kept, webhook_store._CLAIM, params)()  # the per-broker path's plan, made now and kept
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE webhook_events SET status = 'delivered', delivered_at = now()")
            for broker in brokers:
                events(conn, broker, each, pending=2, failed=0, due=True)
        with explaining(kept) as plans:
            rolled_back(kept, webhook_store._CLAIM, params)()
        scenario.times_ms = [timed(rolled_back(kept, webhook_store._CLAIM, params)) for _ in range(sizes.repeat)]
    plans = [p for p in plans if "webhook_events" in p]
    check_indexes(scenario, plans, {CLAIM_INDEX: RANGE})
    read = most_rows_read(plans, "webhook_events")
    scenario.extra["most_rows_read"] = read
    scenario.checks[f"no scan reads more than {4 * CLAIM_LIMIT} rows a loop"] = read <= 4 * CLAIM_LIMIT
    return scenario


def listing(url: str, sizes: Sizes) -> list[Scenario]:
    """``GET /orders?status=open|pending`` (orders.queries.list_orders, a page of 50) of a broker with ``history``
    orders, ``live`` of them not closed, among ``total`` orders of all brokers."""
    with psycopg.connect(url) as conn:
        reset(conn)
        broker, *others = add_brokers(conn, sizes.brokers)
        history(conn, broker, sizes.history, sizes.live)
        each = (sizes.total - sizes.history) // max(1, len(others))
        for other in others:
            history(conn, other, each, min(40, each))
    vacuum_analyse(url)
    out = []
    for status in (OrderStatus.OPEN, OrderStatus.PENDING):
        scenario = Scenario(
            f"list_orders_{status.value}",
            f"GET /orders?status={status.value} of a broker with {sizes.history:,} orders ({sizes.live:,} not closed)",
            "146 ms at 0018; 0.2-6 ms at 0019 (101,000 orders of 300,000)", ["ix_orders_broker_live_created"],
        )  # fmt: skip

        async def page(conn: psycopg.AsyncConnection[Any], status: OrderStatus = status) -> object:
            return await order_queries.list_orders(conn, broker, status=status, limit=50)

        _measure_async(url, scenario, page, sizes.repeat)
        read = most_rows_read(scenario.plans, "orders")
        scenario.extra["most_rows_read"] = read
        scenario.checks["reads none of the broker's closed history"] = read <= sizes.live
        out.append(scenario)
    return out


def endpoints(url: str, sizes: Sizes) -> list[Scenario]:
    """``GET /webhooks/endpoint`` (webhooks.queries.endpoint) of a broker with ``history`` events, and the admin's
    ``/admin/webhooks/failing`` (failing_endpoints), among ``total`` events of all brokers; every tenth broker has
    failed events, every tenth but one is being retried."""
    with psycopg.connect(url) as conn:
        reset(conn)
        broker, *others = add_brokers(conn, sizes.brokers)
        events(conn, broker, sizes.history, pending=30, failed=5)
        each = (sizes.total - sizes.history) // max(1, len(others))
        for n, other in enumerate(others, 1):
            events(conn, other, each, pending=6 if n % 10 == 1 else 0, failed=3 if n % 10 == 0 else 0)
        conn.execute(
            "UPDATE brokers SET webhook_consecutive_failures = 3"
            " WHERE id IN (SELECT broker_id FROM webhook_events WHERE status = 'failed')"
        )
        conn.commit()
    vacuum_analyse(url)
    endpoint = Scenario(
        "webhooks_endpoint", f"GET /webhooks/endpoint's counts of a broker with {sizes.history:,} events",
        "81 ms at 0018; 0.16 ms at 0019 (101,000 events of 300,000)", [CLAIM_INDEX, "ix_webhook_events_failed_broker"],
    )  # fmt: skip

    async def view(conn: psycopg.AsyncConnection[Any]) -> object:
        return await webhook_queries.endpoint(conn, broker)

    _measure_async(url, endpoint, view, sizes.repeat)
    failing = Scenario(
        "admin_webhooks_failing", f"/admin/webhooks/failing among {sizes.total:,} events",
        "1.6 s at 0018 (a parallel seq scan); 0.5-4 ms at 0019 (300,000 events)",
        ["ix_webhook_events_failed_broker", "ix_webhook_events_retrying_broker"],
    )  # fmt: skip

    async def admin(conn: psycopg.AsyncConnection[Any]) -> object:
        return await webhook_queries.failing_endpoints(conn)

    _measure_async(url, failing, admin, sizes.repeat)
    for scenario in (endpoint, failing):
        scenario.checks["no sequential scan of webhook_events"] = not any(
            "Seq Scan on webhook_events" in plan for plan in scenario.plans
        )
    return [endpoint, failing]


def _measure_async(
    url: str,
    scenario: Scenario,
    call: Callable[[psycopg.AsyncConnection[Any]], Coroutine[Any, Any, object]],
    repeat: int,
) -> None:
    """Plan and time ``call`` on the api's kind of connection (autocommit, rows as named tuples)."""

    async def run() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=namedtuple_row) as conn:
            plans = await explaining_async(conn, lambda: call(conn))
        async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=namedtuple_row) as conn:
            await call(conn)
            for _ in range(repeat):
                started = time.perf_counter()
                await call(conn)
                scenario.times_ms.append((time.perf_counter() - started) * 1000)
        check_indexes(scenario, plans)

    asyncio.run(run())


DATASETS: list[Callable[[str, Sizes], list[Scenario]]] = [
    cancels,
    replay,
    sweeper,
    claim,
    overdue,
    listing,
    endpoints,
    kept_plans,
]


# ------------------------------------------------------------------------------------------------ report


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def row(s: dict[str, Any]) -> str:
    """One scenario's line of the table: its name, runs, median and max, and its plan's verdict."""
    verdict = "ok" if s["plan_ok"] else "FAILED: " + "; ".join(k for k, ok in s["checks"].items() if not ok)
    return f"{s['name']:<32} {s['runs']:>4} {s['median_ms']:>10.2f} {s['max_ms']:>10.2f}  {verdict}"


HEADER = f"{'scenario':<32} {'runs':>4} {'median ms':>10} {'max ms':>10}  plan"


def run(
    admin_url: str,
    sizes_name: str,
    *,
    repeat: int | None = None,
    revision: str = "head",
    only: Sequence[str] = (),
) -> dict[str, Any]:
    """Every dataset and scenario on a scratch database of ``admin_url``'s server (dropped after); the report."""
    sizes = SIZES[sizes_name]
    if repeat is not None:
        sizes = replace(sizes, repeat=repeat)
    name = f"exchange_bench_db_{os.getpid()}"
    url = create_scratch_database(admin_url, name)
    started = time.perf_counter()
    load_before = os.getloadavg()
    results: list[Scenario] = []
    print(HEADER, flush=True)
    try:
        at = migrate.upgrade(url, revision)
        for dataset in [d for d in DATASETS if not only or d.__name__ in only]:
            built = time.perf_counter()
            done = dataset(url, sizes)
            for scenario in done:
                scenario.extra.setdefault("dataset_and_runs_s", round(time.perf_counter() - built, 1))
                print(row(scenario.summary()), flush=True)
            results += done
    finally:
        drop_database(admin_url, name)
    return {
        "commit": commit(),
        "revision": at,
        "sizes": sizes_name,
        "size_parameters": asdict(sizes),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "plans_ok": all(s.plan_ok for s in results),
        "scenarios": [s.summary() for s in results],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument("--repeat", type=int, help="timed runs per scenario (default: the sizes' own)")
    parser.add_argument("--json", type=Path, help="write the report (with every plan) here")
    parser.add_argument("--database-url", default=ADMIN_URL, help="a database URL of the server to use")
    parser.add_argument("--revision", default="head", help="alembic revision to measure (default head)")
    parser.add_argument("--only", nargs="+", choices=[d.__name__ for d in DATASETS], default=[],
                        help="these datasets' scenarios only")  # fmt: skip
    args = parser.parse_args(argv)
    report = run(args.database_url, args.sizes, repeat=args.repeat, revision=args.revision, only=args.only)
    print()
    load = f"load {report['loadavg_before'][0]:.2f} -> {report['loadavg_after'][0]:.2f}"
    print(f"commit {report['commit']} · revision {report['revision']} · sizes {report['sizes']} · {load} · "
          f"{report['elapsed_s']} s")  # fmt: skip
    print(HEADER)
    for s in report["scenarios"]:
        print(row(s))
        print(f"{'':<8}{s['what']}; measured then: {s['then']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if report["plans_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Cost of alembic 0021's composite foreign keys on the hot paths, before (0020) and after (0021), alternating.

    uv run python -m ops.bench_schema_fk [--database-url URL] [--trades 20000] [--cancels 10000] [--rounds 3]
        [--symbols 40] [--brokers 20] [--group 50]

Creates two scratch databases on ``--database-url``'s server, one migrated to 0020 and one to 0021, and drops them
at the end. Each round runs on one database, then the other (before, after, before, after, …: ``--rounds`` each, the
same load with new symbols), through the real functions, each call its own transaction as the services send it:

* ``accept``: ``accept_orders`` (alembic 0011) in groups of ``--group``: 2 x ``--trades`` orders that cross in pairs
  plus ``--cancels`` resting ones, each with its ``place`` command (the commands' key, the orders' two new unique
  indexes);
* ``match``: ``exchange.matching.service.process_symbol`` over every symbol until drained (``matcher_write``):
  ``--trades`` trades (the trades' two keys), their fill events, the orders' updates;
* ``cancel``: ``write_cancels`` (0018) of the resting orders in groups of ``--group`` (the commands' key);
* ``match_cancels``: the matcher again, applying the cancels;
* ``record``: ``webhook_record`` (0004/0017) of one delivered attempt per outbox event in groups of ``--group``
  (the attempts' key).

Prints each phase's wall-clock seconds per round and, less disturbed by other work on a shared machine, the CPU
seconds of the PostgreSQL backend that ran it (``/proc/<pid>/schedstat``: the server must be local), the
medians and the ratios after / before of the medians; then times the upgrade 0020 -> 0021 of the "before" database
as the rounds left it (how long its locks are held). Numbers only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Engine, text

from exchange.db import migrate
from exchange.db.engines import pooled_engine
from exchange.db.urls import libpq_url
from exchange.matching import service
from ops.bench.ceiling import migrated_scratch_database

DEFAULT_URL = os.environ.get("EXCHANGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REVISIONS = {"before": "0020", "after": "0021"}
PHASES = ("accept", "match", "cancel", "match_cancels", "record")
MID = 10_000

_ACCEPT = """
    SELECT count(*) FROM accept_orders(
        CAST(%(ids)s AS uuid[]), CAST(%(brokers)s AS uuid[]), CAST(%(nulls)s AS text[]), CAST(%(nulls)s AS text[]),
        CAST(%(documents)s AS text[]), CAST(%(symbols)s AS text[]), CAST(%(sides)s AS text[]),
        CAST(%(types)s AS text[]), CAST(%(tifs)s AS text[]), CAST(%(stps)s AS text[]), CAST(%(prices)s AS bigint[]),
        CAST(%(quantities)s AS bigint[]), CAST(%(valid_untils)s AS timestamptz[]))
"""
_CANCEL = "SELECT count(*) FROM write_cancels(CAST(%(ids)s AS uuid[]), CAST(%(brokers)s AS uuid[]))"
_RECORD = "SELECT webhook_record(CAST(%(batch)s AS jsonb), 10)"
_PENDING_EVENTS = "SELECT id, broker_id, attempts, generation FROM webhook_events WHERE status = 'pending'"

T = TypeVar("T")

Order = tuple[uuid.UUID, uuid.UUID, str, str, int]
"""(id, broker id, symbol, side, price) of an order to accept."""


@contextmanager
def databases(url: str) -> Iterator[dict[str, str]]:
    """A scratch database per revision of :data:`REVISIONS`, migrated to it; dropped at the end."""
    with ExitStack() as stack:
        yield {
            label: stack.enter_context(migrated_scratch_database(url, f"exchange_bench_fk_{label}", revision))
            for label, revision in REVISIONS.items()
        }


def add_brokers(db_url: str, n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    with psycopg.connect(db_url) as pg, pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO brokers (id, name, api_key_hash, webhook_secret, webhook_url)"
            " VALUES (%s, %s, %s, 'whsec_bench', 'https://example.com/hook')",
            [(b, f"bench-{i}", uuid.uuid4().hex * 2) for i, b in enumerate(ids)],
        )
    return ids


def load(
    rnd: random.Random, symbols: list[str], brokers: list[uuid.UUID], trades: int, cancels: int
) -> tuple[list[Order], list[Order]]:
    """(orders to accept, in order; the resting ones to cancel): pairs of a bid and an ask of one share at
    :data:`MID` (one trade per pair, two brokers), interleaved across symbols, and resting bids far below."""
    crossing: list[Order] = []
    for n in range(trades):
        symbol = symbols[n % len(symbols)]
        buyer, seller = rnd.sample(brokers, 2)
        crossing += [(uuid.uuid4(), buyer, symbol, "bid", MID), (uuid.uuid4(), seller, symbol, "ask", MID)]
    resting = [(uuid.uuid4(), rnd.choice(brokers), symbols[n % len(symbols)], "bid", MID - 100) for n in range(cancels)]
    return resting + crossing, resting


def chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def backend_cpu_s(pid: int) -> float:
    """CPU seconds the server process ``pid`` has run (the first field of its schedstat, in ns: a phase of a small
    run takes less than the clock tick ``/proc/<pid>/stat`` counts in)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


Sample = tuple[float, float]
"""(wall-clock seconds, backend CPU seconds) of one phase."""


def measured(pid: int, run: Callable[[], object]) -> Sample:
    cpu = backend_cpu_s(pid)
    wall = timed(run)
    return wall, backend_cpu_s(pid) - cpu


def accept(pg: psycopg.Connection[Any], orders: list[Order], group: int) -> None:
    for part in chunks(orders, group):
        n = len(part)
        params = {
            "ids": [o[0] for o in part],
            "brokers": [o[1] for o in part],
            "nulls": [None] * n,
            "documents": ["12345678900"] * n,
            "symbols": [o[2] for o in part],
            "sides": [o[3] for o in part],
            "types": ["limit"] * n,
            "tifs": ["gtc"] * n,
            "stps": ["none"] * n,
            "prices": [o[4] for o in part],
            "quantities": [1] * n,
            "valid_untils": [None] * n,
        }
        row = pg.execute(_ACCEPT, params).fetchone()
        if row is None or row[0] != n:
            raise RuntimeError(f"accept_orders accepted {row} of {n}")


def drain(engine: Engine, symbols: list[str]) -> int:
    """Every symbol until its commands are applied, as the matching actor does; returns the trades written."""
    cache = service.BookCache()
    written = 0
    for symbol in symbols:
        while True:
            result = service.process_symbol(engine, cache, symbol)
            written += result.trades
            if not result.more:
                break
    return written


def cancel(pg: psycopg.Connection[Any], orders: list[Order], group: int) -> None:
    for part in chunks(orders, group):
        row = pg.execute(_CANCEL, {"ids": [o[0] for o in part], "brokers": [o[1] for o in part]}).fetchone()
        if row is None or row[0] != len(part):
            raise RuntimeError(f"write_cancels answered {row} for {len(part)} orders")


def record(pg: psycopg.Connection[Any], group: int) -> int:
    """One delivered attempt per pending event, ``group`` per call; returns the attempts recorded."""
    events = pg.execute(_PENDING_EVENTS).fetchall()
    started = datetime.now(UTC).isoformat()
    for part in chunks(events, group):
        batch = [
            {"ord": n, "id": str(event_id), "broker_id": str(broker_id), "attempt": attempts + 1,
             "generation": generation, "kind": "delivered", "started": started, "url": "https://example.com/hook",
             "status_code": 200, "latency_ms": 3, "error": None, "excerpt": None, "delay": None, "reason": None}
            for n, (event_id, broker_id, attempts, generation) in enumerate(part, 1)
        ]  # fmt: skip
        pg.execute(_RECORD, {"batch": json.dumps(batch)})
    return len(events)


def one_round(db_url: str, brokers: list[uuid.UUID], args: argparse.Namespace, seed: int) -> dict[str, Sample]:
    rnd = random.Random(seed)  # noqa: S311 - reproducible load, not security
    tag = uuid.uuid4().hex[:4].upper()
    symbols = [f"F{tag}{i:03d}" for i in range(args.symbols)]
    orders, resting = load(rnd, symbols, brokers, args.trades, args.cancels)
    seconds: dict[str, Sample] = {}
    # One connection each, as the services hold them: the matcher's pool of one keeps its backend.
    engine = pooled_engine(db_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            matcher_pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        with psycopg.connect(db_url, autocommit=True) as pg:
            pid = pg.info.backend_pid
            seconds["accept"] = measured(pid, lambda: accept(pg, orders, args.group))
            trades: list[int] = []
            seconds["match"] = measured(matcher_pid, lambda: trades.append(drain(engine, symbols)))
            if trades != [args.trades]:
                raise RuntimeError(f"the matcher wrote {trades} trades, expected {args.trades}")
            seconds["cancel"] = measured(pid, lambda: cancel(pg, resting, args.group))
            seconds["match_cancels"] = measured(matcher_pid, lambda: drain(engine, symbols))
            seconds["record"] = measured(pid, lambda: record(pg, args.group))
        with engine.connect() as conn:  # the same backend throughout, or its CPU was not the matcher's
            if int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()) != matcher_pid:
                raise RuntimeError("the matcher's connection changed during the round")
    finally:
        engine.dispose()
    return seconds


def upgrade_time(db_url: str) -> tuple[float, dict[str, int]]:
    """Seconds to upgrade ``db_url`` to 0021, and its tables' row counts."""
    with psycopg.connect(db_url) as pg:
        counts = {
            table: int(pg.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]  # noqa: S608
            for table in ("orders", "commands", "trades", "webhook_events", "webhook_attempts")
        }
        pg.execute("ANALYZE")
        pg.commit()
    return timed(lambda: migrate.upgrade(db_url, REVISIONS["after"])), counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--database-url", default=DEFAULT_URL, help="PostgreSQL server")
    parser.add_argument("--trades", type=int, default=20_000, help="trades per round")
    parser.add_argument("--cancels", type=int, default=10_000, help="cancelled resting orders per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per revision, alternating")
    parser.add_argument("--symbols", type=int, default=40)
    parser.add_argument("--brokers", type=int, default=20)
    parser.add_argument("--group", type=int, default=50, help="rows per accept / cancel / record call")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Sample]]] = {label: [] for label in REVISIONS}
    with databases(libpq_url(args.database_url)) as urls:
        brokers = {label: add_brokers(db_url, args.brokers) for label, db_url in urls.items()}
        for n in range(args.rounds):
            for label, db_url in urls.items():
                seconds = one_round(db_url, brokers[label], args, seed=n)
                runs[label].append(seconds)
                cells = (f"{phase}={wall:.3f}s/cpu={cpu:.3f}s" for phase, (wall, cpu) in seconds.items())
                print(label, n, " ".join(cells), flush=True)
        print(f"medians of {args.rounds} rounds each; wall = client wall clock, cpu = the PostgreSQL backend's CPU")
        print("phase          wall_before wall_after wall_ratio  cpu_before cpu_after cpu_ratio")
        for phase in (*PHASES, "total"):
            cols = []
            for k in (0, 1):
                med = {
                    label: statistics.median(
                        sum(s[k] for s in r.values()) if phase == "total" else r[phase][k] for r in runs[label]
                    )
                    for label in REVISIONS
                }
                cols.append(f"{med['before']:>11.3f} {med['after']:>10.3f} {med['after'] / med['before']:>10.3f}")
            print(f"{phase:<14} {cols[0]}  {cols[1]}")
        upgrade_s, counts = upgrade_time(urls["before"])
        print(f"upgrade 0020 -> 0021 of the 'before' database: {upgrade_s:.2f} s; rows: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

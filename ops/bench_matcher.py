"""Cost of one matcher batch: ``process_symbol`` in a loop over many symbols, as the matching actor calls it.

    uv run python -m ops.bench_matcher [--database-url URL] [--keep] [--direct] [--commands 3000] [--symbols 60]
        [--brokers 8] [--batch 1 50] [--cross 0.4] [--repeat 1] [--baseline GIT_REV] [--symbols-per-batch K ...]
        [--seed 1]

Creates a scratch database on ``--database-url``'s server (default EXCHANGE_TEST_POSTGRES_URL or the local
server), migrates it and drops it at the end; with ``--keep`` it uses the database named in the URL instead
(created and migrated when missing, never dropped). Unless ``--direct``, the matcher connects through a pgbouncer
(transaction pooling) started with ``ops/scripts/pgbouncer.sh`` like the e2e tests do.

For each batch size ``b`` of ``--batch``: every round accepts ``b`` limit orders per symbol straight into the
command log (order row + ``place`` command, as the api writes them; not measured), then drains each symbol once
(``process_symbol`` until ``more`` is false, like the actor; measured). Prices mix resting orders and orders that
cross the book (``--cross``). A warm-up round (not measured) fills every book cache first. Then a few more rounds
run with libpq's protocol trace on to count, per batch, the statements run (CommandComplete messages, whichever
protocol carried them; psycopg's implicit BEGIN/COMMIT included) and the round trips (ReadyForQuery messages:
one per Sync or simple query message). Only ``process_symbol`` is measured, not what the actor does after the
commit (Redis publish, webhook enqueue, log line).

``--symbols-per-batch K`` also measures several books per transaction, as the actor runs a message naming
several symbols of a partition: every round accepts ONE order per symbol, then the symbols are drained once as
``K`` symbols per transaction (``process_symbols``, "grouped") and, on fresh symbols of the same run, as one
transaction per symbol (``process_symbol``, "separate"); the two alternate ``--repeat`` times. It prints per
command costs and the ratio separate / grouped (``K`` = 1 measures only the cost of the generalised SQL).

``--baseline REV`` also measures ``exchange/matching`` as it is at git revision ``REV`` (copied into a scratch
package), alternating with the working tree's run for run on the same server, and prints the ratios
baseline / current. Numbers only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import psycopg
from sqlalchemy import Engine, event

from exchange.db import migrate
from exchange.db.engines import pooled_engine
from exchange.db.urls import libpq_url
from ops.bench.ceiling import migrated_scratch_database
from ops.bench.main import free_port

DEFAULT_URL = os.environ.get("EXCHANGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PGBOUNCER_SCRIPT = Path(__file__).resolve().parent / "scripts" / "pgbouncer.sh"
MID = 10_000
CENSUS_ROUNDS = 3
RATIOS = ("wall_ms_per_batch", "cpu_ms_per_batch", "statements_per_batch", "round_trips_per_batch")
GROUP_RATIOS = ("wall_ms_per_command", "cpu_ms_per_command", "round_trips_per_command")

_ACCEPT = """
WITH v AS (
    SELECT v.*, nextval('command_seq') AS seq
    FROM unnest(%(ids)s::uuid[], %(brokers)s::uuid[], %(symbols)s::text[], %(sides)s::text[],
                %(prices)s::bigint[], %(quantities)s::bigint[]) WITH ORDINALITY
         AS v(id, broker_id, symbol, side, price, quantity, n)
    ORDER BY v.n
), o AS (
    INSERT INTO orders (id, broker_id, document_number, symbol, side, order_type, time_in_force, price, quantity,
                        remaining, seq)
    SELECT id, broker_id, '123', symbol, side, 'limit', 'gtc', price, quantity, quantity, seq FROM v
)
INSERT INTO commands (seq, symbol, kind, order_id) SELECT seq, symbol, 'place', id FROM v
"""


@dataclass
class Totals:
    commands: int = 0
    batches: int = 0
    trades: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0


@dataclass
class Census:
    batches: int = 0
    statements: int = 0
    round_trips: int = 0
    traces: list[tuple[Any, Any, Path]] = field(default_factory=list)
    """(psycopg connection, open trace file, its path) of every traced connection."""


@contextmanager
def scratch_database(url: str, keep: bool) -> Iterator[str]:
    """A migrated database: the one named in ``url`` (``keep``) or a fresh one on its server, dropped after."""
    if keep:
        migrate.ensure_database(url)
        migrate.upgrade(url)
        yield url
        return
    with migrated_scratch_database(url, "exchange_bench_matcher") as db_url:
        yield db_url


@contextmanager
def pgbouncer(database_url: str) -> Iterator[str]:
    """A pgbouncer in front of ``database_url``'s server (as the tests start it); yields the pooled URL."""
    run_dir = Path(tempfile.mkdtemp(prefix="exchange-bench-matcher-pgbouncer-"))
    parts = urlsplit(database_url)
    port = free_port()
    user = parts.username or "postgres"
    argv = ["bash", str(PGBOUNCER_SCRIPT), "start", str(run_dir), str(port)]
    subprocess.run([*argv, parts.hostname or "127.0.0.1", str(parts.port or 5432), user], check=True)
    try:
        yield parts._replace(netloc=f"{user}@127.0.0.1:{port}").geturl()
    finally:
        subprocess.run(["bash", str(PGBOUNCER_SCRIPT), "stop", str(run_dir)], check=False)
        shutil.rmtree(run_dir, ignore_errors=True)


def add_brokers(pg: psycopg.Connection[Any], n: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    with pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO brokers (id, name, api_key_hash, webhook_secret) VALUES (%s, %s, %s, 'whsec_bench')",
            [(b, f"bench-{i}", uuid.uuid4().hex * 2) for i, b in enumerate(ids)],
        )
    pg.commit()
    return ids


def accept_round(
    pg: psycopg.Connection[Any],
    rnd: random.Random,
    symbols: list[str],
    brokers: list[uuid.UUID],
    per: int,
    cross: float,
) -> None:
    """``per`` limit orders for every symbol, interleaved across symbols, committed as the api would."""
    rows: dict[str, list[Any]] = {k: [] for k in ("ids", "brokers", "symbols", "sides", "prices", "quantities")}
    for _ in range(per):
        for symbol in symbols:
            side = rnd.choice(("bid", "ask"))
            aggressive = rnd.random() < cross
            offset = -rnd.randint(0, 3) if aggressive else rnd.randint(1, 5)
            rows["ids"].append(uuid.uuid4())
            rows["brokers"].append(rnd.choice(brokers))
            rows["symbols"].append(symbol)
            rows["sides"].append(side)
            rows["prices"].append(MID - offset if side == "bid" else MID + offset)
            rows["quantities"].append(rnd.randint(1, 10))
    pg.execute(_ACCEPT, rows)
    pg.commit()


def drain(
    service: ModuleType, engine: Engine, cache: Any, symbols: list[str], totals: Totals | None, group: int = 0
) -> int:
    """Drain every symbol like the actor does; returns the number of non-empty batches (transactions).

    ``group`` 0: one symbol per transaction (``process_symbol`` until ``more`` is false, symbol after symbol).
    ``group`` K: K symbols per transaction (``process_symbols`` over consecutive groups of K, again while any has
    ``more``)."""
    batches = 0
    pending = (
        [[symbol] for symbol in symbols]
        if not group
        else [symbols[i : i + group] for i in range(0, len(symbols), group)]
    )
    while pending:
        chunk = pending.pop(0)
        wall, cpu = time.perf_counter(), time.process_time()
        results = (
            service.process_symbols(engine, cache, chunk)
            if group
            else [service.process_symbol(engine, cache, chunk[0])]
        )
        elapsed_wall, elapsed_cpu = time.perf_counter() - wall, time.process_time() - cpu
        commands = sum(r.commands for r in results)
        if totals is not None:
            totals.wall_s += elapsed_wall
            totals.cpu_s += elapsed_cpu
            totals.commands += commands
            totals.trades += sum(r.trades for r in results)
            totals.batches += 1 if commands else 0
        batches += 1 if commands else 0
        if more := [r.symbol for r in results if r.more]:
            pending.insert(0, more)
    return batches


def traced_engine(url: str, census: Census) -> Engine:
    """An engine like the matcher's whose connections write libpq's protocol trace to files of ``census``."""
    engine = pooled_engine(url, pool_size=2, max_overflow=1)

    def trace(dbapi_connection: Any, _record: Any) -> None:
        descriptor, name = tempfile.mkstemp(prefix="bench-matcher-trace-")
        handle = os.fdopen(descriptor, "w")  # kept open until count_trace: libpq writes through the descriptor
        census.traces.append((dbapi_connection, handle, Path(name)))
        dbapi_connection.pgconn.trace(handle.fileno())
        dbapi_connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

    event.listen(engine, "connect", trace)
    return engine


def count_trace(census: Census) -> None:
    for connection, handle, path in census.traces:
        with suppress(psycopg.Error):
            connection.pgconn.untrace()  # flushes libpq's buffer
        handle.close()
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[0] == "B" and parts[2].strip() == "CommandComplete":
                census.statements += 1
            elif len(parts) >= 3 and parts[0] == "B" and parts[2].strip() == "ReadyForQuery":
                census.round_trips += 1
        path.unlink()


def run_regime(
    args: argparse.Namespace, service: ModuleType, db_url: str, matcher_url: str, per: int, tag: str, group: int = 0
) -> dict[str, float]:
    rnd = random.Random(args.seed)  # noqa: S311 - reproducible load, not security
    symbols = [f"{tag}{i:04d}" for i in range(args.symbols)]
    rounds = max(1, args.commands // (per * args.symbols))
    engine = pooled_engine(matcher_url, pool_size=2, max_overflow=1)  # as workers/matching.py with 1 thread
    cache = service.BookCache()
    totals = Totals()
    with psycopg.connect(libpq_url(db_url)) as pg:
        brokers = add_brokers(pg, args.brokers)
        accept_round(pg, rnd, symbols, brokers, per, args.cross)
        drain(service, engine, cache, symbols, None, group)  # warm-up: symbol rows, book caches, pool
        for _ in range(rounds):
            accept_round(pg, rnd, symbols, brokers, per, args.cross)
            drain(service, engine, cache, symbols, totals, group)
        engine.dispose()
        census = Census()
        traced = traced_engine(matcher_url, census)
        for _ in range(CENSUS_ROUNDS):
            accept_round(pg, rnd, symbols, brokers, per, args.cross)
            census.batches += drain(service, traced, cache, symbols, None, group)
        count_trace(census)
        traced.dispose()
    batches = max(totals.batches, 1)
    return {
        "batch_size": totals.commands / batches,
        "commands": totals.commands,
        "batches": totals.batches,
        "trades": totals.trades,
        "commands_per_s": totals.commands / totals.wall_s,
        "batches_per_s": totals.batches / totals.wall_s,
        "wall_ms_per_batch": 1000 * totals.wall_s / batches,
        "cpu_ms_per_batch": 1000 * totals.cpu_s / batches,
        "cpu_ms_per_command": 1000 * totals.cpu_s / max(totals.commands, 1),
        "statements_per_batch": census.statements / max(census.batches, 1),
        "round_trips_per_batch": census.round_trips / max(census.batches, 1),
        "wall_ms_per_command": 1000 * totals.wall_s / max(totals.commands, 1),
        "round_trips_per_command": census.round_trips / (CENSUS_ROUNDS * per * len(symbols)),
    }


def baseline_service(rev: str, stack: ExitStack) -> ModuleType:
    """``exchange/matching`` at git revision ``rev``, importable as a package of its own."""
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-matcher-baseline-")))
    package = "baseline_matching"
    (root / package).mkdir()
    repo = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(repo)]
    names = subprocess.run(
        [*git, "ls-tree", "--name-only", rev, "exchange/matching/"], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in names:
        source = subprocess.run([*git, "show", f"{rev}:{name}"], capture_output=True, text=True, check=True).stdout
        (root / package / Path(name).name).write_text(source.replace("exchange.matching", package))
    sys.path.insert(0, str(root))
    return importlib.import_module(f"{package}.service")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--database-url", default=DEFAULT_URL, help="PostgreSQL server (and database with --keep)")
    parser.add_argument("--keep", action="store_true", help="use the database named in --database-url")
    parser.add_argument("--direct", action="store_true", help="connect straight to PostgreSQL, not via pgbouncer")
    parser.add_argument("--commands", type=int, default=3000, help="measured commands per batch size")
    parser.add_argument("--symbols", type=int, default=60)
    parser.add_argument("--brokers", type=int, default=8)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 50], help="commands per symbol per round")
    parser.add_argument("--cross", type=float, default=0.4, help="share of orders priced to cross the book")
    parser.add_argument("--repeat", type=int, default=1, help="runs per batch size (the median is printed)")
    parser.add_argument("--baseline", metavar="GIT_REV", help="also measure exchange/matching at this revision")
    parser.add_argument(
        "--symbols-per-batch",
        type=int,
        nargs="*",
        default=[],
        metavar="K",
        help="also compare K symbols with one command each per transaction against K separate transactions",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(f"via={'direct' if args.direct else 'pgbouncer'}", flush=True)
    with ExitStack() as stack:
        services = {"current": importlib.import_module("exchange.matching.service")}
        if args.baseline:
            services = {f"baseline {args.baseline}": baseline_service(args.baseline, stack), **services}
        db_url = stack.enter_context(scratch_database(libpq_url(args.database_url), args.keep))
        matcher_url = db_url if args.direct else stack.enter_context(pgbouncer(db_url))
        for per in args.batch:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in services}
            for _ in range(args.repeat):
                for name, service in services.items():
                    tag = uuid.uuid4().hex[:5].upper()
                    runs[name].append(run_regime(args, service, db_url, matcher_url, per, tag))
            medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
            for name, row in medians.items():
                print(f"batch={per:<3} {name:<16} " + " ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
            if len(medians) == 2:
                before, after = medians.values()
                ratios = {k: before[k] / after[k] for k in RATIOS if after[k]}
                print(f"batch={per:<3} {'ratio':<16} " + " ".join(f"{k}={v:.2f}x" for k, v in ratios.items()))
        current = services["current"]
        for k in args.symbols_per_batch:
            modes = {"separate": 0, "grouped": k}
            group_runs: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
            for _ in range(args.repeat):
                for name, group in modes.items():
                    tag = uuid.uuid4().hex[:5].upper()
                    group_runs[name].append(run_regime(args, current, db_url, matcher_url, 1, tag, group))
            medians = {name: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for name, rs in group_runs.items()}
            for name, row in medians.items():
                print(f"symbols_per_batch={k:<3} {name:<9} " + " ".join(f"{m}={v:.3f}" for m, v in row.items()))
            separate, grouped = medians["separate"], medians["grouped"]
            ratios = {m: separate[m] / grouped[m] for m in GROUP_RATIOS if grouped[m]}
            print(
                f"symbols_per_batch={k:<3} {'ratio':<9} "
                + " ".join(f"{m}={v:.2f}x" for m, v in ratios.items())
                + " (separate / grouped)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

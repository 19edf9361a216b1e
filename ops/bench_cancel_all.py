"""How long a large cancel-all takes, and how long another broker's single cancels wait beside it.

    uv run python -m ops.bench_cancel_all [--database-url URL] [--orders 20000] [--rounds 3] [--probe-every-ms 25]

Creates a scratch database on ``--database-url``'s server (default EXCHANGE_TEST_POSTGRES_URL or the local server),
migrates it and drops it at the end. Each round gives one broker ``--orders`` resting orders in a new symbol (written
straight into ``orders`` as the matcher leaves them; not measured), then runs the api's cancel-all
(``accept.cancel_all``, on the api's kind of pool) and, every ``--probe-every-ms`` while it runs, one single cancel
(``accept.cancel_orders``, the api's cancel group) of another broker's open order in another symbol: the cancels
the cancel-all could hold up, since cancel writers share the 256 cancel-bucket locks (alembic 0014). Prints, per
round and over all rounds, the cancel-all's time, the CPU it and the probes cost this process and the database's
server processes (robust to other load on the machine, unlike the time), and the probes' waits (median, max); no
matcher runs.
``--probe-every-ms 0`` sends no probes: the cancel-all's time alone (probes that no longer wait compete with it for
the CPU). Only the two functions' signatures are used, so the same file measures an older checkout: copy it into
that checkout's ``ops/`` and run it there, alternating with this one. Numbers only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg

from exchange.db.engines import AsyncPool
from exchange.db.urls import libpq_url
from exchange.orders import accept
from ops.bench.ceiling import migrated_scratch_database
from ops.bench.server_stats import process_cpu_s

DEFAULT_URL = os.environ.get("EXCHANGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

_ADD_OPEN_ORDERS = """
    INSERT INTO orders (broker_id, document_number, symbol, side, order_type, time_in_force, price, quantity,
                        remaining, status, seq, priority)
    SELECT %(broker)s, '1', %(symbol)s, 'ask', 'limit', 'gtc', 2000 + g, 1, 1, 'open', nextval('command_seq'),
           currval('command_seq')
    FROM generate_series(1, %(n)s) AS g
    RETURNING id
    """


def add_broker(pg: psycopg.Connection[Any], name: str) -> uuid.UUID:
    broker = uuid.uuid4()
    pg.execute(
        "INSERT INTO brokers (id, name, api_key_hash, webhook_secret) VALUES (%s, %s, %s, 'whsec_bench')",
        (broker, name, uuid.uuid4().hex * 2),
    )
    return broker


def add_open_orders(pg: psycopg.Connection[Any], broker: uuid.UUID, symbol: str, n: int) -> list[uuid.UUID]:
    rows = pg.execute(_ADD_OPEN_ORDERS, {"broker": broker, "symbol": symbol, "n": n}).fetchall()
    pg.execute("ANALYZE orders")
    return [row[0] for row in rows]


def cpu_s(monitor: psycopg.Connection[Any]) -> tuple[float, dict[int, float]]:
    """CPU seconds used so far by this process and by each PostgreSQL process serving this database but
    ``monitor``'s (the server runs on this machine): work done, which other load on the machine does not inflate
    as it does wall time."""
    rows = monitor.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchall()
    return time.process_time(), {int(pid): process_cpu_s(int(pid)) for (pid,) in rows}


def cpu_used_s(before: tuple[float, dict[int, float]], after: tuple[float, dict[int, float]]) -> float:
    return after[0] - before[0] + sum(cpu - before[1].get(pid, 0.0) for pid, cpu in after[1].items())


async def one_round(
    pool: AsyncPool, broker: uuid.UUID, symbol: str, other: uuid.UUID, probes: Iterator[uuid.UUID], every_s: float
) -> tuple[float, int, list[float]]:
    """(cancel-all seconds, cancels it wrote, each probe's wait in seconds)."""

    async def probe(order_id: uuid.UUID) -> float:
        start = time.perf_counter()
        await accept.cancel_orders(pool, [(other, order_id)])
        return time.perf_counter() - start

    start = time.perf_counter()
    everything = asyncio.create_task(accept.cancel_all(pool, broker, symbol))
    sent: list[asyncio.Task[float]] = []
    while not everything.done():
        if every_s > 0:
            sent.append(asyncio.create_task(probe(next(probes))))
        await asyncio.wait([everything], timeout=every_s or None)
    took = time.perf_counter() - start
    waits = await asyncio.gather(*sent)
    return took, len(everything.result().order_ids), waits


def _waits(waits: list[float]) -> str:
    if not waits:
        return " no single cancels beside it"
    return (
        f" {len(waits)} single cancels of another broker beside it waited median"
        f" {statistics.median(waits) * 1000:.1f} ms, max {max(waits) * 1000:.1f} ms"
    )


async def run(url: str, orders: int, rounds: int, every_s: float) -> None:
    with psycopg.connect(libpq_url(url), autocommit=True) as pg:
        broker, other = add_broker(pg, "cancel-all"), add_broker(pg, "bystander")
        probes = iter(add_open_orders(pg, other, "OTHER", 100_000))
    pool = AsyncPool(url)
    try:
        await accept.cancel_orders(pool, [(other, next(probes))])  # connect and plan once, outside the rounds
        times: list[float] = []
        cpus: list[float] = []
        every_wait: list[float] = []
        for n in range(rounds):
            symbol = f"CXL{n}"
            with psycopg.connect(libpq_url(url), autocommit=True) as pg:
                add_open_orders(pg, broker, symbol, orders)
                before = cpu_s(pg)
                took, cancelled, waits = await one_round(pool, broker, symbol, other, probes, every_s)
                cpu = cpu_used_s(before, cpu_s(pg))
            times.append(took)
            cpus.append(cpu)
            every_wait += waits
            print(
                f"round {n}: cancel-all of {cancelled} orders {took * 1000:.0f} ms"
                f" (CPU of client and server {cpu * 1000:.0f} ms);{_waits(waits)}",
                flush=True,
            )
        print(
            f"all rounds: cancel-all median {statistics.median(times) * 1000:.0f} ms"
            f" (CPU {statistics.median(cpus) * 1000:.0f} ms);{_waits(every_wait)}"
        )
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=DEFAULT_URL)
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probe-every-ms", type=float, default=25.0)
    args = parser.parse_args(argv)
    with migrated_scratch_database(args.database_url, "exchange_bench_cancel_all") as url:
        asyncio.run(run(url, args.orders, args.rounds, args.probe_every_ms / 1000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Webhook delivery throughput: how many events/s ``exchange webhooks`` delivers to a local receiver.

    uv run python -m ops.bench_webhooks [--events 5000] [--brokers 20] [--processes 2] [--threads 16]

Creates a scratch database ``exchange_bench_webhooks`` on EXCHANGE_TEST_POSTGRES_URL's server (default local),
starts a uvicorn receiver on 127.0.0.1 (a separate process) and ``exchange webhooks --processes P --threads T``
(T = deliveries in flight per process; ``EXCHANGE_WEBHOOK_MAX_IN_FLIGHT`` = T too) on a Redis database that is
empty and unused (on ``EXCHANGE_BENCH_REDIS_SERVER``, default local; emptied again at the end). Once the workers
are up it commits ``--events`` outbox rows for ``--brokers`` brokers whose URL is the receiver, sends the hint the
matcher sends after a commit (``enqueue_deliveries``), and prints deliveries/s from that commit to the last event
marked ``delivered`` in Postgres (each delivery: claimed in a batch, signed POST, recorded in a batch), plus the
CPU each side used per delivery, so a receiver or database that is the bottleneck shows. Everything it starts is
stopped at the end and the database is dropped. Numbers only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, cast

import psycopg
import redis

from exchange.db import migrate
from exchange.messaging.broker import make_broker
from exchange.messaging.names import process_namespace
from exchange.orders.brokers import new_webhook_secret
from exchange.webhooks.queue import enqueue_deliveries
from ops.bench.ceiling import create_scratch_database, drop_database
from ops.bench.main import free_port
from ops.bench.server_stats import TICKS, process_cpu_s

ADMIN_URL = os.environ.get("EXCHANGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_NAME = "exchange_bench_webhooks"
REDIS_SERVER = os.environ.get("EXCHANGE_BENCH_REDIS_SERVER", "redis://127.0.0.1:6379")


def _idle_redis_database() -> str:
    """The URL of a database of REDIS_SERVER that holds no keys and that no client is connected to (other
    setups on the same server, e.g. an ``exchange dev``, must neither see the bench's messages nor lose theirs)."""
    clients = cast(list[dict[str, Any]], redis.Redis.from_url(f"{REDIS_SERVER}/0").client_list())  # sync: a list
    in_use = {int(client["db"]) for client in clients}
    for db in range(15, 0, -1):
        if db not in in_use and redis.Redis.from_url(f"{REDIS_SERVER}/{db}").dbsize() == 0:
            return f"{REDIS_SERVER}/{db}"
    raise SystemExit(f"no idle database on {REDIS_SERVER}")


async def receiver_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The smallest useful receiver: drain the body, answer 200."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"receiver did not listen on {port}")


def _add_brokers(url: str, brokers: int, hook: str) -> list[str]:
    broker_ids = [str(uuid.uuid4()) for _ in range(brokers)]
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO brokers (id, name, api_key_hash, webhook_url, webhook_secret) VALUES (%s, %s, %s, %s, %s)",
            [(b, f"bench-{n}", f"{n:064x}", hook, new_webhook_secret()) for n, b in enumerate(broker_ids)],
        )
    return broker_ids


def _add_events(url: str, broker_ids: list[str], events: int) -> list[str]:
    """Commit ``events`` due outbox rows (round-robin over the brokers, gap-free sequences) in one transaction."""
    ids = [str(uuid.uuid4()) for _ in range(events)]
    rows = []
    for i, event_id in enumerate(ids):
        sequence = i // len(broker_ids) + 1
        payload = {"event_id": event_id, "event": "trade_executed", "type": "order.fill", "sequence": sequence}
        rows.append((event_id, broker_ids[i % len(broker_ids)], sequence, json.dumps(payload)))
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO webhook_events (id, broker_id, sequence, type, payload) VALUES (%s, %s, %s, 'order.fill', %s)",
            rows,
        )
    return ids


def _session_cpu_s(session: int) -> float:
    """CPU seconds used so far by the live processes of session ``session`` (a child and everything it started)."""
    total = 0.0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) != session:
                    continue
        except OSError:
            continue
        total += process_cpu_s(int(stat.split("/")[2]))
    return total


def _backend_cpu_s(conn: psycopg.Connection[Any]) -> dict[int, float]:
    """CPU seconds of each PostgreSQL process serving the scratch database, except this connection's (the server
    runs on this machine)."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (DB_NAME,)
    ).fetchall()
    return {int(pid): process_cpu_s(int(pid)) for (pid,) in rows}


def _machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--brokers", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvicorn

        uvicorn.run(receiver_app, host="127.0.0.1", port=args.serve, log_level="warning", access_log=False)
        return

    redis_url = _idle_redis_database()
    url = create_scratch_database(ADMIN_URL, DB_NAME)
    migrate.upgrade(url)
    port = free_port()
    children: list[subprocess.Popen[bytes]] = []
    try:
        receiver = subprocess.Popen(
            [sys.executable, "-m", "ops.bench_webhooks", "--serve", str(port)], start_new_session=True
        )
        children.append(receiver)
        _wait_port(port)
        broker_ids = _add_brokers(url, args.brokers, f"http://127.0.0.1:{port}/hook")
        env = {
            **os.environ,
            "EXCHANGE_DATABASE_URL": url,
            "EXCHANGE_REDIS_URL": redis_url,
            "EXCHANGE_WEBHOOK_ALLOW_PRIVATE": "true",
            "EXCHANGE_WEBHOOK_MAX_IN_FLIGHT": str(args.threads),
        }
        argv = [sys.executable, "-m", "exchange.cli", "webhooks", "--processes", str(args.processes)]
        argv += ["--threads", str(args.threads)]
        workers = subprocess.Popen(argv, env=env, start_new_session=True)
        children.append(workers)
        time.sleep(3.0)  # let the workers boot before the clock starts
        broker = make_broker(redis_url, 1, process_namespace(None, url))
        with psycopg.connect(url, autocommit=True) as conn:
            receiver_before, workers_before = _session_cpu_s(receiver.pid), _session_cpu_s(workers.pid)
            machine_before, backends_before = _machine_busy_s(), _backend_cpu_s(conn)
            ids = _add_events(url, broker_ids, args.events)
            started = time.perf_counter()
            enqueue_deliveries(broker, ids)
            while True:
                row = conn.execute("SELECT count(*) FILTER (WHERE status = 'delivered') FROM webhook_events").fetchone()
                done = int(row[0]) if row else 0
                if done >= args.events:
                    break
                if time.perf_counter() - started > 600:
                    raise SystemExit(f"only {done}/{args.events} delivered after 600 s")
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            backends_after = _backend_cpu_s(conn)  # the workers' pooled connections, opened before or during the run
            receiver_s = _session_cpu_s(receiver.pid) - receiver_before
            workers_s = _session_cpu_s(workers.pid) - workers_before
            machine_s = _machine_busy_s() - machine_before
            postgres_s = sum(cpu - backends_before.get(pid, 0.0) for pid, cpu in backends_after.items())
            stats = conn.execute(
                "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY latency_ms), count(*) "
                "FROM webhook_attempts"
            ).fetchone()
        broker.close()
        per = 1e6 / args.events
        print(
            f"events={args.events} brokers={args.brokers} processes={args.processes} threads={args.threads}\n"
            f"delivered all in {elapsed:.2f} s: {args.events / elapsed:,.0f} deliveries/s\n"
            f"attempts={stats[1] if stats else '?'} POST latency p50/p99 ms={stats[0] if stats else '?'}\n"
            f"CPU per delivery: workers {workers_s * per:.0f} us, receiver {receiver_s * per:.0f} us, "
            f"PostgreSQL {postgres_s * per:.0f} us (the workers' {len(backends_after)} backends); "
            f"machine busy {machine_s / elapsed:.2f} of {os.cpu_count()} cores (everything, others' work included)"
        )
    finally:
        for child in reversed(children):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        drop_database(ADMIN_URL, DB_NAME)
        redis.Redis.from_url(redis_url).flushdb()  # the database was idle and empty before the run


if __name__ == "__main__":
    main()

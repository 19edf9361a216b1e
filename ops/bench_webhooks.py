"""Webhook delivery throughput: how many events/s ``exchange webhooks`` delivers to a local receiver.

    uv run python -m ops.bench_webhooks [--events 5000] [--brokers 20] [--processes 2] [--threads 16]

Creates a scratch database ``exchange_bench_webhooks`` on EXCHANGE_TEST_POSTGRES_URL's server (default local),
writes ``--events`` outbox rows for ``--brokers`` brokers whose URL is a uvicorn receiver on 127.0.0.1 (a separate
process), starts ``exchange webhooks`` on a scratch Redis database (14, flushed), enqueues one ``deliver`` per
event and prints deliveries/s from the first message to the last event marked ``delivered`` in Postgres (every
delivery = claim transaction + signed POST + attempt/result transaction). Everything it starts is stopped at the
end and the database is dropped. Numbers only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg
import redis

from exchange.db import migrate
from exchange.messaging.broker import make_broker
from exchange.orders.brokers import new_webhook_secret
from exchange.webhooks.queue import enqueue_deliveries
from ops.bench.ceiling import create_scratch_database, drop_database
from ops.bench.main import free_port

ADMIN_URL = os.environ.get("EXCHANGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB_NAME = "exchange_bench_webhooks"
REDIS_URL = "redis://127.0.0.1:6379/14"


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
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"receiver did not listen on {port}")


def _seed(url: str, brokers: int, events: int, hook: str) -> list[str]:
    broker_ids = [str(uuid.uuid4()) for _ in range(brokers)]
    ids = [str(uuid.uuid4()) for _ in range(events)]
    rows = []
    for i, event_id in enumerate(ids):
        sequence = i // brokers + 1
        payload = {"event_id": event_id, "event": "trade_executed", "type": "order.fill", "sequence": sequence}
        rows.append((event_id, broker_ids[i % brokers], sequence, json.dumps(payload)))
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO brokers (id, name, api_key_hash, webhook_url, webhook_secret) VALUES (%s, %s, %s, %s, %s)",
            [(b, f"bench-{n}", f"{n:064x}", hook, new_webhook_secret()) for n, b in enumerate(broker_ids)],
        )
        cur.executemany(
            "INSERT INTO webhook_events (id, broker_id, sequence, type, payload, next_attempt_at) "
            "VALUES (%s, %s, %s, 'order.fill', %s, now() - interval '1 second')",
            rows,
        )
    return ids


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

    url = create_scratch_database(ADMIN_URL, DB_NAME)
    migrate.upgrade(url)
    port = free_port()
    children: list[subprocess.Popen[bytes]] = []
    try:
        children.append(
            subprocess.Popen([sys.executable, "-m", "ops.bench_webhooks", "--serve", str(port)], start_new_session=True)
        )
        _wait_port(port)
        ids = _seed(url, args.brokers, args.events, f"http://127.0.0.1:{port}/hook")
        redis.Redis.from_url(REDIS_URL).flushdb()
        env = {
            **os.environ,
            "EXCHANGE_DATABASE_URL": url,
            "EXCHANGE_REDIS_URL": REDIS_URL,
            "EXCHANGE_WEBHOOK_ALLOW_PRIVATE": "true",
            "EXCHANGE_WEBHOOK_MAX_IN_FLIGHT": str(args.threads),
        }
        argv = [sys.executable, "-m", "exchange.cli", "webhooks", "--processes", str(args.processes)]
        argv += ["--threads", str(args.threads)]
        children.append(subprocess.Popen(argv, env=env, start_new_session=True))
        time.sleep(3.0)  # let the workers boot before the clock starts
        broker = make_broker(REDIS_URL, 1)
        started = time.perf_counter()
        enqueue_deliveries(broker, ids)
        enqueued = time.perf_counter() - started
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                row = conn.execute("SELECT count(*) FILTER (WHERE status = 'delivered') FROM webhook_events").fetchone()
                done = int(row[0]) if row else 0
                if done >= args.events:
                    break
                if time.perf_counter() - started > 600:
                    raise SystemExit(f"only {done}/{args.events} delivered after 600 s")
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            stats = conn.execute(
                "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY latency_ms), count(*) "
                "FROM webhook_attempts"
            ).fetchone()
        broker.close()
        print(
            f"events={args.events} brokers={args.brokers} processes={args.processes} threads={args.threads}\n"
            f"enqueue: {enqueued:.2f} s ({args.events / enqueued:,.0f} msg/s)\n"
            f"delivered all in {elapsed:.2f} s: {args.events / elapsed:,.0f} deliveries/s\n"
            f"attempts={stats[1] if stats else '?'} POST latency p50/p99 ms={stats[0] if stats else '?'}"
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


if __name__ == "__main__":
    main()

"""The api's CPU per request, one endpoint at a time, against a running exchange on this machine.

    uv run python -m ops.bench_api --base-url http://127.0.0.1:8000 --admin-key KEY [--requests 4000]
                                   [--concurrency 32] [--endpoint PATH:STATUS ...]

Registers a broker, then for each endpoint (``GET /balance``: one indexed read; ``GET /orders/not-an-id``: a 404
that touches no database; ``GET /stocks/{symbol}/book``: one aggregate read; or those given as
``--endpoint PATH:STATUS``) sends ``--requests`` requests from ``--concurrency`` concurrent clients and prints the
CPU seconds the api processes and PostgreSQL used per request (``/proc``, Linux, the exchange's processes told apart
from other work on the machine as ``exchange bench --server-stats`` does: the api by its port, PostgreSQL's backends
by ``--database-url``'s database, default ``EXCHANGE_DATABASE_URL``; without one, every api and PostgreSQL process
of the machine is counted by command line, and it says so) and the requests/s. Each endpoint runs twice;
compare the second round (the first warms caches and pools). On a shared machine compare alternating runs of two
builds, not figures taken hours apart. Numbers only: nothing is asserted; the broker it registered stays (use a
scratch exchange).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import msgspec

from ops.bench.http import Pool
from ops.bench.server_stats import per_order, take

ENDPOINTS = (("/balance", 200), ("/orders/not-an-id", 404), ("/stocks/BENCH/book", 200))
"""Path and the status it must answer (anything else means the run measures something else: it stops)."""
WARMUP_PER_CLIENT = 20


async def measure(
    base_url: str,
    admin_key: str,
    requests: int,
    concurrency: int,
    endpoints: tuple[tuple[str, int], ...] = ENDPOINTS,
    database_url: str | None = None,
) -> None:
    # The load generator's own client (ops.bench.http): httpx would spend several times the api's CPU per request
    # on the same cores it measures.
    pool = Pool(base_url, timeout_s=30, max_connections=concurrency)
    try:
        admin = f"Authorization: Bearer {admin_key}\r\n".encode()
        status, data = await pool.request(
            "POST", "/register", auth=admin, body=msgspec.json.encode({"name": "bench-api"})
        )
        if status != 201:
            raise SystemExit(f"POST /register: {status} {data[:200]!r}")
        auth = f"Authorization: Bearer {msgspec.json.decode(data)['api_key']}\r\n".encode()
        per_client = max(1, requests // concurrency)
        scope_url = base_url if database_url else None  # neither: every process by command line

        async def send(path: str, expected: int, count: int) -> None:
            for _ in range(count):
                status, data = await pool.request("GET", path, auth=auth)
                if status != expected:
                    raise SystemExit(f"GET {path}: {status} {data[:200]!r}")

        for round_no in (1, 2):
            for path, expected in endpoints:
                await asyncio.gather(*(send(path, expected, WARMUP_PER_CLIENT) for _ in range(concurrency)))
                before, started = take(None, database_url, scope_url), time.perf_counter()
                await asyncio.gather(*(send(path, expected, per_client) for _ in range(concurrency)))
                elapsed, after = time.perf_counter() - started, take(None, database_url, scope_url)
                sent = per_client * concurrency
                used = per_order(before, after, sent)["cpu_s"]
                api_us = 1e6 * used.get("api", 0.0) / sent
                pg_us = 1e6 * used.get("postgres", 0.0) / sent
                print(
                    f"round {round_no}  GET {path:22s} api {api_us:6.0f} µs/request  "
                    f"PostgreSQL {pg_us:5.0f} µs/request  {sent / elapsed:6.0f} requests/s",
                    flush=True,
                )
    finally:
        pool.close()


def _endpoint(spec: str) -> tuple[str, int]:
    path, _, status = spec.rpartition(":")
    if not path.startswith("/") or not status.isdigit():
        raise argparse.ArgumentTypeError(f"expected PATH:STATUS, e.g. /balance:200, not {spec!r}")
    return path, int(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--admin-key", required=True)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("EXCHANGE_DATABASE_URL"),
        help="the exchange's database, whose backends are its PostgreSQL (default EXCHANGE_DATABASE_URL)",
    )
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--endpoint",
        action="append",
        type=_endpoint,
        help="GET PATH that must answer STATUS, as PATH:STATUS (repeatable; default: the three above)",
    )
    args = parser.parse_args()
    endpoints = tuple(args.endpoint) if args.endpoint else ENDPOINTS
    if not args.database_url:
        print("bench_api: no --database-url: every api and PostgreSQL process of the machine counts", flush=True)
    asyncio.run(measure(args.base_url, args.admin_key, args.requests, args.concurrency, endpoints, args.database_url))


if __name__ == "__main__":
    main()

# ruff: noqa: S311  (seeded pseudo-random traffic, not cryptography)
"""``exchange bench`` / ``python -m ops.bench``: arguments and orchestration.

1. Setup (not measured): start the webhook receiver, register the brokers (with webhook URLs pointing at it
   unless ``--receiver-port 0``), seed every book with ``--prefill`` passive orders a side.
2. Run: fork the sender workers, each with the brokers ``b % workers == index`` and their part of the schedule
   (open loop) or ``C / workers`` clients (``--closed-loop C``); all start at the same monotonic instant.
3. Wait for late webhooks (``--webhook-grace``), read back the fills the exchange made in the run from each
   broker's ``GET /events`` (:mod:`ops.bench.fills`: a fill whose webhook has not come by then makes the run
   invalid), optionally run the pgbench ceiling (``--ceiling``), print the summary and write the JSON (``--json``).

Only stdlib imports at module level (and :mod:`exchange.config`, itself stdlib-only): ``exchange --help`` imports
this module to build its parser.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
from typing import Any

from exchange.config import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, Settings  # stdlib-only: cheap for `--help`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="exchange api (http:// only)")
    parser.add_argument("--admin-key", help="admin Bearer key for POST /register (default EXCHANGE_ADMIN_API_KEY)")
    parser.add_argument("--scale", type=float, default=100.0, help="percent of B3's traffic (default 100)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (default 20)")
    parser.add_argument(
        "--closed-loop", type=int, default=0, metavar="C", help="instead of the schedule: C orders in flight"
    )
    parser.add_argument("--json", metavar="PATH", help="write the full report as JSON here")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the schedule (default 1)")
    parser.add_argument("--workers", type=int, default=0, help="sender processes (default: from the rate)")
    parser.add_argument(
        "--receiver-port",
        type=int,
        default=-1,
        help="webhook receiver port; 0 = no receiver, no webhook URLs (default: a free port)",
    )
    parser.add_argument("--prefill", type=int, default=2, help="passive orders per side per symbol in setup")
    # Open loop: a server that stalls for 2 s at --scale 100 has ~2,600 requests in flight. Below that, the senders
    # wait for their own connections (schedule lag: the run is INVALID) where the load should keep arriving.
    parser.add_argument(
        "--connections", type=int, default=1024, help="max connections per sender process (default 1024)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, s (default 10)")
    parser.add_argument("--webhook-grace", type=float, default=5.0, help="max s to wait for late webhooks")
    parser.add_argument("--symbol-prefix", help="4-letter symbol prefix (default: random, fresh books)")
    parser.add_argument("--ceiling", action="store_true", help="also run pgbench 1-row INSERT; print the ratio")
    parser.add_argument(
        "--pg-url",
        default=None,
        help="Postgres for --ceiling: a scratch database is made on its server (default: --database-url's server, "
        "the exchange's own)",
    )
    parser.add_argument("--ceiling-duration", type=int, default=0, help="pgbench seconds (default: --duration)")
    parser.add_argument("--strict", action="store_true", help="exit 3 when the run is INVALID")
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="nice value of the senders and the receiver, each in a scheduling group of its own, so that on a "
        "machine the server saturates they do not wait for a core (needs root or CAP_SYS_NICE; 0 = leave them; "
        "default -10)",
    )
    parser.add_argument(
        "--server-stats",
        action="store_true",
        help="for an exchange of this project on this machine: Redis commands, PostgreSQL transactions and CPU "
        "seconds by process kind over the run, per accepted order",
    )
    # Defaults resolved in run(), from the settings (the environment over .env), as the admin key's: a default
    # read here from os.environ alone would miss .env and point --ceiling at another server than the exchange's.
    parser.add_argument(
        "--redis-url",
        default=None,
        help=f"the exchange's Redis for --server-stats (default EXCHANGE_REDIS_URL, from the environment or .env, "
        f"else {DEFAULT_REDIS_URL})",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="the exchange's database for --server-stats and --ceiling (default EXCHANGE_DATABASE_URL, from the "
        f"environment or .env, else {DEFAULT_DATABASE_URL})",
    )


def resolve_defaults(args: argparse.Namespace, settings: Settings) -> None:
    """Fill the URL arguments left unset from ``settings`` (the exchange's own: environment over ``.env``)."""
    if not args.database_url:
        args.database_url = settings.database_url
    if not args.redis_url:
        args.redis_url = settings.redis_url


def ceiling_server(args: argparse.Namespace) -> str:
    """Where ``--ceiling``'s pgbench runs: ``--pg-url``, else the server of ``--database-url`` (the exchange's own,
    as the ratio needs), through its maintenance database."""
    from exchange.db.urls import libpq_url, with_database

    return str(args.pg_url or with_database(libpq_url(args.database_url), "postgres"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def auto_workers(requests_per_s: float, closed_loop: int) -> int:
    if closed_loop:
        return max(1, min(4, math.ceil(closed_loop / 16)))
    return max(1, min(8, math.ceil(requests_per_s / 600.0)))


async def _setup(
    base_url: str,
    admin_key: str,
    brokers: int,
    receiver_port: int,
    prefill: list[Any],
    before: list[Any],
    model: Any,
    timeout: float,
) -> tuple[dict[int, bytes], dict[int, tuple[int, str]], dict[int, list[str]], dict[str, Any]]:
    """Register the brokers, place the prefill and the orders of before the run (``before``: the run cancels them);
    returns each broker's auth header line, each placed order of ``before`` as ``order_no -> (broker, id)``, the
    ids of every order placed, by broker, and what the setup did."""
    import asyncio

    import msgspec

    from ops.bench.http import Pool
    from ops.bench.runner import order_body

    pool = Pool(base_url, timeout_s=timeout, max_connections=64)
    admin = f"Authorization: Bearer {admin_key}\r\n".encode()
    run_tag = f"{int(time.time())}-{os.getpid()}"
    limit = asyncio.Semaphore(64)
    auth: dict[int, bytes] = {}

    async def register(i: int) -> None:
        body: dict[str, Any] = {"name": f"bench-{run_tag}-{i}"}
        if receiver_port:
            body["webhook_url"] = f"http://127.0.0.1:{receiver_port}/hook/{i}"
        async with limit:
            status, data = await pool.request("POST", "/register", auth=admin, body=msgspec.json.encode(body))
        if status not in (200, 201):
            raise RuntimeError(f"POST /register -> {status} {data[:300]!r}")
        key = msgspec.json.decode(data)["api_key"]
        auth[i] = f"Authorization: Bearer {key}\r\n".encode()

    started = time.monotonic()
    await asyncio.gather(*(register(i) for i in range(brokers)))
    registered_s = time.monotonic() - started
    statuses: dict[str, int] = {}

    placed: dict[int, tuple[int, str]] = {}
    known: dict[int, list[str]] = {}

    async def place(event: Any) -> None:
        async with limit:
            status, data = await pool.request("POST", "/orders", auth=auth[event.broker], body=order_body(model, event))
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if 200 <= status < 300:
            doc = msgspec.json.decode(data)
            oid = str(doc.get("order_id", doc.get("id")))
            known.setdefault(event.broker, []).append(oid)
            if event.order_no < -1:
                placed[event.order_no] = (event.broker, oid)

    started = time.monotonic()
    await asyncio.gather(*(place(e) for e in [*prefill, *before]))
    pool.close()
    info = {
        "brokers_registered": len(auth),
        "register_s": round(registered_s, 2),
        "prefill_orders": len(prefill),
        "orders_before_the_run": len(before),
        "prefill_statuses": statuses,
        "prefill_s": round(time.monotonic() - started, 2),
    }
    return auth, placed, known, info


MACHINE_WAKEUPS = 2000
MACHINE_CHUNK_ADDITIONS = 300_000


def machine_figures() -> dict[str, Any]:
    """What this machine is like when the run starts (``ops.cpu_steadiness``'s two figures, briefly): its CPUs, the
    median cross-process wake-up round trip, and the fastest of five 300,000-addition chunks of interpreter work.
    Runs on different machines (or in a slow spell of one) differ by these before they differ by the code."""
    from ops.cpu_steadiness import chunk, wakeup_round_trip_s

    return {
        "cpus": os.cpu_count(),
        "wakeup_round_trip_us": round(wakeup_round_trip_s(MACHINE_WAKEUPS) * 1e6, 1),
        "chunk_ms": round(min(chunk(MACHINE_CHUNK_ADDITIONS) for _ in range(5)) * 1000, 2),
    }


def run(args: argparse.Namespace, settings: Settings | None = None) -> int:
    import asyncio
    import json
    import multiprocessing
    import random
    from collections import Counter

    from ops.bench import model as m
    from ops.bench import server_stats, stages
    from ops.bench.ceiling import run_pgbench
    from ops.bench.fills import fetch_fills
    from ops.bench.http import HttpError
    from ops.bench.receiver import ReceiverResult, receiver_main
    from ops.bench.report import build_report, render
    from ops.bench.runner import WorkerConfig, WorkerResult, worker_main

    settings = settings or Settings.from_env()
    resolve_defaults(args, settings)
    admin_key = args.admin_key or settings.admin_api_key
    if not admin_key:
        print("exchange bench: --admin-key (or EXCHANGE_ADMIN_API_KEY) is required", file=sys.stderr)
        return 2
    if args.duration <= 0 or args.scale <= 0 or args.closed_loop < 0:
        print("exchange bench: --duration and --scale must be > 0, --closed-loop >= 0", file=sys.stderr)
        return 2
    closed = args.closed_loop > 0
    machine = machine_figures()
    prefix = (args.symbol_prefix or m.symbol_prefix(random.Random())).upper()[:4]
    model = m.build_model(args.scale, args.seed, prefix)
    before, schedule = m.pre_run([] if closed else m.build_schedule(model, args.duration, args.seed))
    workers = args.workers or auto_workers(model.requests_per_s, args.closed_loop)
    if closed:
        workers = min(workers, args.closed_loop, model.brokers)
    scheduled = Counter(m.KIND_ENDPOINT[e.kind] for e in schedule)
    print(
        f"bench: {'closed loop C=' + str(args.closed_loop) if closed else 'open loop'}, scale {args.scale}%: "
        f"{len(model.symbols)} symbols ({prefix}…), {model.brokers} brokers, "
        f"{len(schedule)} scheduled requests ({model.requests_per_s:.0f}/s nominal), {workers} sender processes",
        flush=True,
    )

    ctx = multiprocessing.get_context("fork")
    receiver_port = free_port() if args.receiver_port < 0 else args.receiver_port
    receiver_proc = None
    since = ctx.RawValue("d", time.time() + 3600.0)  # nothing is timed until the run starts
    progress = ctx.RawValue("q", 0)
    stop = ctx.Event()
    receiver_queue = ctx.Queue()
    if receiver_port:
        ready = ctx.Event()
        receiver_proc = ctx.Process(
            target=receiver_main,
            args=(receiver_port, since, stop, ready, receiver_queue, progress, args.nice),
            name="bench-receiver",
            daemon=True,
        )
        receiver_proc.start()
        if not ready.wait(10):
            print("exchange bench: webhook receiver did not start", file=sys.stderr)
            receiver_proc.kill()
            return 1

    procs: list[Any] = []
    try:
        prefill = m.prefill_orders(model, args.prefill, args.seed) if args.prefill > 0 else []
        print(
            f"bench: setup: registering {model.brokers} brokers, {len(prefill)} prefill orders, {len(before)} orders "
            "of the minutes before the run that it cancels",
            flush=True,
        )
        auth, placed_before, known_before, setup = asyncio.run(
            _setup(args.base_url, admin_key, model.brokers, receiver_port, prefill, before, model, args.timeout)
        )
        print(f"bench: setup done {setup}", flush=True)

        parts = m.partition(schedule, workers)
        t0 = time.monotonic() + 1.0 + 0.1 * workers
        since.value = time.time() + (t0 - time.monotonic())
        queue = ctx.Queue()
        for w in range(workers):
            mine = [b for b in range(model.brokers) if b % workers == w]
            clients = args.closed_loop // workers + (1 if w < args.closed_loop % workers else 0) if closed else 0
            cfg = WorkerConfig(
                index=w,
                base_url=args.base_url,
                auth=auth,
                model=model,
                events=parts[w],
                t0=t0,
                duration_s=args.duration,
                timeout_s=args.timeout,
                seed=args.seed,
                warm_connections=max(2, math.ceil(model.requests_per_s / workers * 0.01)),
                max_connections=args.connections,
                closed_loop_clients=clients,
                brokers=mine,
                nice=args.nice,
                placed_before={n: oid for n, (broker, oid) in placed_before.items() if broker % workers == w},
                known_before={b: ids for b, ids in known_before.items() if b % workers == w},
            )
            proc = ctx.Process(target=worker_main, args=(cfg, queue), name=f"bench-sender-{w}", daemon=True)
            proc.start()
            procs.append(proc)
        print(f"bench: running for {args.duration:.0f} s …", flush=True)
        stats_before = None
        if args.server_stats:
            time.sleep(max(0.0, t0 - time.monotonic()))
            stats_before = server_stats.take(args.redis_url, args.database_url, args.base_url)
        results: list[WorkerResult] = []
        deadline = time.monotonic() + args.duration + args.timeout + 60.0
        for _ in procs:
            item = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            if isinstance(item, str):
                raise RuntimeError(item)
            results.append(item)
        for proc in procs:
            proc.join(10)

        receiver: ReceiverResult | None = None
        if receiver_proc is not None:
            last, quiet_since, grace_end = progress.value, time.monotonic(), time.monotonic() + args.webhook_grace
            while time.monotonic() < grace_end and time.monotonic() - quiet_since < 1.0:
                time.sleep(0.2)
                if progress.value != last:
                    last, quiet_since = progress.value, time.monotonic()
            stop.set()
            receiver = receiver_queue.get(timeout=30)
            receiver_proc.join(10)
        stats_after = None
        if stats_before is not None:
            stats_after = server_stats.take(args.redis_url, args.database_url, args.base_url)
        fills_made: dict[str, str] | None = None
        fills_error: str | None = None
        if receiver is not None:  # after the server's snapshot: these reads are not the run's work
            try:
                fills_made = asyncio.run(fetch_fills(args.base_url, auth, since.value, timeout_s=args.timeout))
            except (OSError, RuntimeError, TimeoutError, HttpError, ValueError, KeyError) as exc:
                fills_error = f"{exc.__class__.__name__}: {exc}"

        config = {
            "base_url": args.base_url,
            "scale": args.scale,
            "duration_s": args.duration,
            "closed_loop": args.closed_loop,
            "seed": args.seed,
            "workers": workers,
            "receiver_port": receiver_port,
            "prefill": args.prefill,
            "symbol_prefix": prefix,
            "timeout_s": args.timeout,
            "connections_per_worker": args.connections,
        }
        report = build_report(
            mode="closed_loop" if closed else "open_loop",
            config=config,
            model=model,
            scheduled=dict(scheduled),
            duration_s=args.duration,
            results=results,
            receiver=receiver,
            setup=setup,
            fills_made=fills_made,
            fills_error=fills_error,
        )
        report["machine"] = machine
        if stats_before is not None and stats_after is not None:
            report["server_stats"] = server_stats.per_order(stats_before, stats_after, report["accepted_orders"])
            report["order_stages"] = stages.order_stages(args.database_url, [t for r in results for t in r.order_times])
        if args.ceiling:
            clients = args.closed_loop if closed else max(1, report["connections"]["peak_open"])
            seconds = args.ceiling_duration or max(1, round(args.duration))
            print(f"bench: ceiling: pgbench 1-row INSERT, {clients} clients, {seconds} s …", flush=True)
            ceiling = run_pgbench(ceiling_server(args), clients, seconds)
            tps = ceiling.get("pgbench_tps")
            ceiling["ratio"] = round(report["accepted_orders_per_s"] / tps, 4) if tps else None
            report["ceiling"] = ceiling
        print(render(report), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=2, sort_keys=False)
            print(f"bench: JSON written to {args.json}", flush=True)
        return 3 if args.strict and not report["valid"] else 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if receiver_proc is not None and receiver_proc.is_alive():
            stop.set()
            receiver_proc.join(5)
            if receiver_proc.is_alive():
                receiver_proc.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KeyboardInterrupt:
        return 130

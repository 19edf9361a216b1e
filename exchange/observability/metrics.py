"""Every Prometheus metric of the exchange, by name, plus the exposition helpers (``prometheus-client``).

Where each metric is updated and served:

=============================================  ==============  ====================================================
metric                                         updated by      served by
=============================================  ==============  ====================================================
``exchange_http_requests_total``               api             api ``/metrics`` (multiprocess: all gunicorn workers)
``exchange_http_request_duration_seconds``     api             api ``/metrics``
``exchange_orders_accepted_total``             api             api ``/metrics``
``exchange_pending_commands``                  api, at scrape  api ``/metrics`` (read from Postgres per scrape)
``exchange_oldest_pending_command_age_seconds``  api, at scrape  api ``/metrics``
``exchange_queue_messages``                    api, at scrape  api ``/metrics`` (read from Redis per scrape)
``exchange_match_batch_size``                  matcher         matcher's metrics port (``EXCHANGE_METRICS_PORT``)
``exchange_match_batch_duration_seconds``      matcher         matcher's metrics port
``exchange_match_symbols_per_transaction``     matcher         matcher's metrics port
``exchange_match_trades_total``                matcher         matcher's metrics port
``exchange_book_rebuilds_total``               matcher         matcher's metrics port
``exchange_match_symbol_failures_total``       matcher         matcher's metrics port
``exchange_webhook_deliveries_total``          webhooks        webhook worker's metrics port
``exchange_webhook_delivery_duration_seconds`` webhooks        webhook worker's metrics port
``exchange_sweeper_renudges_total``            sweeper         sweeper's metrics port
``exchange_sweeper_expiries_total``            sweeper         sweeper's metrics port
``exchange_sweeper_webhook_attempts_deleted_total``  sweeper    sweeper's metrics port
``exchange_gc_pause_seconds``                  api, matcher,   each one's endpoint above
                                               webhooks
``exchange_database_errors_total``             api, matcher,   each one's endpoint above
                                               webhooks,
                                               sweeper
=============================================  ==============  ====================================================

The api runs several gunicorn workers, so it uses prometheus-client's multiprocess mode: ``gunicorn.conf.py``
points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before any worker starts and marks dead workers, and
``/metrics`` aggregates every worker's files. Workers (matcher, webhooks, sweeper) are one process each and serve
their own registry on ``EXCHANGE_METRICS_BIND:EXCHANGE_METRICS_PORT`` (0 = no endpoint).

Each process kind serves the families of its rows only (:data:`SERVED_BY`, applied by :func:`process_registry`),
never another kind's at a permanent zero.

Label values are bounded sets (route templates, not raw paths; outcomes; queue names; SQLSTATEs), never ids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

M = TypeVar("M", Counter, Histogram)


class LabelCache(Generic[M]):
    """A labelled metric's children by label values (positional, in the metric's label order), each looked up
    once: ``metric.labels(...)`` costs ~4 µs a call on the project's machines (keyword handling and a lock), a dict
    hit ~0.1, and the api updates three labelled metrics per order. Holds no more children than the metric
    itself keeps (label values are bounded sets, see above)."""

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST.split("; charset")[0]
"""Without the charset: Litestar appends ``charset=utf-8`` to text media types itself."""

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)

# ------------------------------------------------------------------------------------------------------ api

HTTP_REQUESTS = Counter(
    "exchange_http_requests_total", "HTTP requests answered by the api.", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "exchange_http_request_duration_seconds",
    "Time from request start to response end in the api.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
ORDERS_ACCEPTED = Counter(
    "exchange_orders_accepted_total",
    "Orders durably accepted (201 for a new order; idempotent replays are not counted).",
    ["order_type", "side"],
)

# -------------------------------------------------------------------------------------------------- matcher

MATCH_BATCH_SIZE = Histogram(
    "exchange_match_batch_size", "Commands applied per matcher transaction.", buckets=_BATCH_BUCKETS
)
MATCH_BATCH_LATENCY = Histogram(
    "exchange_match_batch_duration_seconds",
    "Duration of one matcher transaction that applied a command or closed expired orders (lock to commit).",
    buckets=_LATENCY_BUCKETS,
)
MATCH_SYMBOLS = Histogram(
    "exchange_match_symbols_per_transaction",
    "Books changed per matcher transaction (commands applied, or a share of an expiry backlog closed).",
    buckets=(1, 2, 4, 8, 16, 32),
)
MATCH_TRADES = Counter("exchange_match_trades_total", "Trades written by the matcher.")
BOOK_REBUILDS = Counter(
    "exchange_book_rebuilds_total", "Books rebuilt from Postgres because the cached version was missing or stale."
)

MATCH_SYMBOL_FAILURES = Counter(
    "exchange_match_symbol_failures_total",
    "Books whose processing failed on their own (a book that cannot be rebuilt, a bug, a database error the "
    "database's next answer did not repeat): the rest of the partition went on, the book is retried after a backoff.",
)

# ------------------------------------------------------------------------------------------------- webhooks

WEBHOOK_DELIVERIES = Counter(
    "exchange_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered, retry (failed, will retry), failed (gave up), skipped, "
    "superseded (failed, but the event was redelivered or claimed again since: not failed nor retried by it).",
    ["outcome"],
)
WEBHOOK_LATENCY = Histogram(
    "exchange_webhook_delivery_duration_seconds",
    "Duration of one webhook HTTP attempt, by outcome.",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
)


_webhook_deliveries = LabelCache(WEBHOOK_DELIVERIES)
_webhook_latency = LabelCache(WEBHOOK_LATENCY)


def record_webhook_delivery(outcome: str, seconds: float | None = None) -> None:
    """Count one webhook attempt (``outcome``: delivered | retry | failed | skipped | superseded) and its duration."""
    _webhook_deliveries(outcome).inc()
    if seconds is not None:
        _webhook_latency(outcome).observe(seconds)


# -------------------------------------------------------------------------------------------------- sweeper

SWEEPER_RENUDGES = Counter("exchange_sweeper_renudges_total", "Symbols re-woken by the sweeper (stale commands).")
SWEEPER_EXPIRIES = Counter("exchange_sweeper_expiries_total", "Expire commands logged by the sweeper.")
SWEEPER_ATTEMPTS_DELETED = Counter(
    "exchange_sweeper_webhook_attempts_deleted_total",
    "Webhook delivery attempts the sweeper deleted, older than EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS.",
)

# ------------------------------------------------------------------------------------------- every process

GC_PAUSE = Histogram(
    "exchange_gc_pause_seconds",
    "Duration of one collection of Python's cyclic garbage collector (the process stands still), by generation.",
    ["generation"],
    # Up to seconds: a full collection over a matcher's books without its keeper took 0.1-1.3 s (ops.bench_heap).
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
_gc_pause = LabelCache(GC_PAUSE)
for _generation in ("0", "1", "2"):  # exported from the start, at zero, so that a dashboard sees all three
    _gc_pause(_generation)


def observe_gc_pause(generation: int, seconds: float) -> None:
    """``exchange.heap.settle``'s ``on_pause`` in the servers."""
    _gc_pause(str(generation)).observe(seconds)


DATABASE_ERRORS = Counter(
    "exchange_database_errors_total",
    "Errors this process's database pools met, a statement's or a connect's, by SQLSTATE ('client' for the client's "
    "own, such as a lost or refused connection): 53100 a full disk, 08xxx and 57P0x the server or pgbouncer gone, "
    "53300 too many connections, 40P01 a deadlock, 22xxx/23xxx bad data.",
    ["sqlstate"],
)
_database_errors = LabelCache(DATABASE_ERRORS)
for _sqlstate in ("client", "53100", "08P01", "57P01"):  # exported at zero: an alert sees the first one rise
    _database_errors(_sqlstate)


def count_database_error(sqlstate: str) -> None:
    """One error a database pool met (:func:`exchange.db.engines.statement_failed`, ``connect_failed``); ``sqlstate``
    empty: the client library's own failure, labelled ``client``."""
    _database_errors(sqlstate or "client").inc()


# --------------------------------------------------------------------------------------- scrape-time gauges


class _ScrapeState:
    """A collector of values read at scrape time (plain metric families: no per-process files, no ``pid``)."""

    def __init__(self, families: list[GaugeMetricFamily]) -> None:
        self._families = families

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families


def state_registry(
    pending: Iterable[tuple[int, int, float]], queues: Iterable[tuple[str, str, int]]
) -> CollectorRegistry:
    """A throw-away registry with the gauges read at scrape time.

    ``pending``: (partition, pending commands, oldest age in seconds); ``queues``: (queue, state, messages). They
    are read fresh from Postgres/Redis by the scraping worker, so no worker ever serves another's stale value.
    """
    commands = GaugeMetricFamily(
        "exchange_pending_commands", "Unprocessed commands per matching partition.", labels=["partition"]
    )
    age = GaugeMetricFamily(
        "exchange_oldest_pending_command_age_seconds",
        "Age of the oldest unprocessed command per matching partition (0 when none).",
        labels=["partition"],
    )
    depth = GaugeMetricFamily(
        "exchange_queue_messages",
        "Messages in a dramatiq queue by state: ready, delayed, dead (dead-letter).",
        labels=["queue", "state"],
    )
    for partition, count, oldest in pending:
        commands.add_metric([str(partition)], count)
        age.add_metric([str(partition)], oldest)
    for queue, state, messages in queues:
        depth.add_metric([queue, state], messages)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ScrapeState([commands, age, depth]))
    return registry


# ------------------------------------------------------------------------------------------------ exposition


KINDS = ("api", "matcher", "webhooks", "sweeper")
_EVERY_SERVER = frozenset({"api", "matcher", "webhooks"})
SERVED_BY: dict[str, frozenset[str]] = {
    "exchange_http_requests": frozenset({"api"}),
    "exchange_http_request_duration_seconds": frozenset({"api"}),
    "exchange_orders_accepted": frozenset({"api"}),
    "exchange_match_batch_size": frozenset({"matcher"}),
    "exchange_match_batch_duration_seconds": frozenset({"matcher"}),
    "exchange_match_symbols_per_transaction": frozenset({"matcher"}),
    "exchange_match_trades": frozenset({"matcher"}),
    "exchange_book_rebuilds": frozenset({"matcher"}),
    "exchange_match_symbol_failures": frozenset({"matcher"}),
    "exchange_webhook_deliveries": frozenset({"webhooks"}),
    "exchange_webhook_delivery_duration_seconds": frozenset({"webhooks"}),
    "exchange_sweeper_renudges": frozenset({"sweeper"}),
    "exchange_sweeper_expiries": frozenset({"sweeper"}),
    "exchange_sweeper_webhook_attempts_deleted": frozenset({"sweeper"}),
    "exchange_gc_pause_seconds": _EVERY_SERVER,
    "exchange_database_errors": frozenset(KINDS),
}
"""The module docstring's table, by family name (a counter's without ``_total``): which process kinds serve it."""


class _Served:
    """The families of ``source`` that process kind ``kind`` serves (:data:`SERVED_BY`), and every family that is not
    the exchange's (prometheus-client's ``process_``/``python_`` ones).

    Why a view rather than registering each family in its own kinds only: every module that defines or updates
    metrics is imported by several process kinds, and in multiprocess mode (the api) an unlabelled metric writes its
    file, so is exported, as soon as it is constructed. The view keeps each process's exposition to what it
    updates: no family of another kind at a permanent 0."""

    def __init__(self, source: CollectorRegistry | multiprocess.MultiProcessCollector, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown process kind {kind!r}; one of {', '.join(KINDS)}")
        self._source = source
        self._kind = kind

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            name = family.name.removesuffix("_total")
            if not name.startswith("exchange_") or self._kind in SERVED_BY.get(name, ()):
                yield family


def process_registry(kind: str = "api") -> CollectorRegistry:
    """The metrics process kind ``kind`` serves (:data:`SERVED_BY`): this process's, or every api worker's when
    ``PROMETHEUS_MULTIPROC_DIR`` is set."""
    source: CollectorRegistry | multiprocess.MultiProcessCollector = REGISTRY
    if os.environ.get(MULTIPROC_ENV):
        source = multiprocess.MultiProcessCollector(None)  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Served(source, kind))
    return registry


def exposition(*extra: CollectorRegistry) -> bytes:
    """The text exposition of the api's :func:`process_registry` followed by ``extra`` registries."""
    return b"".join(generate_latest(r) for r in (process_registry("api"), *extra))


def start_worker_metrics_server(kind: str, port: int, bind: str = "127.0.0.1") -> bool:
    """Serve the metrics of this worker, of process kind ``kind``, on ``bind:port`` (a daemon thread). False when
    disabled (port 0) or when the port is taken (logged: metrics must never stop a matcher from matching)."""
    if port <= 0:
        return False
    try:
        start_http_server(port, addr=bind, registry=process_registry(kind))
    except OSError as exc:
        log.warning("metrics endpoint %s:%d not started: %s", bind, port, exc)
        return False
    log.info("metrics on http://%s:%d/metrics", bind, port)
    return True

"""Matcher actors: one dramatiq actor per partition queue ``matching.<n>`` (run with ``exchange matcher``).

A message only says "this symbol has work"; the actor drains the symbol's command log under its advisory lock.
A duplicate, late or lost message is harmless: a duplicate finds nothing pending, a lost one is re-sent by the
sweeper. After each committed batch the actor publishes the changed orders to waiting api workers.
"""

from __future__ import annotations

import logging
import os
import time

import dramatiq
import redis

from exchange.config import Settings
from exchange.db.engines import pooled_engine
from exchange.matching.service import BatchResult, BookCache, process_symbol
from exchange.messaging.broker import make_broker
from exchange.messaging.partitions import matching_actor, matching_queue
from exchange.messaging.results import publish_results
from exchange.messaging.wakeups import clear_wakeup
from exchange.observability import metrics
from exchange.observability.logs import configure_logging
from exchange.webhooks.queue import enqueue_deliveries

log = logging.getLogger("exchange.matcher")

settings = Settings.from_env()
configure_logging("matcher", level=settings.log_level, fmt=settings.log_format, replace=True)
metrics.start_worker_metrics_server(settings.metrics_port, settings.metrics_bind)
broker = make_broker(settings.redis_url, settings.partitions)
# One connection per dramatiq thread (each may hold one symbol's lock) plus a spare for the one in rollback.
_threads = int(os.environ.get("EXCHANGE_MATCHER_THREADS", "1"))
_engine = pooled_engine(settings.pooled_database_url, pool_size=_threads + 1, max_overflow=1)
_redis = redis.Redis.from_url(settings.redis_url)
_cache = BookCache()


def _after_commit(result: BatchResult, seconds: float) -> None:
    if result.order_ids:
        publish_results(_redis, result.order_ids)
    if result.event_ids:
        try:
            enqueue_deliveries(broker, result.event_ids)
        except Exception:
            # The events are committed: the sweeper re-enqueues undelivered ones, so this only costs a delay.
            log.warning("could not enqueue %d webhook deliveries", len(result.event_ids), exc_info=True)
    if result.rebuilt:
        metrics.BOOK_REBUILDS.inc()
    if result.commands:
        metrics.MATCH_BATCH_SIZE.observe(result.commands)
        metrics.MATCH_BATCH_LATENCY.observe(seconds)
        metrics.MATCH_TRADES.inc(result.trades)
        # order_ids: with coalesced wake-ups a batch spans several requests; logs join on order id exactly.
        log.info(
            "matched symbol=%s commands=%d trades=%d events=%d rebuilt=%s",
            result.symbol,
            result.commands,
            result.trades,
            len(result.event_ids),
            result.rebuilt,
            extra={"symbol": result.symbol, "order_ids": [str(o) for o in result.order_ids]},
        )


def match(symbol: str) -> None:
    """Drain ``symbol``'s pending commands, one bounded batch (one transaction) at a time.

    The wake-up key is cleared once, before the first batch reads the command log (and so before every later
    one): a command committed after any of those reads then finds the key gone and sends a new wake-up (see
    :mod:`exchange.messaging.wakeups`). Clearing it here, not inside the transaction, keeps a Redis round trip
    out of the time the symbol's lock and a pgbouncer server connection are held.
    """
    clear_wakeup(_redis, symbol)
    while True:
        started = time.perf_counter()
        result = process_symbol(_engine, _cache, symbol)
        _after_commit(result, time.perf_counter() - started)
        if not result.more:
            return


# `send_with_options(queue_name=...)` does not route in dramatiq: one actor per partition queue does.
actors = [
    dramatiq.actor(actor_name=matching_actor(n), queue_name=matching_queue(n), max_retries=10)(match)
    for n in range(settings.partitions)
]

"""Matcher actors: one dramatiq actor per partition queue ``matching.<n>`` (run with ``exchange matcher``).

A message only says "these symbols have work" (``match_<n>(*symbols)``: the api names every symbol of the
partition it woke together, the sweeper one); the actor drains their command logs under their advisory locks,
several books per transaction (:func:`exchange.matching.service.drain`). A duplicate, late or lost message is
harmless: a duplicate finds nothing pending, a lost one is re-sent by the sweeper. After each committed
transaction the actor publishes the changed orders to waiting api workers.
"""

from __future__ import annotations

import logging
import os
import time

import dramatiq
import redis

from exchange.config import Settings
from exchange.db.engines import pooled_engine
from exchange.matching.service import BatchResult, BookCache, drain
from exchange.messaging.broker import make_broker
from exchange.messaging.partitions import matching_actor, matching_queue
from exchange.messaging.results import publish_results
from exchange.messaging.wakeups import clear_wakeups
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


def _after_commit(results: list[BatchResult], seconds: float) -> None:
    """Publish what one transaction (of one or several books) committed; ``seconds`` is its duration."""
    order_ids = [order_id for result in results for order_id in result.order_ids]
    event_ids = [event_id for result in results for event_id in result.event_ids]
    if order_ids:
        publish_results(_redis, order_ids)
    if event_ids:
        try:
            enqueue_deliveries(broker, event_ids)
        except Exception:
            # The events are committed: the sweeper re-enqueues undelivered ones, so this only costs a delay.
            log.warning("could not enqueue %d webhook deliveries", len(event_ids), exc_info=True)
    applied = [result for result in results if result.commands]
    if applied:  # per transaction: its commands, its books, its duration
        metrics.MATCH_BATCH_SIZE.observe(sum(result.commands for result in applied))
        metrics.MATCH_SYMBOLS.observe(len(applied))
        metrics.MATCH_BATCH_LATENCY.observe(seconds)
    for result in results:
        if result.rebuilt:
            metrics.BOOK_REBUILDS.inc()
        if result.commands:
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


def match(*symbols: str) -> None:
    """Drain the pending commands of ``symbols``: bounded batches of up to 32 symbols per transaction, until none
    has a full batch left. A message of one symbol (the sweeper's, or one sent before multi-symbol messages) is the
    same with one symbol.

    The wake-up keys are cleared once, before the first batch reads the command log (and so before every later
    one): a command committed after any of those reads then finds its key gone and sends a new wake-up (see
    :mod:`exchange.messaging.wakeups`). Clearing them here, not inside the transaction, keeps a Redis round trip
    out of the time the symbols' locks and a pgbouncer server connection are held.
    """
    clear_wakeups(_redis, symbols)
    started = time.perf_counter()
    for results in drain(_engine, _cache, symbols):
        _after_commit(results, time.perf_counter() - started)
        started = time.perf_counter()


# `send_with_options(queue_name=...)` does not route in dramatiq: one actor per partition queue does.
actors = [
    dramatiq.actor(actor_name=matching_actor(n), queue_name=matching_queue(n), max_retries=10)(match)
    for n in range(settings.partitions)
]

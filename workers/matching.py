"""Matcher actors: one dramatiq actor per partition queue ``matching.<n>`` (run with ``exchange matcher``).

A message only says "this symbol has work"; the actor drains the symbol's command log under its advisory lock.
A duplicate, late or lost message is harmless: a duplicate finds nothing pending, a lost one is re-sent by the
sweeper. After each committed batch the actor publishes the changed orders to waiting api workers.
"""

from __future__ import annotations

import logging

import dramatiq
import redis

from exchange.config import Settings
from exchange.db.engines import pooled_engine
from exchange.matching.service import BatchResult, BookCache, process_symbol
from exchange.messaging.broker import make_broker
from exchange.messaging.partitions import matching_actor, matching_queue
from exchange.messaging.results import publish_results
from exchange.messaging.wakeups import clear_wakeup

log = logging.getLogger("exchange.matcher")

settings = Settings.from_env()
broker = make_broker(settings.redis_url, settings.partitions)
_engine = pooled_engine(settings.pooled_database_url, pool_size=2, max_overflow=2)
_redis = redis.Redis.from_url(settings.redis_url)
_cache = BookCache()


def _after_commit(result: BatchResult) -> None:
    if result.order_ids:
        publish_results(_redis, result.order_ids)
    if result.commands:
        log.info(
            "matched symbol=%s commands=%d trades=%d events=%d rebuilt=%s",
            result.symbol,
            result.commands,
            result.trades,
            len(result.event_ids),
            result.rebuilt,
        )


def match(symbol: str) -> None:
    """Drain ``symbol``'s pending commands, one bounded batch (one transaction) at a time."""
    while True:
        result = process_symbol(_engine, _cache, symbol, before_read=lambda: clear_wakeup(_redis, symbol))
        _after_commit(result)
        if not result.more:
            return


# `send_with_options(queue_name=...)` does not route in dramatiq: one actor per partition queue does.
actors = [
    dramatiq.actor(actor_name=matching_actor(n), queue_name=matching_queue(n), max_retries=10)(match)
    for n in range(settings.partitions)
]

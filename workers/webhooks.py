"""Webhook delivery actor ``deliver(event_id)`` on queue ``webhooks`` (run with ``exchange webhooks``).

The message only names an event; the actor claims it in Postgres, POSTs it and records the answer
(:class:`exchange.webhooks.delivery.Deliverer`). Retries are delayed re-sends of the same message (or, for long
delays, the sweeper's re-enqueue of overdue events), never dramatiq's own retries: an actor that raises (database
down) leaves the event pending and the sweeper re-enqueues it, so a crash between any two steps only delays it.
Run it with several threads: each thread handles one delivery at a time, and a slow receiver only ever holds
``EXCHANGE_WEBHOOK_MAX_IN_FLIGHT`` of them.
"""

from __future__ import annotations

import logging
import time
from uuid import UUID

import dramatiq

from exchange.config import Settings
from exchange.db.engines import pooled_engine
from exchange.messaging.broker import make_broker
from exchange.messaging.partitions import WEBHOOK_QUEUE
from exchange.observability import metrics
from exchange.observability.logs import configure_logging
from exchange.webhooks.delivery import Deliverer, DeliveryConfig, Outcome
from exchange.webhooks.queue import DELIVER_ACTOR, enqueue_deliveries

# httpx logs every request at INFO: at thousands of deliveries/s that is most of the worker's CPU. Attempts are
# recorded in webhook_attempts instead.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

settings = Settings.from_env()
configure_logging("webhooks", level=settings.log_level, fmt=settings.log_format, replace=True)
metrics.start_worker_metrics_server(settings.metrics_port, settings.metrics_bind)
broker = make_broker(settings.redis_url, settings.partitions)
_engine = pooled_engine(settings.pooled_database_url, pool_size=8, max_overflow=24)


def _reenqueue(event_id: UUID, delay_ms: int) -> None:
    enqueue_deliveries(broker, [event_id], delay_ms=delay_ms)


_deliverer = Deliverer(_engine, DeliveryConfig.from_settings(settings), reenqueue=_reenqueue)


@dramatiq.actor(actor_name=DELIVER_ACTOR, queue_name=WEBHOOK_QUEUE, max_retries=0)
def deliver(event_id: str) -> None:
    """Make at most one delivery attempt of ``event_id`` (a duplicate or early message is a no-op)."""
    started = time.perf_counter()
    result = _deliverer.deliver(UUID(event_id))
    if result.outcome in _COUNTED:
        metrics.record_webhook_delivery(result.outcome.value, time.perf_counter() - started)


# Outcomes that are an attempt (or a decision not to attempt); "not due" and "deferred" are no-ops of a duplicate
# or early message and are not counted.
_COUNTED = frozenset({Outcome.DELIVERED, Outcome.RETRY, Outcome.FAILED, Outcome.SKIPPED})

"""The dramatiq broker (Redis) shared by api, matchers, webhook workers, sweeper and the dashboard."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from exchange.messaging.partitions import WEBHOOK_QUEUE, matching_queue
from exchange.observability.propagation import RequestIdMiddleware


def make_broker(redis_url: str, partitions: int) -> RedisBroker:
    """Create the Redis broker, make it dramatiq's global broker, and declare every queue.

    Declaring all ``matching.<n>`` queues and ``webhooks`` up front lets the dashboard list them before the
    first message. Default middleware plus :class:`RequestIdMiddleware` (request ids in the workers' logs);
    retries of matching messages are pointless (the sweeper re-nudges) but harmless, so they are left to each
    actor's options.
    """
    broker = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]  # dramatiq leaves __init__ untyped
    broker.add_middleware(RequestIdMiddleware())
    for n in range(partitions):
        broker.declare_queue(matching_queue(n))
    broker.declare_queue(WEBHOOK_QUEUE)
    dramatiq.set_broker(broker)
    return broker

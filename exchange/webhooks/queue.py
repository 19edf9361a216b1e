"""Hints on the ``webhooks`` queue: a ``deliver`` message only says "webhook events are due".

The worker that takes one claims due events from Postgres in batches until none is left (see
:mod:`exchange.webhooks.pump`), so duplicates, losses and reordering of hints change when events are delivered,
never whether; the sweeper hints about events left overdue.

Hints are coalesced like matcher wake-ups (:mod:`exchange.messaging.wakeups`): one is sent only when
``SET <due key> NX PX <ttl>`` succeeds, so a burst of commits costs one message. The worker deletes the key
*before* it claims (:func:`clear_hint`): an event committed after that claim started finds the key gone and sends
a new hint, so no committed event is left without one. A lost hint frees the key after ``HINT_TTL_MS``.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from exchange.messaging.partitions import WEBHOOK_QUEUE
from exchange.messaging.wakeups import BrokerLike

DELIVER_ACTOR = "deliver"
HINT_KEY_PREFIX = "exchange:webhooks-due:"
HINT_TTL_MS = 1000


def hint_key(broker: RedisBroker) -> str:
    """The coalescing key of ``broker``'s queues (per dramatiq namespace, so separate setups never share it)."""
    namespace: str = broker.namespace
    return f"{HINT_KEY_PREFIX}{namespace}"


def deliver_message() -> dramatiq.Message[object]:
    return dramatiq.Message(queue_name=WEBHOOK_QUEUE, actor_name=DELIVER_ACTOR, args=(), kwargs={}, options={})


def enqueue_deliveries(broker: BrokerLike, event_ids: Iterable[UUID | str], *, delay_ms: int | None = None) -> int:
    """After the transaction that made ``event_ids`` due committed: send at most ONE hint (none when there are
    no events, or a coalesced hint is already pending). ``delay_ms``: send it that much later, uncoalesced.
    Returns the number of messages sent (0 or 1)."""
    if next(iter(event_ids), None) is None:
        return 0
    if delay_ms is None and isinstance(broker, RedisBroker):
        return send_hint(broker)
    broker.enqueue(deliver_message(), delay=delay_ms)
    return 1


def send_hint(broker: RedisBroker) -> int:
    """Enqueue a ``deliver`` hint unless one is already pending (see the module docstring). Returns 0 or 1."""
    return send_claimed_hint(broker, claim_hint(broker.client, broker))


def claim_hint(target: redis.Redis | redis.client.Pipeline, broker: RedisBroker) -> object:
    """The hint's ``SET NX``: on a client, its reply; on a pipeline (one round trip with whatever else the caller
    sends after its commit), the reply comes from ``execute``. Pass the reply to :func:`send_claimed_hint`."""
    return target.set(hint_key(broker), b"1", nx=True, px=HINT_TTL_MS)


def send_claimed_hint(broker: RedisBroker, claimed: object) -> int:
    """Enqueue the hint when the ``SET NX`` (``claimed``: its reply) took the key; returns the messages sent."""
    if not claimed:
        return 0
    broker.enqueue(deliver_message())
    return 1


def clear_hint(broker: RedisBroker) -> None:
    """Called by the worker for each hint it takes, before its pump claims."""
    client: redis.Redis = broker.client
    client.delete(hint_key(broker))

"""Hints on the ``webhooks`` queue: a ``deliver`` message only says "webhook events are due".

The worker that takes one claims due events from Postgres in batches until none is left (see
:mod:`exchange.webhooks.pump`), so duplicates, losses and reordering of hints change when events are delivered,
never whether; the sweeper hints about events left overdue.

Hints are coalesced like matcher wake-ups (:mod:`exchange.messaging.wakeups`): one is sent only when
``SET <due key> NX PX <ttl>`` succeeds, so a burst of commits costs one message; the ``SET`` and the enqueue are one
script (:class:`~exchange.messaging.broker.Guard`), so a hint costs one round trip, or none of its own in the
matcher's pipeline (:func:`add_hint`), and the key is never set without its message. The worker deletes the key
*before* it claims (:func:`clear_hint`): an event committed after that claim started finds the key gone and sends
a new hint, so no committed event is left without one. A lost hint frees the key after ``HINT_TTL_MS``.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from exchange.messaging.broker import DoorbellRedisBroker, Guard
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
    if delay_ms is None and isinstance(broker, DoorbellRedisBroker):
        return send_hint(broker)
    broker.enqueue(deliver_message(), delay=delay_ms)
    return 1


def send_hint(broker: DoorbellRedisBroker) -> int:
    """Enqueue a ``deliver`` hint unless one is already pending (see the module docstring), in one round trip.
    Returns 0 or 1."""
    with broker.client.pipeline(transaction=False) as pipe:
        hint = add_hint(pipe, broker)
        (reply,) = pipe.execute(raise_on_error=False)
    return int(broker.guarded_sent(hint, reply))


def add_hint(pipe: redis.client.Pipeline, broker: DoorbellRedisBroker) -> dramatiq.Message[object]:
    """Add the coalesced hint to ``pipe`` (the matcher's: one round trip with the results it publishes after its
    commit). Pass what this returns and the script's reply to ``broker.guarded_sent``: whether it was sent (False:
    one was pending)."""
    guard = Guard(set_key=None, members=(), flag=hint_key(broker), ttl_ms=HINT_TTL_MS)
    return broker.add_guarded(pipe, deliver_message(), guard)


def clear_hint(broker: RedisBroker) -> None:
    """Called by the worker for each hint it takes, before its pump claims."""
    client: redis.Redis = broker.client
    client.delete(hint_key(broker))

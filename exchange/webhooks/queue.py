"""Messages of the ``webhooks`` queue: ``deliver(event_id)``, sent without importing the worker module.

A message is only a hint that an event may be due: the deliverer re-reads the event and claims it in Postgres,
so duplicates, losses and reordering change when an event is delivered, never whether.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

import dramatiq

from exchange.messaging.partitions import WEBHOOK_QUEUE
from exchange.messaging.wakeups import BrokerLike

DELIVER_ACTOR = "deliver"


def deliver_message(event_id: UUID | str) -> dramatiq.Message[object]:
    return dramatiq.Message(
        queue_name=WEBHOOK_QUEUE, actor_name=DELIVER_ACTOR, args=(str(event_id),), kwargs={}, options={}
    )


def enqueue_deliveries(broker: BrokerLike, event_ids: Iterable[UUID | str], *, delay_ms: int | None = None) -> int:
    """Send one ``deliver`` message per event (after the events' transaction committed). Returns the count."""
    sent = 0
    for event_id in event_ids:
        broker.enqueue(deliver_message(event_id), delay=delay_ms)
        sent += 1
    return sent

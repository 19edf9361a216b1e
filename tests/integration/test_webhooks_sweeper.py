"""The sweeper re-enqueues webhook events whose message was lost or whose worker died (real Postgres + Redis)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import Engine, text

from exchange.messaging.partitions import WEBHOOK_QUEUE
from exchange.sweeper import sweep_once
from exchange.webhooks.queue import DELIVER_ACTOR
from tests.integration.webhook_support import broker_with_endpoint, events_of, fills


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    """A real Redis broker in a namespace of its own, so concurrent runs never share queues."""
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    namespace = f"exchange-test-{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(url="redis://127.0.0.1:6379/0", namespace=namespace)
    yield broker
    for key in client.scan_iter(f"{namespace}*"):
        client.delete(key)
    broker.close()
    client.close()


def queued_deliveries(broker: RedisBroker) -> list[str]:
    queue = f"{broker.namespace}:{WEBHOOK_QUEUE}"
    bodies = [broker.client.hget(f"{queue}.msgs", i) for i in broker.client.lrange(queue, 0, -1)]
    messages = [json.loads(b) for b in bodies if b]
    assert all(m["actor_name"] == DELIVER_ACTOR for m in messages)
    return [m["args"][0] for m in messages]


def test_the_sweeper_re_enqueues_an_event_overdue_for_longer_than_the_requeue_period(
    engine: Engine, broker: RedisBroker
) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    fills(engine, buyer, seller)
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '1 minute'"))

    result = sweep_once(engine, broker, 4, webhook_requeue_after_s=30)
    again = sweep_once(engine, broker, 4, webhook_requeue_after_s=30)

    ids = {str(e.id) for b in (buyer, seller) for e in events_of(engine, b)}
    assert result.webhooks_requeued == 2
    assert set(queued_deliveries(broker)) == ids
    assert again.webhooks_requeued == 0


def test_the_sweeper_leaves_fresh_and_in_flight_events_alone(engine: Engine, broker: RedisBroker) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    fills(engine, buyer, seller)
    with engine.begin() as conn:  # one just written, one claimed by a worker (lease in the future)
        conn.execute(
            text("UPDATE webhook_events SET next_attempt_at = now() + interval '1 minute' WHERE broker_id = :b"),
            {"b": buyer},
        )

    result = sweep_once(engine, broker, 4, webhook_requeue_after_s=30)

    assert result.webhooks_requeued == 0
    assert queued_deliveries(broker) == []

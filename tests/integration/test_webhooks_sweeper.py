"""The sweeper hints the webhook workers about events whose hint was lost or whose worker died, and hints are
coalesced (real Postgres + Redis)."""

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
from exchange.webhooks.queue import DELIVER_ACTOR, claim_hint, clear_hint, enqueue_deliveries, send_claimed_hint
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


def queued_hints(broker: RedisBroker) -> int:
    """How many ``deliver`` hints wait in the queue (they carry no arguments: a hint names no event)."""
    queue = f"{broker.namespace}:{WEBHOOK_QUEUE}"
    bodies = [broker.client.hget(f"{queue}.msgs", i) for i in broker.client.lrange(queue, 0, -1)]
    messages = [json.loads(b) for b in bodies if b]
    assert all(m["actor_name"] == DELIVER_ACTOR and m["args"] == [] for m in messages)
    return len(messages)


def due_now(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id::text FROM webhook_events WHERE status = 'pending' AND next_attempt_at <= now()")
        )
        return set(rows.scalars())


def test_the_sweeper_makes_an_event_overdue_for_longer_than_the_requeue_period_due_and_hints_once(
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
    assert due_now(engine) == ids
    assert queued_hints(broker) == 1
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
    assert queued_hints(broker) == 0


# ------------------------------------------------------------------------------------------------ hints


def test_hints_are_coalesced_until_a_worker_takes_one(broker: RedisBroker) -> None:
    assert enqueue_deliveries(broker, []) == 0  # no events, no hint
    assert enqueue_deliveries(broker, ["a", "b"]) == 1
    assert enqueue_deliveries(broker, ["c"]) == 0  # one is pending already
    assert queued_hints(broker) == 1

    clear_hint(broker)  # what the worker does when it takes the hint, before its pump claims
    assert enqueue_deliveries(broker, ["d"]) == 1

    assert queued_hints(broker) == 2


def test_a_hint_claimed_in_the_matchers_pipeline_is_coalesced_with_every_other_hint(broker: RedisBroker) -> None:
    def after_commit() -> int:  # what the matcher sends after a commit with events: results and the claim at once
        with broker.client.pipeline(transaction=False) as pipe:
            pipe.publish("exchange:test-results", b"[]")
            claim_hint(pipe, broker)
            claimed = pipe.execute()[-1]
        return send_claimed_hint(broker, claimed)

    assert after_commit() == 1
    assert after_commit() == 0
    assert enqueue_deliveries(broker, ["a"]) == 0  # the matcher's hint is pending: nobody else sends one
    clear_hint(broker)
    assert after_commit() == 1

    assert queued_hints(broker) == 2


def test_a_delayed_hint_is_sent_even_while_one_is_pending(broker: RedisBroker) -> None:
    assert enqueue_deliveries(broker, ["a"]) == 1
    assert enqueue_deliveries(broker, ["b"], delay_ms=60_000) == 1

    assert queued_hints(broker) == 1
    assert broker.client.llen(f"{broker.namespace}:{WEBHOOK_QUEUE}.DQ") == 1  # dramatiq's delay queue

"""The sweeper hints the webhook workers about events whose hint was lost or whose worker died, and hints are
coalesced (real Postgres + Redis)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from exchange.messaging.broker import DoorbellRedisBroker, doorbell_key
from exchange.messaging.partitions import WEBHOOK_QUEUE
from exchange.sweeper import sweep_once
from exchange.webhooks import store
from exchange.webhooks.queue import (
    DELIVER_ACTOR,
    HINT_TTL_MS,
    add_hint,
    enqueue_deliveries,
    hint_key,
    overdue_hint_key,
    ring_key,
)
from tests.integration.redis_support import namespaced_broker
from tests.integration.webhook_support import broker_with_endpoint, events_of, fills


@pytest.fixture
def broker() -> Iterator[DoorbellRedisBroker]:
    """The exchange's Redis broker in a namespace of its own, so concurrent runs never share queues."""
    with namespaced_broker(DoorbellRedisBroker) as broker:
        broker.declare_queue(WEBHOOK_QUEUE)  # its doorbell is deleted afterwards too
        yield broker


def queued_hints(broker: DoorbellRedisBroker) -> int:
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


def test_the_sweeper_hints_once_about_events_overdue_for_longer_than_the_requeue_period(
    engine: Engine, broker: DoorbellRedisBroker
) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    fills(engine, buyer, seller)
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '1 minute'"))

    result = sweep_once(engine, broker, 4, webhook_requeue_after_s=30)
    again = sweep_once(engine, broker, 4, webhook_requeue_after_s=30)

    ids = {str(e.id) for b in (buyer, seller) for e in events_of(engine, b)}
    assert result.webhooks_overdue == 2
    assert due_now(engine) == ids
    assert queued_hints(broker) == 1
    assert again.webhooks_overdue == 0


def test_a_backlog_left_overdue_is_hinted_about_again_once_a_period_passed(
    engine: Engine, broker: DoorbellRedisBroker
) -> None:
    # Every worker dead: one hint per requeue period, not one per sweep.
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    fills(engine, buyer, seller)
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '1 minute'"))
    assert sweep_once(engine, broker, 4, webhook_requeue_after_s=30).webhooks_overdue == 2
    release(broker)  # the hint's own coalescing key expired (1 s): a next hint would be a message
    assert sweep_once(engine, broker, 4, webhook_requeue_after_s=30).webhooks_overdue == 0
    key = overdue_hint_key(broker)
    assert 0 < broker.client.pttl(key) <= 30_000  # the last hint is remembered for a period

    hinted_at = datetime.fromisoformat(broker.client.get(key).decode())
    broker.client.set(key, (hinted_at - timedelta(seconds=30)).isoformat())  # as a period later
    again = sweep_once(engine, broker, 4, webhook_requeue_after_s=30)

    assert again.webhooks_overdue == 2
    assert queued_hints(broker) == 2


def test_an_event_overdue_since_the_last_hint_is_hinted_about_within_the_period(
    engine: Engine, broker: DoorbellRedisBroker
) -> None:
    # A backlog hinted about, then an event whose own hint was lost comes due and stays undelivered for a period.
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    fills(engine, buyer, seller)
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '1 minute'"))
    key = overdue_hint_key(broker)
    assert sweep_once(engine, broker, 4, webhook_requeue_after_s=30).webhooks_overdue == 2
    hinted_at = datetime.fromisoformat(broker.client.get(key).decode())
    broker.client.set(key, (hinted_at - timedelta(seconds=5)).isoformat(), px=25_000)  # as 5 s later
    release(broker)
    fills(engine, buyer, seller)
    with engine.begin() as conn:  # overdue for 1 s: since the hint
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '31 s' WHERE sequence = 2"))

    result = sweep_once(engine, broker, 4, webhook_requeue_after_s=30)

    assert result.webhooks_overdue == 4
    assert queued_hints(broker) == 2


def test_an_event_of_a_worker_that_died_with_it_claimed_is_hinted_about_once_its_lease_is_overdue(
    engine: Engine, broker: DoorbellRedisBroker
) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (claimed,) = store.claim(engine, limit=10, lease_s=60, per_broker=4).claims  # then the worker dies
    assert sweep_once(engine, broker, 4, webhook_requeue_after_s=30).webhooks_overdue == 0  # in flight
    with engine.begin() as conn:  # the lease ended 31 s ago
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '31 s'"))

    result = sweep_once(engine, broker, 4, webhook_requeue_after_s=30)

    assert result.webhooks_overdue == 1
    assert queued_hints(broker) == 1
    (again,) = store.claim(engine, limit=10, lease_s=60, per_broker=4).claims
    assert (again.event_id, again.attempt) == (claimed.event_id, claimed.attempt + 1)


def test_the_sweeper_leaves_fresh_and_in_flight_events_alone(engine: Engine, broker: DoorbellRedisBroker) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    fills(engine, buyer, seller)
    with engine.begin() as conn:  # one just written, one claimed by a worker (lease in the future)
        conn.execute(
            text("UPDATE webhook_events SET next_attempt_at = now() + interval '1 minute' WHERE broker_id = :b"),
            {"b": buyer},
        )

    result = sweep_once(engine, broker, 4, webhook_requeue_after_s=30)

    assert result.webhooks_overdue == 0
    assert queued_hints(broker) == 0


# ------------------------------------------------------------------------------------------------ hints


def release(broker: DoorbellRedisBroker) -> None:
    """What the worker that took the hint does once no ring came for a while (HintHolder)."""
    broker.client.delete(hint_key(broker))


def test_hints_are_coalesced_until_the_key_is_released(broker: DoorbellRedisBroker) -> None:
    assert enqueue_deliveries(broker, []) == 0  # no events, no hint
    assert enqueue_deliveries(broker, ["a", "b"]) == 1
    assert enqueue_deliveries(broker, ["c"]) == 0  # one is pending already
    assert queued_hints(broker) == 1

    release(broker)
    assert enqueue_deliveries(broker, ["d"]) == 1

    assert queued_hints(broker) == 2


def test_a_hint_sent_in_the_matchers_pipeline_is_coalesced_with_every_other_hint(broker: DoorbellRedisBroker) -> None:
    def after_commit() -> int:  # what the matcher sends after a commit with events: results and the hint at once
        with broker.client.pipeline(transaction=False) as pipe:
            pipe.publish("exchange:test-results", b"[]")
            hint = add_hint(pipe, broker)
            replies = pipe.execute(raise_on_error=False)
        assert len(replies) == 2  # the hint is one command of the pipeline: no round trip of its own
        return int(broker.guarded_sent(hint, replies[-1]))

    assert after_commit() == 1
    assert after_commit() == 0
    assert enqueue_deliveries(broker, ["a"]) == 0  # the matcher's hint is pending: nobody else sends one
    release(broker)
    assert after_commit() == 1

    assert queued_hints(broker) == 2


def test_a_hint_sets_its_key_in_the_script_that_queues_it_and_a_refused_one_only_rings(
    broker: DoorbellRedisBroker,
) -> None:
    key, ring = hint_key(broker), ring_key(broker)

    assert enqueue_deliveries(broker, ["a"]) == 1
    ttl = broker.client.pttl(key)
    assert 0 < ttl <= HINT_TTL_MS  # set with its TTL, by the script that queued the hint
    assert broker.client.get(key) == b"1"
    assert not broker.client.exists(ring)
    assert enqueue_deliveries(broker, ["b"]) == 0
    assert enqueue_deliveries(broker, ["c"]) == 0

    assert queued_hints(broker) == 1
    assert broker.client.pttl(key) <= ttl  # a refused hint did not renew the key
    assert broker.client.lrange(ring, 0, -1) == [b"1"]  # it rang the holder, once however many rang
    assert sorted(k.decode() for k in broker.client.scan_iter(f"*{broker.namespace}*")) == sorted(
        [
            key,
            ring,
            f"{broker.namespace}:{WEBHOOK_QUEUE}",
            f"{broker.namespace}:{WEBHOOK_QUEUE}.msgs",
            doorbell_key(broker.namespace, WEBHOOK_QUEUE),
        ]
    )  # no set beside the key: a hint's guard has none


def test_a_delayed_hint_is_sent_even_while_one_is_pending(broker: DoorbellRedisBroker) -> None:
    assert enqueue_deliveries(broker, ["a"]) == 1
    assert enqueue_deliveries(broker, ["b"], delay_ms=60_000) == 1

    assert queued_hints(broker) == 1
    assert broker.client.llen(f"{broker.namespace}:{WEBHOOK_QUEUE}.DQ") == 1  # dramatiq's delay queue


def claim_order(engine: Engine, broker_id: object) -> list[int]:
    """The sequences of ``broker_id``'s due events in the order a delivery worker claims them (one at a time)."""
    by_id = {e.id: e.sequence for e in events_of(engine, broker_id)}
    order: list[int] = []
    while claimed := store.claim(engine, limit=1, lease_s=60, per_broker=4).claims:
        order.extend(by_id[c.event_id] for c in claimed)
    return order


def test_a_sweep_over_a_backlog_leaves_the_claim_oldest_due_first(engine: Engine, broker: DoorbellRedisBroker) -> None:
    # Delivery workers 60 s behind: a broker's 40 events came due one a second, from 60 s to 21 s ago, in sequence
    # order. A sweep (requeue period 30 s: events 1-30 overdue) must not send the overdue ones behind the rest.
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=40)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM webhook_events WHERE broker_id = :s"), {"s": seller})
        conn.execute(
            text("UPDATE webhook_events SET next_attempt_at = now() - interval '61 s' + sequence * interval '1 s'")
        )

    sweep_once(engine, broker, 4, webhook_requeue_after_s=30)

    assert queued_hints(broker) == 1  # the workers were hinted
    assert claim_order(engine, buyer) == list(range(1, 41))

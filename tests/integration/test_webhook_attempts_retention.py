"""The sweeper deletes webhook delivery attempts past ``EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS``, a bounded batch
per sweep, one sweeper at a time, and nothing read from the attempts' table but the logs loses by it (real
Postgres + Redis)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator

import pytest
from dramatiq.brokers.redis import RedisBroker
from prometheus_client import REGISTRY
from sqlalchemy import Engine, text

from exchange.sweeper import ATTEMPTS_RETENTION_LOCK, AttemptsRetention, run_forever, sweep_once
from tests.integration.redis_support import namespaced_broker
from tests.integration.sql_orders import add_broker
from tests.integration.webhook_support import (
    broker_row,
    broker_with_endpoint,
    deliver_until_settled,
    deliverer,
    events_of,
    fills,
)
from tests.webhook_receiver import Receiver

WEEK_H = 168


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    with namespaced_broker(RedisBroker) as broker:
        yield broker


def _an_event(engine: Engine) -> tuple[uuid.UUID, uuid.UUID]:
    """One outbox event of a new broker: (event id, broker id)."""
    broker_id = add_broker(engine, f"ret-{uuid.uuid4().hex[:8]}")
    with engine.begin() as conn:
        event_id = conn.execute(
            text(
                "INSERT INTO webhook_events (broker_id, sequence, type, payload)"
                " VALUES (:b, 1, 'order.fill', '{}') RETURNING id"
            ),
            {"b": broker_id},
        ).scalar_one()
    return event_id, broker_id


def _attempts_aged(engine: Engine, hours_ago: list[int]) -> None:
    """One attempt made ``h`` hours ago for each ``h``, of one event."""
    event_id, broker_id = _an_event(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO webhook_attempts (event_id, broker_id, attempted_at, url, status_code)"
                " SELECT :e, :b, now() - make_interval(secs => h * 3600), 'https://h.example/x', 200"
                " FROM unnest(CAST(:ages AS float8[])) AS h"
            ),
            {"e": event_id, "b": broker_id, "ages": hours_ago},
        )


def _ages_left(engine: Engine) -> list[int]:
    """The attempts' ages in whole hours, oldest first."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT round(extract(epoch FROM now() - attempted_at) / 3600)::int FROM webhook_attempts"
                    " ORDER BY attempted_at"
                )
            ).scalars()
        )


def test_a_sweep_deletes_the_attempts_older_than_the_retention_and_keeps_the_others(
    engine: Engine, broker: RedisBroker
) -> None:
    _attempts_aged(engine, [500, 200, 169, 167, 24, 0])

    result = sweep_once(engine, broker, 1, attempts_retention=AttemptsRetention(WEEK_H))

    assert result.webhook_attempts_deleted == 3
    assert _ages_left(engine) == [167, 24, 0]


def test_a_sweep_deletes_at_most_a_batch_oldest_first_and_the_next_sweeps_catch_up(engine: Engine) -> None:
    _attempts_aged(engine, [900, 800, 700, 600, 500, 400, 300, 2, 1])
    retention = AttemptsRetention(WEEK_H, batch=3)

    first = retention.prune(engine)
    left_after_first = _ages_left(engine)
    rest = [retention.prune(engine) for _ in range(3)]

    assert first == 3
    assert left_after_first == [600, 500, 400, 300, 2, 1]
    assert rest == [3, 1, 0]
    assert _ages_left(engine) == [2, 1]


def test_a_retention_of_0_keeps_every_attempt(engine: Engine, broker: RedisBroker) -> None:
    _attempts_aged(engine, [10 * 365 * 24, 1000, 0])

    result = sweep_once(engine, broker, 1, attempts_retention=AttemptsRetention(0))

    assert result.webhook_attempts_deleted == 0
    assert len(_ages_left(engine)) == 3


def test_a_sweeper_leaves_the_batch_to_another_one_deleting_meanwhile(engine: Engine) -> None:
    _attempts_aged(engine, [500, 400])
    with engine.begin() as other:  # another sweeper, in its batch's transaction
        space, key = ATTEMPTS_RETENTION_LOCK
        other.execute(text("SELECT pg_advisory_xact_lock(:s, :k)"), {"s": space, "k": key})

        assert AttemptsRetention(WEEK_H).prune(engine) == 0

    assert AttemptsRetention(WEEK_H).prune(engine) == 2


def test_the_running_sweeper_counts_the_attempts_it_deleted_in_its_metric(engine: Engine, broker: RedisBroker) -> None:
    _attempts_aged(engine, [300, 200, 1])
    metric = "exchange_sweeper_webhook_attempts_deleted_total"
    before = REGISTRY.get_sample_value(metric) or 0.0
    stop = threading.Event()
    sweeper = threading.Thread(
        target=run_forever, args=(engine, broker, 1), kwargs={"attempts_retention_hours": WEEK_H, "stop": stop}
    )
    sweeper.start()
    try:
        for _ in range(100):
            if (REGISTRY.get_sample_value(metric) or 0.0) - before >= 2:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        sweeper.join(10)

    assert (REGISTRY.get_sample_value(metric) or 0.0) - before == 2
    assert _ages_left(engine) == [1]


def test_deleting_a_failed_events_attempts_keeps_its_state_and_its_endpoints_failures_in_a_row(
    engine: Engine,
) -> None:
    # What the retention relies on: an event's state and its endpoint's failures in a row are not read from attempts.
    with Receiver() as receiver:
        receiver.fail_next(1000)
        buyer, _ = broker_with_endpoint(engine, receiver.url)
        seller, _ = broker_with_endpoint(engine, None)
        d = deliverer(engine, retry_schedule=(0.02,), disable_after=2)
        fills(engine, buyer, seller)
        (first,) = events_of(engine, buyer)
        deliver_until_settled(d, first.id)
        with engine.begin() as conn:
            conn.execute(text("UPDATE webhook_attempts SET attempted_at = attempted_at - interval '1 year'"))

        deleted = AttemptsRetention(WEEK_H).prune(engine)
        (failed,) = events_of(engine, buyer)
        fills(engine, buyer, seller)
        deliver_until_settled(d, events_of(engine, buyer)[1].id)

    assert deleted == 2
    assert (failed.status, failed.attempts, failed.last_error) == ("failed", 2, "HTTP 500")
    row = broker_row(engine, buyer)
    assert (row.webhook_consecutive_failures, row.webhook_enabled) == (2, False)


def test_the_sweeper_logs_when_a_backlog_of_old_attempts_begins_and_when_it_is_caught_up(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    _attempts_aged(engine, [500, 400, 300, 200, 1])
    retention = AttemptsRetention(WEEK_H, batch=2)

    with caplog.at_level(logging.INFO, logger="exchange.sweeper"):
        deleted = [retention.prune(engine) for _ in range(3)]

    assert deleted == [2, 2, 0]
    assert [r.getMessage() for r in caplog.records] == [
        "deleting webhook attempts older than 168 h, 2 per sweep: a backlog",
        "deleted the backlog of webhook attempts older than 168 h: 4",
    ]

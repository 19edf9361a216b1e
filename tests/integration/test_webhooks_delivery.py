"""The delivery service against real PostgreSQL and a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from standardwebhooks.webhooks import Webhook

from exchange.webhooks.delivery import Outcome, take_overdue
from tests.integration.webhook_support import (
    attempts_of,
    broker_row,
    broker_with_endpoint,
    deliver_until_settled,
    deliverer,
    drive,
    events_of,
    fills,
)
from tests.webhook_receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def test_a_delivery_carries_the_stored_payload_and_a_signature_standardwebhooks_verifies(
    engine: Engine, receiver: Receiver
) -> None:
    buyer, secret = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)

    result = deliverer(engine).deliver(event.id)

    assert result.outcome is Outcome.DELIVERED
    (request,) = receiver.received
    assert request.body == event.body.encode()
    payload = Webhook(secret).verify(request.body, request.headers)
    assert payload["event_id"] == str(event.id) == request.headers["webhook-id"]
    assert payload["event"] == "trade_executed"
    assert payload["type"] == "order.fill"
    for field in ("trade_id", "order_id", "symbol", "side", "price", "quantity", "order_remaining_quantity"):
        assert field in payload
    assert payload["executed_at"]
    assert payload["sequence"] == 1
    assert events_of(engine, buyer)[0].status == "delivered"


def test_every_attempt_sends_the_same_bytes_with_a_fresh_timestamp(engine: Engine, receiver: Receiver) -> None:
    buyer, secret = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    receiver.fail_next(1)

    deliver_until_settled(deliverer(engine, retry_schedule=(1.1,)), event.id)

    first, second = receiver.received
    assert first.body == second.body
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    Webhook(secret).verify(second.body, second.headers)


def test_a_receiver_failing_twice_gets_the_event_on_the_third_attempt(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    receiver.fail_next(2, status=503)

    results = deliver_until_settled(deliverer(engine), event.id)

    attempted = [r for r in results if r.attempt is not None]
    assert [r.outcome for r in attempted] == [Outcome.RETRY, Outcome.RETRY, Outcome.DELIVERED]
    log = attempts_of(engine, event.id)
    assert [a.status_code for a in log] == [503, 503, 200]
    assert log[0].error == "HTTP 503"
    assert log[0].latency_ms >= 0
    assert "nope" in log[0].response_excerpt
    assert events_of(engine, buyer)[0].attempts == 3


def test_a_retry_is_not_attempted_before_its_backoff_has_passed(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    receiver.fail_next(1)
    d = deliverer(engine, retry_schedule=(30.0,))

    assert d.deliver(event.id).outcome is Outcome.RETRY
    assert d.deliver(event.id).outcome is Outcome.NOT_DUE
    assert len(receiver.received) == 1


def test_a_receiver_down_for_a_while_receives_every_event_once_back_without_sequence_gaps(engine: Engine) -> None:
    receiver = Receiver().start()
    port = receiver.port
    receiver.stop()  # down: connections are refused
    buyer, _ = broker_with_endpoint(engine, f"http://127.0.0.1:{port}/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=10)
    ids = [e.id for e in events_of(engine, buyer)]
    d = deliverer(engine, retry_schedule=(0.05,) * 40)

    def come_back(round_no: int) -> None:
        if round_no == 3:
            receiver.start(port=port)

    try:
        drive(d, engine, ids, each_round=come_back)
    finally:
        receiver.stop()

    assert {e.status for e in events_of(engine, buyer)} == {"delivered"}
    assert sorted(b["sequence"] for b in receiver.bodies()) == list(range(1, 11))
    assert receiver.event_ids() == {str(i) for i in ids}


def test_an_exhausted_schedule_ends_the_event_failed_and_counts_a_failed_event(
    engine: Engine, receiver: Receiver
) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    receiver.fail_next(100)

    results = deliver_until_settled(deliverer(engine, retry_schedule=(0.02, 0.02)), event.id)

    assert results[-1].outcome is Outcome.FAILED
    assert len(attempts_of(engine, event.id)) == 3
    (row,) = events_of(engine, buyer)
    assert row.status == "failed"
    assert row.last_error == "HTTP 500"
    assert broker_row(engine, buyer).webhook_consecutive_failures == 1


def test_consecutive_failed_events_disable_the_endpoint_with_a_reason(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=3)
    receiver.fail_next(1000)
    d = deliverer(engine, retry_schedule=(0.02,), disable_after=2)
    first, second, third = events_of(engine, buyer)

    deliver_until_settled(d, first.id)
    assert broker_row(engine, buyer).webhook_enabled
    deliver_until_settled(d, second.id)
    skipped = d.deliver(third.id)

    row = broker_row(engine, buyer)
    assert not row.webhook_enabled
    assert "2 consecutive events failed" in row.webhook_disabled_reason
    assert skipped.outcome is Outcome.SKIPPED
    assert events_of(engine, buyer)[2].last_error.startswith("endpoint disabled: 2 consecutive")


def test_a_success_resets_the_consecutive_failure_count(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=2)
    first, second = events_of(engine, buyer)
    d = deliverer(engine, retry_schedule=(0.02,), disable_after=5)
    receiver.fail_next(2)
    deliver_until_settled(d, first.id)
    assert broker_row(engine, buyer).webhook_consecutive_failures == 1

    deliver_until_settled(d, second.id)

    assert broker_row(engine, buyer).webhook_consecutive_failures == 0


def test_410_gone_disables_the_endpoint_at_once(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=2)
    receiver.gone()
    first, second = events_of(engine, buyer)
    d = deliverer(engine)

    assert d.deliver(first.id).outcome is Outcome.FAILED
    assert d.deliver(second.id).outcome is Outcome.SKIPPED

    row = broker_row(engine, buyer)
    assert not row.webhook_enabled
    assert "410" in row.webhook_disabled_reason
    assert len(receiver.received) == 1


def test_events_of_a_broker_without_url_are_skipped_not_retried(engine: Engine) -> None:
    buyer, _ = broker_with_endpoint(engine, None)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)

    assert deliverer(engine).deliver(event.id).outcome is Outcome.SKIPPED

    (row,) = events_of(engine, buyer)
    assert row.status == "skipped"
    assert row.last_error == "broker has no webhook URL"
    assert event.id not in take_overdue(engine, older_than_s=0)


def test_a_worker_dying_after_its_claim_only_delays_the_event_by_the_lease(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    d = deliverer(engine, lease_s=1.0)
    assert d._claim(event.id) is not None  # claimed, then the "worker" dies: nothing recorded

    assert d.deliver(event.id).outcome is Outcome.NOT_DUE  # in flight: nobody else sends it
    assert event.id not in take_overdue(engine, older_than_s=0)
    time.sleep(1.1)
    assert event.id in take_overdue(engine, older_than_s=0)  # the sweeper would re-enqueue it now

    assert d.deliver(event.id).outcome is Outcome.DELIVERED
    assert events_of(engine, buyer)[0].attempts == 2


def test_a_late_result_of_an_expired_claim_does_not_reschedule_a_newer_attempt(
    engine: Engine, receiver: Receiver
) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    d = deliverer(engine, retry_schedule=(60.0,))
    stale = d._claim(event.id)
    assert stale is not None
    with engine.begin() as conn:  # the lease ran out and another worker claimed it (attempt 2)
        conn.execute(text("UPDATE webhook_events SET attempts = 2 WHERE id = :id"), {"id": event.id})

    receiver.fail_next(1)
    d._record(event.id, stale, d._post(event.id, stale))

    (row,) = events_of(engine, buyer)
    assert row.status == "pending"
    assert row.last_error is None


def test_take_overdue_hands_an_event_out_once_per_period(engine: Engine) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '1 minute'"))

    assert event.id in take_overdue(engine, older_than_s=30)
    assert event.id not in take_overdue(engine, older_than_s=30)


def test_a_hanging_receiver_does_not_stall_deliveries_to_other_brokers(engine: Engine) -> None:
    with Receiver() as slow, Receiver() as fast:
        slow.hang()
        hung, _ = broker_with_endpoint(engine, slow.url)
        healthy, _ = broker_with_endpoint(engine, fast.url)
        seller, _ = broker_with_endpoint(engine, None)
        fills(engine, hung, seller, n=6)
        fills(engine, healthy, seller, n=6)
        d = deliverer(engine, read_timeout_s=20.0, lease_s=30.0, max_in_flight=2)
        slow_ids = [e.id for e in events_of(engine, hung)]
        fast_ids = [e.id for e in events_of(engine, healthy)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            stuck = [pool.submit(d.deliver, i) for i in slow_ids]  # first in line, as in a real queue
            done = [pool.submit(d.deliver, i) for i in fast_ids]
            outcomes = [f.result(timeout=10) for f in done]  # well before the 20 s read timeout
            hanging = sum(not f.done() for f in stuck)
            slow.release()
            deferred = [f.result(timeout=10) for f in stuck]

    assert {r.outcome for r in outcomes} == {Outcome.DELIVERED}
    assert hanging == 2  # the per-broker cap: only 2 threads ever waited on the hanging receiver
    assert sum(r.outcome is Outcome.DEFERRED for r in deferred) == 4


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/hook"])
def test_delivery_refuses_private_and_metadata_addresses_when_private_is_off(engine: Engine, url: str) -> None:
    buyer, _ = broker_with_endpoint(engine, url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)

    result = deliverer(engine, allow_private=False).deliver(event.id)

    assert result.outcome is Outcome.RETRY
    (attempt,) = attempts_of(engine, event.id)
    assert attempt.status_code is None
    assert attempt.error.startswith("refused:")


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.215.14/hook\x01",  # passes the SSRF guard; httpx raises InvalidURL
        "http://a..example.com/hook",  # the IDNA codec raises UnicodeError
        "http://" + "a" * 64 + ".example.com/hook",
    ],
)
def test_a_stored_url_that_cannot_be_requested_is_a_failed_attempt_not_an_exception(
    engine: Engine, url: str, allow_private: bool
) -> None:
    # Such URLs are refused at registration; one written before that (or by SQL) must still end the event.
    buyer, _ = broker_with_endpoint(engine, url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)

    results = deliver_until_settled(deliverer(engine, allow_private=allow_private), event.id)

    assert [r.outcome for r in results if r.outcome is not Outcome.NOT_DUE] == [Outcome.RETRY] * 3 + [Outcome.FAILED]
    attempts = attempts_of(engine, event.id)
    assert len(attempts) == 4
    assert all(a.status_code is None and a.error for a in attempts)
    (settled,) = events_of(engine, buyer)
    assert settled.status == "failed"
    assert settled.attempts == 4


def test_delivery_refuses_a_name_resolving_to_loopback_when_private_is_off(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, f"http://localhost:{receiver.port}/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)

    deliverer(engine, allow_private=False).deliver(event.id)

    assert receiver.received == []
    assert "loopback" in attempts_of(engine, event.id)[0].error


def test_a_rotated_secret_signs_with_both_secrets_during_the_grace_period(engine: Engine, receiver: Receiver) -> None:
    buyer, old_secret = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    new_secret = "whsec_" + "bmV3LXNlY3JldC1rZXktYnl0ZXMtMzItbG9uZyEhISE="
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE brokers SET webhook_secret_previous = webhook_secret, webhook_secret = :s, "
                "webhook_secret_previous_expires_at = now() + interval '1 hour' WHERE id = :id"
            ),
            {"s": new_secret, "id": buyer},
        )

    deliverer(engine).deliver(event.id)

    (request,) = receiver.received
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (old_secret, new_secret):
        assert Webhook(secret).verify(request.body, request.headers)["event_id"] == str(event.id)
    assert json.loads(request.body)["sequence"] == 1

"""The delivery service against real PostgreSQL and a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text
from standardwebhooks.webhooks import Webhook

from exchange.webhooks import store
from exchange.webhooks.outcomes import DeliveryResult, Kind, Outcome, Verdict, judge
from exchange.webhooks.pump import Pump, PumpThread
from exchange.webhooks.store import overdue
from tests.integration.webhook_support import (
    FAST,
    attempts_of,
    broker_row,
    broker_with_endpoint,
    deliver_until_settled,
    deliverer,
    drive,
    events_of,
    fills,
    status_counts,
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

    # Timestamps are whole seconds and retries are jittered by ±20 %: 1.3 s comes at least 1.04 s after the first
    # attempt's record, so the second attempt's timestamp is always a later second (1.1 s could come 0.88 s later).
    deliver_until_settled(deliverer(engine, retry_schedule=(1.3,)), event.id)

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
    assert d.drain() == []
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
    receiver.fail_next(1000)
    d = deliverer(engine, retry_schedule=(0.02,), disable_after=2)
    fills(engine, buyer, seller)
    (first,) = events_of(engine, buyer)

    deliver_until_settled(d, first.id)
    assert broker_row(engine, buyer).webhook_enabled
    fills(engine, buyer, seller)
    second = events_of(engine, buyer)[1]
    deliver_until_settled(d, second.id)
    fills(engine, buyer, seller)
    third = events_of(engine, buyer)[2]
    skipped = d.deliver(third.id)

    row = broker_row(engine, buyer)
    assert not row.webhook_enabled
    assert row.webhook_consecutive_failures == 2
    assert "2 consecutive events failed" in row.webhook_disabled_reason
    assert "HTTP 500" in row.webhook_disabled_reason
    assert skipped.outcome is Outcome.SKIPPED
    assert events_of(engine, buyer)[2].last_error.startswith("endpoint disabled: 2 consecutive")


def test_a_success_resets_the_consecutive_failure_count(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    d = deliverer(engine, retry_schedule=(0.02,), disable_after=5)
    fills(engine, buyer, seller)
    (first,) = events_of(engine, buyer)
    receiver.fail_next(2)
    deliver_until_settled(d, first.id)
    assert broker_row(engine, buyer).webhook_consecutive_failures == 1

    fills(engine, buyer, seller)
    deliver_until_settled(d, events_of(engine, buyer)[1].id)

    assert broker_row(engine, buyer).webhook_consecutive_failures == 0


def test_410_gone_disables_the_endpoint_at_once(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    receiver.gone()
    d = deliverer(engine)
    fills(engine, buyer, seller)
    (first,) = events_of(engine, buyer)

    assert d.deliver(first.id).outcome is Outcome.FAILED
    fills(engine, buyer, seller)
    assert d.deliver(events_of(engine, buyer)[1].id).outcome is Outcome.SKIPPED

    row = broker_row(engine, buyer)
    assert not row.webhook_enabled
    assert "410" in row.webhook_disabled_reason
    assert len(receiver.received) == 1


@pytest.mark.parametrize(
    "verdict",
    [Verdict(Kind.GONE, disable_reason="receiver answered 410 Gone"), Verdict(Kind.EXHAUSTED, disable_reason="x")],
    ids=["gone", "exhausted"],
)
def test_an_attempt_to_the_old_url_ending_after_a_new_one_was_set_does_not_disable_the_new_endpoint(
    engine: Engine, verdict: Verdict
) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/old")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (claim,) = store.claim(engine, limit=10, lease_s=30, per_broker=10).claims  # sent to the old URL
    with engine.begin() as conn:  # PUT /webhooks/endpoint meanwhile (exchange.webhooks.queries.set_endpoint)
        conn.execute(
            text(
                "UPDATE brokers SET webhook_url = 'http://127.0.0.1:9/new', webhook_enabled = true, "
                "webhook_disabled_reason = NULL, webhook_consecutive_failures = 0 WHERE id = :id"
            ),
            {"id": buyer},
        )

    store.record(engine, [store.Attempt(claim, verdict, datetime.now(UTC), 3, 410, "HTTP 410", "")], disable_after=1)

    row = broker_row(engine, buyer)
    assert (row.webhook_enabled, row.webhook_disabled_reason, row.webhook_consecutive_failures) == (True, None, 0)
    assert events_of(engine, buyer)[0].status == "failed"  # the event itself ends by its own attempts


def test_an_attempt_to_the_current_url_disables_the_endpoint_after_a_410(engine: Engine) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (claim,) = store.claim(engine, limit=10, lease_s=30, per_broker=10).claims
    gone = Verdict(Kind.GONE, disable_reason="receiver answered 410 Gone")

    store.record(engine, [store.Attempt(claim, gone, datetime.now(UTC), 3, 410, "HTTP 410", "")], disable_after=5)

    row = broker_row(engine, buyer)
    assert (row.webhook_enabled, row.webhook_disabled_reason) == (False, "receiver answered 410 Gone")


def test_events_of_a_broker_without_url_are_skipped_not_retried(engine: Engine) -> None:
    buyer, _ = broker_with_endpoint(engine, None)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)

    assert deliverer(engine).deliver(event.id).outcome is Outcome.SKIPPED

    (row,) = events_of(engine, buyer)
    assert row.status == "skipped"
    assert row.last_error == "broker has no webhook URL"
    assert event.id not in overdue(engine, older_than_s=0).ids


def attempt_of(claim: store.Claim, verdict: Verdict, status_code: int) -> store.Attempt:
    error = None if 200 <= status_code < 300 else f"HTTP {status_code}"
    return store.Attempt(claim, verdict, datetime.now(UTC), 3, status_code, error, "answer")


def claim_all(engine: Engine, lease_s: float = 1.0) -> store.Claimed:
    """Claim every due event the way a worker does (and then, in these tests, "dies" with the claims)."""
    return store.claim(engine, limit=1000, lease_s=lease_s, per_broker=1000)


def test_a_worker_dying_after_its_claim_only_delays_the_event_by_the_lease(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    d = deliverer(engine, lease_s=1.0)
    assert [c.event_id for c in claim_all(engine).claims] == [event.id]  # claimed, then the "worker" dies

    assert event.id not in {r.event_id for r in d.drain()}  # in flight: nobody else sends it
    assert event.id not in overdue(engine, older_than_s=0).ids
    time.sleep(1.1)
    assert event.id in overdue(engine, older_than_s=0).ids  # the sweeper would hint the workers now

    assert d.deliver(event.id).outcome is Outcome.DELIVERED
    assert events_of(engine, buyer)[0].attempts == 2


def test_a_late_result_of_an_expired_claim_does_not_reschedule_a_newer_attempt(engine: Engine) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (stale,) = claim_all(engine).claims
    with engine.begin() as conn:  # the lease ran out and another worker claimed it (attempt 2)
        conn.execute(text("UPDATE webhook_events SET attempts = 2 WHERE id = :id"), {"id": stale.event_id})

    outcomes = store.record(engine, [attempt_of(stale, Verdict(Kind.RETRY, retry_in_s=60.0), 500)], disable_after=5)

    assert outcomes == [Outcome.SUPERSEDED]  # no retry was scheduled: the worker must not report one
    (row,) = events_of(engine, buyer)
    assert row.status == "pending"
    assert row.last_error is None
    assert len(attempts_of(engine, stale.event_id)) == 1  # the attempt itself is still logged


def test_a_record_from_a_worker_older_than_the_generations_is_fenced_by_attempts_only(engine: Engine) -> None:
    # During an upgrade, workers of before alembic 0017 record batches without generations: their retries and
    # failures still apply (fenced by attempts, as they were), instead of being ignored forever.
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (claim,) = claim_all(engine).claims
    batch = [
        {"ord": 1, "id": str(claim.event_id), "broker_id": str(claim.broker_id), "attempt": claim.attempt,
         "kind": "exhausted", "started": datetime.now(UTC).isoformat(), "url": claim.url, "status_code": 500,
         "latency_ms": 3, "error": "HTTP 500", "excerpt": "", "delay": None, "reason": "x"}
    ]  # fmt: skip

    with engine.begin() as conn:
        conn.exec_driver_sql(store._RECORD, {"batch": json.dumps(batch), "limit": 5})

    (row,) = events_of(engine, buyer)
    assert (row.status, row.last_error) == ("failed", "HTTP 500")


def test_overdue_names_an_overdue_event_once_per_period_unless_another_came_due_since(engine: Engine) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '1 minute'"))

    first = overdue(engine, older_than_s=30)
    assert event.id in first.ids
    assert first.at is not None
    hinted_at = first.at - timedelta(seconds=5)  # the workers were hinted about it 5 s ago

    assert overdue(engine, older_than_s=30, hinted_at=hinted_at).ids == []  # not again within the period
    assert event.id in overdue(engine, older_than_s=30, hinted_at=first.at - timedelta(seconds=30)).ids  # a period
    fills(engine, buyer, seller)  # another event, overdue for 1 s, since that hint (its own hint was lost)
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_events SET next_attempt_at = now() - interval '31 s' WHERE sequence = 2"))
    again = overdue(engine, older_than_s=30, hinted_at=hinted_at).ids
    buyers = [e.id for e in events_of(engine, buyer)]
    assert [i for i in again if i in buyers] == buyers  # both, oldest due first


async def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_a_hanging_receiver_does_not_stall_deliveries_to_other_brokers(engine: Engine) -> None:
    with Receiver() as slow, Receiver() as fast:
        slow.hang()
        hung, _ = broker_with_endpoint(engine, slow.url)
        healthy, _ = broker_with_endpoint(engine, fast.url)
        seller, _ = broker_with_endpoint(engine, None)
        fills(engine, hung, seller, n=6)  # first in line: the oldest due events
        fills(engine, healthy, seller, n=6)
        config = replace(FAST, read_timeout_s=20.0, lease_s=30.0, max_in_flight=2)
        pump = Pump(engine, config, capacity=4)

        async def scenario() -> tuple[dict[str, int], dict[str, int]]:
            stop = asyncio.Event()
            running = asyncio.create_task(pump.run(stop))
            # well before the 20 s read timeout, with only 4 slots of which the hanging receiver holds 2:
            await wait_for(lambda: status_counts(engine, healthy) == {"delivered": 6})
            while_hanging = status_counts(engine, hung)
            slow.release()
            await wait_for(lambda: status_counts(engine, hung) == {"delivered": 6})
            stop.set()
            await running
            return while_hanging, status_counts(engine, hung)

        while_hanging, after = asyncio.run(scenario())

    assert while_hanging == {"claimed": 2, "pending": 4}  # the per-broker cap: only 2 ever waited on it
    assert after == {"delivered": 6}
    assert sorted(b["sequence"] for b in slow.bodies()) == list(range(1, 7))


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

    assert [r.outcome for r in results] == [Outcome.RETRY] * 3 + [Outcome.FAILED]
    attempts = attempts_of(engine, event.id)
    assert len(attempts) == 4
    assert all(a.status_code is None and a.error for a in attempts)
    (settled,) = events_of(engine, buyer)
    assert settled.status == "failed"
    assert settled.attempts == 4


def test_a_url_with_credentials_sends_them_as_basic_auth_and_never_in_the_host_header(
    engine: Engine, receiver: Receiver
) -> None:
    # A receiver behind basic auth: the broker puts its credentials in the URL (percent-encoded, as RFC 3986 asks),
    # as httpx, curl and the seed's client send them. Without them every delivery is a 401, then a disabled endpoint.
    buyer, _ = broker_with_endpoint(engine, f"http://hook%40acme:p%3As%20s@127.0.0.1:{receiver.port}/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)

    assert deliverer(engine).deliver(event.id).outcome is Outcome.DELIVERED

    (request,) = receiver.received
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"hook@acme:p:s s").decode()
    assert request.headers["host"] == f"127.0.0.1:{receiver.port}"


def test_a_url_without_credentials_sends_no_authorization(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    (event,) = events_of(engine, buyer)

    deliverer(engine).deliver(event.id)

    (request,) = receiver.received
    assert "authorization" not in request.headers


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


# --------------------------------------------------------------------------------------------- batches


def set_broker(engine: Engine, broker_id: uuid.UUID, **columns: object) -> None:
    assignments = ", ".join(f"{name} = :{name}" for name in columns)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE brokers SET {assignments} WHERE id = :id"), {"id": broker_id, **columns})


def test_one_record_statement_applies_a_batch_of_mixed_outcomes_each_by_its_own_rule(engine: Engine) -> None:
    url = "http://127.0.0.1:9/hook"
    ok, retrying, gone, exhausted = (broker_with_endpoint(engine, url)[0] for _ in range(4))
    no_url, _ = broker_with_endpoint(engine, None)
    for broker in (ok, retrying, gone, exhausted):
        fills(engine, broker, no_url)  # one event for the broker, one (skipped) for no_url
    set_broker(engine, ok, webhook_consecutive_failures=2)
    set_broker(engine, retrying, webhook_consecutive_failures=1)
    set_broker(engine, exhausted, webhook_consecutive_failures=2)
    with engine.begin() as conn:  # its one retry was already used: this attempt is its last
        conn.execute(text("UPDATE webhook_events SET attempts = 1 WHERE broker_id = :b"), {"b": exhausted})
    claimed = claim_all(engine)
    assert len(claimed.skipped) == 4
    by_broker = {c.broker_id: c for c in claimed.claims}
    answers = {ok: 200, retrying: 503, gone: 410, exhausted: 500}
    batch = [
        attempt_of(
            by_broker[broker],
            judge(
                code,
                None if code == 200 else f"HTTP {code}",
                attempt=by_broker[broker].attempt,
                started=datetime.now(UTC),
                retry_schedule=(30.0,),
                disable_after=3,
            ),
            code,
        )
        for broker, code in answers.items()
    ]
    assert [a.verdict.kind for a in batch] == [Kind.DELIVERED, Kind.RETRY, Kind.GONE, Kind.EXHAUSTED]

    outcomes = store.record(engine, batch, disable_after=3)

    assert outcomes == [Outcome.DELIVERED, Outcome.RETRY, Outcome.FAILED, Outcome.FAILED]  # none fenced off
    (delivered,), (retried,), (failed_gone,), (failed_out,) = (events_of(engine, b) for b in answers)
    assert (delivered.status, delivered.last_error) == ("delivered", None)
    assert (retried.status, retried.last_error, retried.attempts) == ("pending", "HTTP 503", 1)
    assert (failed_gone.status, failed_out.status) == ("failed", "failed")
    assert overdue(engine, older_than_s=0).ids == []  # the retry is 30 s out, nothing else is pending
    for attempt in batch:
        (logged,) = attempts_of(engine, attempt.claim.event_id)
        assert logged.status_code == answers[attempt.claim.broker_id]
    rows = {b: broker_row(engine, b) for b in answers}
    assert (rows[ok].webhook_enabled, rows[ok].webhook_consecutive_failures) == (True, 0)
    assert (rows[retrying].webhook_enabled, rows[retrying].webhook_consecutive_failures) == (True, 1)
    assert not rows[gone].webhook_enabled
    assert rows[gone].webhook_disabled_reason.startswith("receiver answered 410 Gone at ")
    assert (rows[exhausted].webhook_enabled, rows[exhausted].webhook_consecutive_failures) == (False, 3)
    assert rows[exhausted].webhook_disabled_reason == (
        "3 consecutive events failed after every retry; last error: HTTP 500"
    )
    assert {e.status for e in events_of(engine, no_url)} == {"skipped"}


def test_consecutive_failures_restart_after_the_last_delivery_within_a_batch(engine: Engine) -> None:
    broker, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, broker, seller, n=3)
    set_broker(engine, broker, webhook_consecutive_failures=4)
    first, second, third = sorted(claim_all(engine).claims, key=lambda c: c.body)
    out = Verdict(Kind.EXHAUSTED, disable_reason="5 consecutive events failed")

    # in completion order: failed, delivered, failed → one failed event since the last delivery
    store.record(
        engine,
        [attempt_of(first, out, 500), attempt_of(second, Verdict(Kind.DELIVERED), 200), attempt_of(third, out, 500)],
        disable_after=5,
    )

    row = broker_row(engine, broker)
    assert (row.webhook_enabled, row.webhook_consecutive_failures) == (True, 1)


def test_a_claim_takes_at_most_the_room_left_per_broker_and_skips_brokers_at_their_cap(engine: Engine) -> None:
    url = "http://127.0.0.1:9/hook"
    busy, partly, free = (broker_with_endpoint(engine, url)[0] for _ in range(3))
    seller, _ = broker_with_endpoint(engine, None)
    for broker in (busy, partly, free):
        fills(engine, broker, seller, n=5)

    claimed = store.claim(engine, limit=100, lease_s=10, per_broker=3, busy={busy: 3, partly: 2})

    taken = [c.broker_id for c in claimed.claims]
    assert (taken.count(busy), taken.count(partly), taken.count(free)) == (0, 1, 3)
    assert len(claimed.skipped) == 15  # the seller has no URL


def _due_events(engine: Engine, broker: uuid.UUID, n: int, due_s_ago: int) -> list[uuid.UUID]:
    """``n`` pending events of ``broker``, due ``due_s_ago`` seconds ago and a second apart (the first oldest)."""
    with engine.begin() as conn:
        rows = conn.execute(
            text(
                "INSERT INTO webhook_events (broker_id, sequence, type, payload, next_attempt_at) "
                "SELECT :b, g, 'order.fill', '{}', now() - make_interval(secs => :ago - g) "
                "FROM generate_series(1, :n) AS g RETURNING id, sequence"
            ),
            {"b": broker, "n": n, "ago": due_s_ago},
        )
        return [row.id for row in sorted(rows, key=lambda row: row.sequence)]


def test_a_broker_with_more_due_events_than_room_holds_the_others_back_only_until_it_is_at_its_cap(
    engine: Engine,
) -> None:
    # Without a broker at its cap a claim reads the oldest due events (alembic 0019's cheap path): the first
    # broker's backlog fills that window, so the claim takes only its room. Once it is at its cap, the claim reads
    # broker by broker and the others' oldest come next.
    url = "http://127.0.0.1:9/hook"
    first, second, third = (broker_with_endpoint(engine, url)[0] for _ in range(3))
    firsts = _due_events(engine, first, 10, due_s_ago=600)
    seconds = _due_events(engine, second, 10, due_s_ago=300)
    thirds = _due_events(engine, third, 10, due_s_ago=100)

    claimed = store.claim(engine, limit=4, lease_s=10, per_broker=2)
    then = store.claim(engine, limit=4, lease_s=10, per_broker=2, busy={first: 2})

    assert {c.event_id for c in claimed.claims} == set(firsts[:2])
    assert {c.event_id for c in then.claims} == {*seconds[:2], *thirds[:2]}  # the oldest each may take
    assert claimed.skipped == then.skipped == []


def test_a_claim_with_a_broker_at_its_cap_takes_the_oldest_due_events_of_the_others(engine: Engine) -> None:
    url = "http://127.0.0.1:9/hook"
    hanging, other, disabled = (broker_with_endpoint(engine, url)[0] for _ in range(3))
    set_broker(engine, disabled, webhook_enabled=False)
    _due_events(engine, hanging, 50, due_s_ago=900)
    others = _due_events(engine, other, 5, due_s_ago=600)
    not_deliverable = _due_events(engine, disabled, 3, due_s_ago=300)

    claimed = store.claim(engine, limit=10, lease_s=10, per_broker=4, busy={hanging: 4})

    assert [c.event_id for c in claimed.claims] == others[:4]
    assert set(claimed.skipped) == set(not_deliverable)  # skipped whatever the room: nothing is sent


def test_two_workers_claiming_at_once_deliver_each_event_once_with_contiguous_sequences(engine: Engine) -> None:
    # One receiver per broker: the test receiver's listen backlog is 5, so connections open at once stay below it.
    with Receiver() as r0, Receiver() as r1, Receiver() as r2, Receiver() as r3:
        hooks = [r0, r1, r2, r3]
        for hook in hooks:
            hook.delay_s = 0.002
        brokers = [broker_with_endpoint(engine, hook.url)[0] for hook in hooks]
        fills(engine, brokers[0], brokers[1], n=50)
        fills(engine, brokers[2], brokers[3], n=50)
        seen: list[list[DeliveryResult]] = [[], []]
        workers = [  # two threads with a loop each: like two worker processes
            PumpThread(Pump(engine, replace(FAST, max_in_flight=2), capacity=8, observe=results.append))
            for results in seen
        ]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 30
        while sum(len(r) for r in seen) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        for worker in workers:
            worker.stop(10)

    assert all(seen)  # both workers took a share
    assert {(r.outcome, r.error) for r in seen[0] + seen[1]} == {(Outcome.DELIVERED, None)}
    with engine.connect() as conn:
        attempts = conn.execute(text("SELECT DISTINCT attempts FROM webhook_events")).scalars().all()
    assert attempts == [1]
    for hook in hooks:
        received = hook.bodies()
        assert len({b["event_id"] for b in received}) == len(received) == 50  # each event sent exactly once
        assert sorted(b["sequence"] for b in received) == list(range(1, 51))


def test_retries_leave_no_sequence_gaps_at_the_receiver(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=30)
    ids = [e.id for e in events_of(engine, buyer)]
    receiver.fail_next(7, status=503)

    drive(deliverer(engine, retry_schedule=(0.05,) * 5), engine, ids)

    assert sorted(b["sequence"] for b in receiver.bodies()) == list(range(1, 31))
    assert sum(r.status == 503 for r in receiver.received) == 7


def test_overdue_lists_the_overdue_events_oldest_due_first_and_leaves_their_due_times(engine: Engine) -> None:
    buyer, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=40)
    with engine.begin() as conn:  # came due a minute ago, one millisecond apart, in sequence order (seller's later)
        conn.execute(
            text(
                "UPDATE webhook_events SET next_attempt_at = now() - interval '1 minute' + sequence * interval '1 ms'"
                " + CASE WHEN broker_id = :b THEN interval '0' ELSE interval '1 s' END"
            ),
            {"b": buyer},
        )

    def due_times() -> list[tuple[int, datetime]]:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT sequence, next_attempt_at FROM webhook_events ORDER BY id"))
            return [(r.sequence, r.next_attempt_at) for r in rows]

    before = due_times()
    listed = overdue(engine, older_than_s=30)

    assert listed.ids[:40] == [e.id for e in events_of(engine, buyer)]
    assert listed.ids[40:] == [e.id for e in events_of(engine, seller)]
    assert due_times() == before

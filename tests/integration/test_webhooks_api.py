"""The webhook endpoints on the real app (TestClient), PostgreSQL and Redis; deliveries by the real service."""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import prometheus_client
import psycopg
import pytest
import redis
from litestar.testing import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from standardwebhooks.webhooks import Webhook

from exchange.webhooks import store
from exchange.webhooks.delivery import Outcome
from exchange.webhooks.outcomes import DeliveryResult, Kind, Verdict
from exchange.webhooks.pump import count_in_metrics
from tests.integration.api_fixtures import app_namespace
from tests.integration.api_helpers import ADMIN_KEY, Broker, match, new_symbol
from tests.integration.webhook_support import attempts_of, deliverer
from tests.serving import wait_until
from tests.webhook_receiver import Receiver

pytest_plugins = ["tests.integration.api_fixtures"]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def client(client_factory: Callable[..., TestClient[Any]], api_redis_url: str) -> Iterator[TestClient[Any]]:
    client = client_factory(webhook_allow_private="true")
    yield client
    r = redis.Redis.from_url(api_redis_url)
    keys = list(r.scan_iter(match=f"{app_namespace(client)}:webhooks*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def register(client: TestClient[Any], webhook_url: str | None = None) -> tuple[Broker, str]:
    name = f"wh-{uuid.uuid4().hex[:8]}"
    body: dict[str, Any] = {"name": name}
    if webhook_url is not None:
        body["webhook_url"] = webhook_url
    response = client.post("/register", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    data = response.json()
    return Broker(data["broker_id"], name, data["api_key"]), data["webhook_secret"]


def trade(client: TestClient[Any], engine: Engine, buyer: Broker, seller: Broker, n: int = 1) -> None:
    symbol = new_symbol()
    for _ in range(n):
        for broker, side in ((seller, "ask"), (buyer, "bid")):
            order = {"document_number": "1", "side": side, "symbol": symbol, "quantity": 1, "price": 100}
            assert client.post("/orders", json=order, headers=broker.headers).status_code == 201
    match(engine, symbol)


def event_ids(client: TestClient[Any], broker: Broker) -> list[str]:
    return [
        e["event_id"] for e in client.get("/events", params={"limit": 1000}, headers=broker.headers).json()["items"]
    ]


# ----------------------------------------------------------------------------------------------- SSRF


@pytest.mark.parametrize("url", ["http://169.254.169.254/", "http://10.0.0.1/", "http://127.0.0.1:8080/hook"])
def test_register_refuses_private_and_metadata_urls_when_private_is_off(api_client: TestClient[Any], url: str) -> None:
    response = api_client.post("/register", json={"name": "ssrf", "webhook_url": url}, headers=ADMIN)

    assert response.status_code == 422
    assert response.json()["code"] == "invalid_webhook_url"


def test_register_accepts_a_loopback_url_when_private_is_allowed(client: TestClient[Any]) -> None:
    response = client.post("/register", json={"name": "local", "webhook_url": "http://127.0.0.1:1/h"}, headers=ADMIN)

    assert response.status_code == 201


def test_put_endpoint_refuses_the_metadata_address_when_private_is_off(api_client: TestClient[Any]) -> None:
    broker, _ = register(api_client)

    response = api_client.put("/webhooks/endpoint", json={"url": "http://169.254.169.254/"}, headers=broker.headers)

    assert response.status_code == 422
    assert response.json()["code"] == "invalid_webhook_url"


BAD_URLS = [
    ("http://a..example.com/", "invalid_webhook_url"),  # empty label: the IDNA codec raises UnicodeError
    ("http://" + "a" * 64 + ".example.com/", "invalid_webhook_url"),  # label over 63 characters
    ("http://example.com/hook\x01", "invalid_webhook_url"),  # control character (httpx refuses it)
    ("http://example.com/hook\x7f", "invalid_webhook_url"),
    ("http://exa\x00mple.com/", "validation_error"),  # NUL: PostgreSQL text cannot hold it
    ("http://[64:ff9b::a9fe:a9fe]/", "invalid_webhook_url"),  # NAT64 for 169.254.169.254
]


@pytest.mark.parametrize(("url", "code"), BAD_URLS)
def test_register_answers_422_for_a_url_that_cannot_be_delivered_to(
    api_client: TestClient[Any], url: str, code: str
) -> None:
    response = api_client.post("/register", json={"name": "bad", "webhook_url": url}, headers=ADMIN)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == code


@pytest.mark.parametrize(("url", "code"), BAD_URLS)
def test_put_endpoint_answers_422_for_a_url_that_cannot_be_delivered_to(
    api_client: TestClient[Any], url: str, code: str
) -> None:
    broker, _ = register(api_client)

    response = api_client.put("/webhooks/endpoint", json={"url": url}, headers=broker.headers)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == code


@pytest.mark.parametrize("url", ["http://a..example.com/", "http://example.com/hook\x01"])
def test_an_undeliverable_url_is_refused_even_when_private_is_allowed(client: TestClient[Any], url: str) -> None:
    response = client.post("/register", json={"name": "bad", "webhook_url": url}, headers=ADMIN)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_webhook_url"


# ------------------------------------------------------------------------------------------- endpoint


def test_put_endpoint_sets_the_url_and_re_enables_a_disabled_endpoint(
    client: TestClient[Any], api_engine: Engine
) -> None:
    broker, _ = register(client, "http://127.0.0.1:1/old")
    with api_engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE brokers SET webhook_enabled = false, webhook_disabled_reason = 'gone', "
                "webhook_consecutive_failures = 7 WHERE id = :id"
            ),
            {"id": broker.id},
        )
    assert client.get("/webhooks/endpoint", headers=broker.headers).json()["disabled_reason"] == "gone"

    response = client.put("/webhooks/endpoint", json={"url": "http://127.0.0.1:2/new"}, headers=broker.headers)

    assert response.status_code == 200
    body = response.json()
    assert body["url"] == "http://127.0.0.1:2/new"
    assert body["enabled"] is True
    assert body["disabled_reason"] is None
    assert body["consecutive_failed_events"] == 0


def test_put_endpoint_with_null_clears_the_url(client: TestClient[Any]) -> None:
    broker, _ = register(client, "http://127.0.0.1:1/old")

    response = client.put("/webhooks/endpoint", json={"url": None}, headers=broker.headers)

    assert response.status_code == 200
    assert response.json()["url"] is None


def test_webhook_endpoints_require_a_broker_key(client: TestClient[Any]) -> None:
    for method, path in (("GET", "/events"), ("GET", "/webhooks/deliveries"), ("POST", "/webhooks/secret/rotate")):
        assert client.request(method, path).status_code == 401


# --------------------------------------------------------------------------------------------- secrets


def test_secret_rotation_returns_a_new_secret_and_deliveries_verify_with_both(
    client: TestClient[Any], api_engine: Engine, receiver: Receiver
) -> None:
    buyer, old_secret = register(client, receiver.url)
    seller, _ = register(client)

    response = client.post("/webhooks/secret/rotate", headers=buyer.headers)

    assert response.status_code == 200
    new_secret = response.json()["webhook_secret"]
    assert new_secret.startswith("whsec_")
    assert new_secret != old_secret
    assert response.json()["previous_secret_expires_at"] is not None
    trade(client, api_engine, buyer, seller)
    (event_id,) = event_ids(client, buyer)
    assert deliverer(api_engine).deliver(uuid.UUID(event_id)).outcome is Outcome.DELIVERED
    (request,) = receiver.received
    for secret in (new_secret, old_secret):
        Webhook(secret).verify(request.body, request.headers)


def test_rotating_twice_within_the_grace_keeps_every_secret_rotated_out_signing(
    client: TestClient[Any], api_engine: Engine, receiver: Receiver
) -> None:
    buyer, original = register(client, receiver.url)
    seller, _ = register(client)

    lost = client.post("/webhooks/secret/rotate", headers=buyer.headers).json()["webhook_secret"]  # answer lost
    again = client.post("/webhooks/secret/rotate", headers=buyer.headers).json()["webhook_secret"]  # the retry
    trade(client, api_engine, buyer, seller)
    (event_id,) = event_ids(client, buyer)
    assert deliverer(api_engine).deliver(uuid.UUID(event_id)).outcome is Outcome.DELIVERED

    (request,) = receiver.received
    for secret in (again, lost, original):  # the receiver still holding the original verifies too
        Webhook(secret).verify(request.body, request.headers)


def test_rotations_keep_at_most_four_secrets_rotated_out(client: TestClient[Any], api_engine: Engine) -> None:
    buyer, _ = register(client)
    for _ in range(7):
        client.post("/webhooks/secret/rotate", headers=buyer.headers)
    with api_engine.connect() as conn:
        previous = conn.execute(
            text("SELECT webhook_secret_previous FROM brokers WHERE id = :id"), {"id": buyer.id}
        ).scalar_one()
    assert len(previous.split()) == 4


# ---------------------------------------------------------------------------------------------- events


def test_events_are_the_brokers_gap_free_log_paged_by_sequence(client: TestClient[Any], api_engine: Engine) -> None:
    buyer, _ = register(client)
    seller, _ = register(client)
    trade(client, api_engine, buyer, seller, n=5)

    first = client.get("/events", params={"limit": 3}, headers=buyer.headers).json()
    rest = client.get("/events", params={"after": first["next_after"]}, headers=buyer.headers).json()
    empty = client.get("/events", params={"after": rest["next_after"]}, headers=buyer.headers).json()

    items = first["items"] + rest["items"]
    assert [e["sequence"] for e in items] == [1, 2, 3, 4, 5]
    assert all(e["payload"]["sequence"] == e["sequence"] and e["payload"]["side"] == "bid" for e in items)
    assert empty == {"items": [], "next_after": 5}
    assert all(e["delivery_status"] == "pending" for e in items)


def test_a_broker_sees_none_of_another_brokers_events(client: TestClient[Any], api_engine: Engine) -> None:
    buyer, _ = register(client)
    seller, _ = register(client)
    outsider, _ = register(client)
    trade(client, api_engine, buyer, seller)

    assert client.get("/events", headers=outsider.headers).json()["items"] == []
    (event_id,) = event_ids(client, buyer)
    response = client.post(f"/webhooks/events/{event_id}/redeliver", headers=outsider.headers)
    assert response.status_code == 404
    assert response.json()["code"] == "event_not_found"


# -------------------------------------------------------------------------------------------- redeliver


def event_row(api_engine: Engine, event_id: str) -> tuple[Any, ...]:
    """The event's delivery state: status, next attempt, delivery time, last error."""
    with api_engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, next_attempt_at, delivered_at, last_error FROM webhook_events WHERE id = :id"),
            {"id": event_id},
        ).one()
    return tuple(row)


def test_redeliver_makes_a_delivered_event_pending_and_sends_it_again(
    client: TestClient[Any], api_engine: Engine, receiver: Receiver
) -> None:
    buyer, _ = register(client, receiver.url)
    seller, _ = register(client)
    trade(client, api_engine, buyer, seller)
    (event_id,) = event_ids(client, buyer)
    d = deliverer(api_engine)
    d.deliver(uuid.UUID(event_id))

    response = client.post(f"/webhooks/events/{event_id}/redeliver", headers=buyer.headers)

    assert response.status_code == 202
    assert response.json() == {"event_id": event_id, "status": "pending"}
    assert d.deliver(uuid.UUID(event_id)).outcome is Outcome.DELIVERED
    assert [r.headers["webhook-id"] for r in receiver.received] == [event_id, event_id]


def test_redeliver_without_a_url_is_a_conflict(client: TestClient[Any], api_engine: Engine) -> None:
    buyer, _ = register(client)
    seller, _ = register(client)
    trade(client, api_engine, buyer, seller)
    (event_id,) = event_ids(client, buyer)

    before = event_row(api_engine, event_id)

    response = client.post(f"/webhooks/events/{event_id}/redeliver", headers=buyer.headers)

    assert response.status_code == 409
    assert response.json()["code"] == "webhook_endpoint_unavailable"
    assert event_row(api_engine, event_id) == before  # nothing changed


def test_redeliver_of_another_brokers_event_is_not_found_and_changes_nothing(
    client: TestClient[Any], api_engine: Engine, receiver: Receiver
) -> None:
    buyer, _ = register(client, receiver.url)
    seller, _ = register(client, receiver.url)
    trade(client, api_engine, buyer, seller)
    (event_id,) = event_ids(client, buyer)
    deliverer(api_engine).deliver(uuid.UUID(event_id))
    before = event_row(api_engine, event_id)

    response = client.post(f"/webhooks/events/{event_id}/redeliver", headers=seller.headers)

    assert response.status_code == 404
    assert response.json()["code"] == "event_not_found"
    assert before[0] == "delivered"
    assert event_row(api_engine, event_id) == before


def test_redeliver_of_a_malformed_id_is_not_found(client: TestClient[Any]) -> None:
    broker, _ = register(client)

    assert client.post("/webhooks/events/not-a-uuid/redeliver", headers=broker.headers).status_code == 404


# ---------------------------------------------------------------------------- redeliver while in flight
# A redeliver can come while an attempt of the same event is in flight (claimed under its lease). These tests run on
# a database of their own, the app's and the worker code's alike, so that claims and passes see only their events.


@pytest.fixture
def own_client(
    client_factory: Callable[..., TestClient[Any]], fresh_migrated_database_url: str, api_redis_url: str
) -> Iterator[TestClient[Any]]:
    """An app on this test's own database (``engine``'s)."""
    client = client_factory(webhook_allow_private="true", database_url=fresh_migrated_database_url)
    yield client
    r = redis.Redis.from_url(api_redis_url)
    keys = list(r.scan_iter(match=f"{app_namespace(client)}:webhooks*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


def delivery_state(engine: Engine, event_id: uuid.UUID) -> tuple[str, int, str | None, bool]:
    """The event's (status, attempts, last_error, due now)."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT status, attempts, last_error, next_attempt_at <= clock_timestamp() AS due "
                "FROM webhook_events WHERE id = :id"
            ),
            {"id": event_id},
        ).one()
    return row.status, row.attempts, row.last_error, row.due


def use_attempts(engine: Engine, event_id: uuid.UUID, attempts: int) -> None:
    """Mark ``attempts`` of the event's schedule as used (earlier attempts that failed)."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_events SET attempts = :n WHERE id = :id"), {"n": attempts, "id": event_id})


def redeliver_while_in_flight(
    client: TestClient[Any], engine: Engine, receiver: Receiver, *, attempts_used: int
) -> tuple[uuid.UUID, uuid.UUID, list[DeliveryResult]]:
    """One pass of the real pump (one delivery per broker in flight, one retry 30 s after a first failure) over two
    events of a broker: the first one's attempt is held by the receiver while the broker redelivers that event, then
    answered 503; every later request is answered 200. The second event, due before the redelivery, is claimed
    before the redelivered one (oldest first) once the attempt ends, so the attempt is recorded before anything
    claims the redelivered event again. The pump reports to the worker's own observer (the process's metrics) too.
    Returns (first, second, the pass's results as reported)."""
    buyer, _ = register(client, receiver.url)
    seller, _ = register(client)
    trade(client, engine, buyer, seller)
    trade(client, engine, buyer, seller)
    first, second = (uuid.UUID(e) for e in event_ids(client, buyer))
    use_attempts(engine, first, attempts_used)
    receiver.fail_next(1, status=503)
    receiver.hang()
    d = deliverer(engine, count_in_metrics, retry_schedule=(30.0,), max_in_flight=1, lease_s=30.0, read_timeout_s=10.0)
    with ThreadPoolExecutor(1, thread_name_prefix="pass") as passes:
        one_pass = passes.submit(d.drain)
        try:
            wait_until(lambda: delivery_state(engine, first)[1] == attempts_used + 1, message="the attempt claimed")
            response = client.post(f"/webhooks/events/{first}/redeliver", headers=buyer.headers)
            assert response.status_code == 202
        finally:
            receiver.release()
        results = one_pass.result(timeout=30)
    return first, second, results


def test_redeliver_during_an_attempt_in_flight_is_not_undone_by_its_failure(
    own_client: TestClient[Any], engine: Engine, receiver: Receiver
) -> None:
    # The attempt in flight is the last of the schedule (its one retry was used): its 503 exhausts it.
    first, second, _ = redeliver_while_in_flight(own_client, engine, receiver, attempts_used=1)

    assert delivery_state(engine, first)[:3] == ("delivered", 3, None)
    assert [a.status_code for a in attempts_of(engine, first)] == [503, 200]  # the redelivery was sent
    assert delivery_state(engine, second)[0] == "delivered"
    assert [r.headers["webhook-id"] for r in receiver.received].count(str(first)) == 2


def test_redeliver_during_an_attempt_in_flight_is_not_postponed_by_its_retry(
    own_client: TestClient[Any], engine: Engine, receiver: Receiver
) -> None:
    # The attempt in flight is the first: its 503 schedules a retry in 30 s, which must not replace "due now".
    first, second, _ = redeliver_while_in_flight(own_client, engine, receiver, attempts_used=0)

    assert delivery_state(engine, first)[:3] == ("delivered", 2, None)
    assert [a.status_code for a in attempts_of(engine, first)] == [503, 200]
    assert delivery_state(engine, second)[0] == "delivered"


def deliveries_counted(outcome: Outcome) -> float:
    """``exchange_webhook_deliveries_total{outcome}`` in this process's metrics (the worker's observer counts there)."""
    return prometheus_client.REGISTRY.get_sample_value("exchange_webhook_deliveries_total", {"outcome": outcome}) or 0.0


@pytest.mark.parametrize(("attempts_used", "verdict"), [(1, Outcome.FAILED), (0, Outcome.RETRY)], ids=["last", "first"])
def test_an_attempt_in_flight_fenced_by_a_redeliver_is_reported_superseded_in_the_workers_log_and_metrics(
    own_client: TestClient[Any],
    engine: Engine,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    attempts_used: int,
    verdict: Outcome,
) -> None:
    # Its 503 judged alone is `verdict` (the schedule's last attempt: failed; its first: a retry in 30 s); the record
    # neither failed the event nor scheduled that retry, so the worker must not say it did.
    counted = {outcome: deliveries_counted(outcome) for outcome in Outcome}
    caplog.set_level(logging.INFO, logger="exchange.webhooks")

    first, _, results = redeliver_while_in_flight(own_client, engine, receiver, attempts_used=attempts_used)

    assert [(r.outcome, r.status_code, r.retry_in_s) for r in results if r.event_id == first] == [
        (Outcome.SUPERSEDED, 503, None),
        (Outcome.DELIVERED, 200, None),
    ]
    lines = [
        r.getMessage() for r in caplog.records if r.name == "exchange.webhooks" and f"event={first}" in r.getMessage()
    ]
    assert lines == [f"delivery event={first} attempt={attempts_used + 1} outcome=superseded error=HTTP 503"]
    now = {outcome: deliveries_counted(outcome) - counted[outcome] for outcome in Outcome}
    assert (now[Outcome.SUPERSEDED], now[verdict]) == (1, 0)
    assert now[Outcome.DELIVERED] == 2  # the redelivery and the other event


def claim_one(engine: Engine) -> store.Claim:
    """Claim the one due event the way a worker does (the seller's events, without a URL, are skipped)."""
    (claim,) = store.claim(engine, limit=10, lease_s=30.0, per_broker=10).claims
    return claim


def recorded(engine: Engine, claim: store.Claim, verdict: Verdict, status_code: int) -> Outcome:
    """Record one attempt of ``claim``; returns its outcome as recorded."""
    error = None if 200 <= status_code < 300 else f"HTTP {status_code}"
    finished = store.Attempt(claim, verdict, datetime.now(UTC), 3, status_code, error, "answer")
    (outcome,) = store.record(engine, [finished], disable_after=5)
    return outcome


ENDINGS = [
    (Verdict(Kind.RETRY, retry_in_s=60.0), 503),
    (Verdict(Kind.EXHAUSTED, disable_reason="5 consecutive events failed"), 503),
    (Verdict(Kind.GONE, disable_reason="receiver answered 410 Gone"), 410),
]


def _redelivered_in_flight(own_client: TestClient[Any], engine: Engine) -> tuple[Broker, uuid.UUID, store.Claim]:
    """A buyer's fill event, claimed (an attempt in flight), then redelivered by the buyer: the buyer, the event's
    id and the claim."""
    buyer, _ = register(own_client, "http://127.0.0.1:9/hook")
    seller, _ = register(own_client)
    trade(own_client, engine, buyer, seller)
    (event_id,) = (uuid.UUID(e) for e in event_ids(own_client, buyer))
    in_flight = claim_one(engine)
    assert own_client.post(f"/webhooks/events/{event_id}/redeliver", headers=buyer.headers).status_code == 202
    return buyer, event_id, in_flight


@pytest.mark.parametrize(("verdict", "status_code"), ENDINGS, ids=["retry", "exhausted", "gone"])
def test_a_failure_in_flight_recorded_after_a_redeliver_leaves_the_event_due_and_is_still_logged(
    own_client: TestClient[Any], engine: Engine, verdict: Verdict, status_code: int
) -> None:
    _, event_id, in_flight = _redelivered_in_flight(own_client, engine)

    outcome = recorded(engine, in_flight, verdict, status_code)

    assert outcome is Outcome.SUPERSEDED
    assert delivery_state(engine, event_id) == ("pending", 1, None, True)
    assert [a.status_code for a in attempts_of(engine, event_id)] == [status_code]


def test_a_success_in_flight_recorded_after_a_redeliver_still_delivers_the_event(
    own_client: TestClient[Any], engine: Engine
) -> None:
    _, event_id, in_flight = _redelivered_in_flight(own_client, engine)

    outcome = recorded(engine, in_flight, Verdict(Kind.DELIVERED), 200)

    assert outcome is Outcome.DELIVERED
    assert delivery_state(engine, event_id)[:3] == ("delivered", 1, None)


def test_the_attempt_a_redeliver_asked_for_still_ends_an_exhausted_event_failed(
    own_client: TestClient[Any], engine: Engine
) -> None:
    buyer, event_id, in_flight = _redelivered_in_flight(own_client, engine)
    exhausted = Verdict(Kind.EXHAUSTED, disable_reason="5 consecutive events failed")
    # from before the redeliver: the event stays due
    assert recorded(engine, in_flight, exhausted, 503) is Outcome.SUPERSEDED

    redelivery = claim_one(engine)
    assert recorded(engine, redelivery, exhausted, 503) is Outcome.FAILED

    assert delivery_state(engine, event_id)[:3] == ("failed", 2, "HTTP 503")
    assert broker_consecutive_failures(engine, buyer) == 1  # the redelivery's failure, not the stale one


def broker_consecutive_failures(engine: Engine, broker: Broker) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT webhook_consecutive_failures FROM brokers WHERE id = :id"), {"id": uuid.UUID(broker.id)}
            ).scalar_one()
        )


# ------------------------------------------------------------------------------------------- deliveries


def test_the_delivery_log_filters_by_outcome_and_pages_with_a_cursor(
    client: TestClient[Any], api_engine: Engine, receiver: Receiver
) -> None:
    buyer, _ = register(client, receiver.url)
    seller, _ = register(client)
    trade(client, api_engine, buyer, seller, n=3)
    receiver.fail_next(1, status=502)
    results = deliverer(api_engine, retry_schedule=(30.0,)).drain()  # one pass: the 3 events and the seller's
    assert {uuid.UUID(e) for e in event_ids(client, buyer)} <= {r.event_id for r in results}

    failed = client.get("/webhooks/deliveries", params={"status": "failed"}, headers=buyer.headers).json()
    page1 = client.get("/webhooks/deliveries", params={"limit": 2}, headers=buyer.headers).json()
    page2 = client.get(
        "/webhooks/deliveries", params={"limit": 2, "cursor": page1["next_cursor"]}, headers=buyer.headers
    ).json()

    (bad,) = failed["items"]
    assert bad["status_code"] == 502
    assert bad["succeeded"] is False
    assert bad["error"] == "HTTP 502"
    assert bad["event_status"] == "pending"
    assert bad["url"] == receiver.url
    assert len(page1["items"]) == 2
    assert len(page2["items"]) == 1
    assert page2["next_cursor"] is None
    ids = {a["attempt_id"] for a in page1["items"] + page2["items"]}
    assert len(ids) == 3


def test_an_attempt_naming_another_broker_than_its_events_is_refused_and_never_listed(
    client: TestClient[Any], api_engine: Engine
) -> None:
    # The worker logs each attempt under its event's broker; a row that says otherwise (a bug, a hand-made repair)
    # is refused by the attempts' key (alembic 0021), so this broker's log can never show the other's event.
    mine, _ = register(client)
    theirs, _ = register(client)
    with api_engine.begin() as conn:
        event = conn.execute(
            text(
                "INSERT INTO webhook_events (broker_id, sequence, type, payload) "
                "VALUES (:theirs, 1, 'order.fill', '{}') RETURNING id"
            ),
            {"theirs": uuid.UUID(theirs.id)},
        ).scalar_one()
    with pytest.raises(IntegrityError) as refused, api_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO webhook_attempts (event_id, broker_id, url, status_code, error) "
                "VALUES (:event, :mine, 'http://127.0.0.1:9/hook', 500, 'HTTP 500')"
            ),
            {"event": event, "mine": uuid.UUID(mine.id)},
        )

    listed = client.get("/webhooks/deliveries", headers=mine.headers)

    assert isinstance(refused.value.orig, psycopg.Error)
    assert refused.value.orig.diag.constraint_name == "fk_webhook_attempts_event_id_webhook_events"
    assert listed.status_code == 200
    assert listed.json()["items"] == []


def test_a_bad_delivery_cursor_is_a_validation_error(client: TestClient[Any]) -> None:
    broker, _ = register(client)

    response = client.get("/webhooks/deliveries", params={"cursor": "zzz"}, headers=broker.headers)

    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"


@pytest.mark.parametrize("key", [True, 2**63, "7", None], ids=["bool", "beyond-bigint", "string", "null"])
def test_a_crafted_delivery_cursor_is_a_validation_error(client: TestClient[Any], key: object) -> None:
    broker, _ = register(client)
    crafted = base64.urlsafe_b64encode(json.dumps(["2026-01-01T00:00:00+00:00", key]).encode()).decode()

    response = client.get("/webhooks/deliveries", params={"cursor": crafted}, headers=broker.headers)

    assert (response.status_code, response.json()["code"]) == (422, "validation_error")


# ------------------------------------------------------------------------------------------------ admin


def test_admin_lists_a_disabled_endpoint_with_its_reason(
    client: TestClient[Any], api_engine: Engine, receiver: Receiver
) -> None:
    buyer, _ = register(client, receiver.url)
    seller, _ = register(client)
    trade(client, api_engine, buyer, seller)
    receiver.gone()
    (event_id,) = event_ids(client, buyer)
    deliverer(api_engine).deliver(uuid.UUID(event_id))

    response = client.get("/admin/webhooks/failing", headers=ADMIN)

    assert response.status_code == 200
    (mine,) = [e for e in response.json() if e["broker_id"] == buyer.id]
    assert mine["enabled"] is False
    assert "410" in mine["disabled_reason"]
    assert mine["failed_events"] == 1
    assert client.get("/admin/webhooks/failing", headers=buyer.headers).status_code == 401


def test_admin_does_not_list_an_endpoint_whose_first_attempt_is_in_flight_but_lists_one_being_retried(
    client: TestClient[Any], api_engine: Engine
) -> None:
    in_flight, _ = register(client, "http://127.0.0.1:9/in-flight")
    retried, _ = register(client, "http://127.0.0.1:9/retried")
    seller, _ = register(client)
    trade(client, api_engine, in_flight, seller)
    trade(client, api_engine, retried, seller)
    with api_engine.begin() as conn:  # both claimed (attempts 1, leased); only one has failed (recorded retry)
        conn.execute(
            text(
                "UPDATE webhook_events SET attempts = 1, next_attempt_at = now() + interval '60 seconds', "
                "last_error = CASE WHEN broker_id = :r THEN 'HTTP 500' END WHERE broker_id IN (:i, :r)"
            ),
            {"i": in_flight.id, "r": retried.id},
        )

    listed = {e["broker_id"]: e for e in client.get("/admin/webhooks/failing", headers=ADMIN).json()}

    assert in_flight.id not in listed
    assert listed[retried.id]["retrying_events"] == 1


def _failing_endpoint_listed(client: TestClient[Any], api_engine: Engine, url: str) -> tuple[str, str]:
    """Register a broker with ``url``, make its endpoint failing: (the URL the admin's list shows, the list's text)."""
    broker, _ = register(client, url)
    with api_engine.begin() as conn:
        conn.execute(text("UPDATE brokers SET webhook_consecutive_failures = 2 WHERE id = :id"), {"id": broker.id})
    response = client.get("/admin/webhooks/failing", headers=ADMIN)
    (mine,) = [e for e in response.json() if e["broker_id"] == broker.id]
    return mine["url"], response.text


def test_admin_lists_failing_endpoints_without_the_password_in_their_url(
    client: TestClient[Any], api_engine: Engine
) -> None:
    shown, listed = _failing_endpoint_listed(client, api_engine, "http://hook-user:s3cret-pw@127.0.0.1:9/hook")

    assert shown == "http://hook-user:***@127.0.0.1:9/hook"
    assert "s3cret-pw" not in listed


def test_admin_lists_failing_endpoints_without_a_lone_user_name_in_their_url_which_is_a_token(
    client: TestClient[Any], api_engine: Engine
) -> None:
    shown, listed = _failing_endpoint_listed(client, api_engine, "http://t0ken-xyz@127.0.0.1:9/hook")  # basic auth

    assert shown == "http://***@127.0.0.1:9/hook"
    assert "t0ken-xyz" not in listed


def test_admin_lists_failing_endpoints_without_a_user_name_whose_password_is_empty_which_is_a_token_too(
    client: TestClient[Any], api_engine: Engine
) -> None:
    # "TOKEN:@host" sends the same basic-auth credentials as "TOKEN@host": the user name is the secret.
    shown, listed = _failing_endpoint_listed(client, api_engine, "http://t0ken-xyz:@127.0.0.1:9/hook")

    assert shown == "http://***@127.0.0.1:9/hook"
    assert "t0ken-xyz" not in listed

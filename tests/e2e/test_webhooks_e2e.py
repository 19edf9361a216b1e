"""Fill webhooks through the real processes: api → matcher → outbox → ``exchange webhooks`` → a receiver on
127.0.0.1; and a delivery worker killed with SIGKILL mid-batch loses nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.e2e.conftest import Broker, Harness, HarnessFactory, unique_symbol, wait_until
from tests.webhook_receiver import Receiver


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    with Receiver() as a, Receiver() as b:
        yield a, b


def cross(buyer: Broker, seller: Broker, symbol: str, n: int) -> None:
    """``n`` one-share fills: one event for each side per fill."""
    for _ in range(n):
        seller.place(symbol, "ask", 1, 100)
        buyer.place(symbol, "bid", 1, 100)


def assert_every_event_received(harness: Harness, broker: Broker, receiver: Receiver, n: int) -> None:
    """The receiver holds ``n`` distinct events of ``broker``, with sequences 1..n and valid signatures."""
    bodies = {b["event_id"]: b for b in receiver.bodies()}
    assert sorted(b["sequence"] for b in bodies.values()) == list(range(1, n + 1))
    verifier = Webhook(broker.webhook_secret)
    for request in receiver.accepted():
        assert verifier.verify(request.body, request.headers)["event_id"] == request.headers["webhook-id"]
    stored = harness.query("SELECT id::text FROM webhook_events WHERE broker_id = %s", (broker.broker_id,))
    assert {event_id for (event_id,) in stored} == set(bodies)
    # The receiver records a request before it answers; the worker marks the event after the answer.
    sql = "SELECT count(*) FROM webhook_events WHERE broker_id = %s AND status <> 'delivered'"
    wait_until(lambda: harness.scalar(sql, (broker.broker_id,)) == 0, timeout=10, message="events marked delivered")


def test_fills_reach_each_brokers_receiver_signed_gap_free_and_after_retries(
    e2e_harness: Harness, receivers: tuple[Receiver, Receiver]
) -> None:
    buyer_hook, seller_hook = receivers
    buyer = e2e_harness.register_broker("wh-buyer", buyer_hook.url)
    seller = e2e_harness.register_broker("wh-seller", seller_hook.url)
    buyer_hook.fail_next(2)  # the first events are retried by the worker's delayed re-sends

    cross(buyer, seller, unique_symbol("WH"), 10)

    wait_until(
        lambda: len(buyer_hook.event_ids()) == 10 and len(seller_hook.event_ids()) == 10,
        timeout=30,
        message="20 events at the receivers",
    )
    e2e_harness.assert_alive()
    assert_every_event_received(e2e_harness, buyer, buyer_hook, 10)
    assert_every_event_received(e2e_harness, seller, seller_hook, 10)
    assert sum(r.status >= 500 for r in buyer_hook.received) == 2


def webhook_deliveries(harness: Harness) -> dict[str, float]:
    """exchange_webhook_deliveries_total by outcome, scraped from the webhooks worker's metrics port."""
    text = httpx.get(f"http://127.0.0.1:{harness.webhooks_metrics_port}/metrics", timeout=5).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("exchange_webhook_deliveries_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('outcome="', 1)[1].split('"', 1)[0]] = float(value)
    return counts


def test_the_delivery_worker_counts_its_attempts_by_outcome_in_prometheus(
    e2e_harness: Harness, receivers: tuple[Receiver, Receiver]
) -> None:
    buyer_hook, seller_hook = receivers
    before = webhook_deliveries(e2e_harness)
    buyer = e2e_harness.register_broker("wh-metrics-buyer", buyer_hook.url)
    seller = e2e_harness.register_broker("wh-metrics-seller", seller_hook.url)
    seller_hook.fail_next(1)

    cross(buyer, seller, unique_symbol("WM"), 3)
    wait_until(
        lambda: webhook_deliveries(e2e_harness).get("delivered", 0) - before.get("delivered", 0) >= 6,
        timeout=30,
        message="6 delivered attempts counted",
    )

    after = webhook_deliveries(e2e_harness)
    assert after.get("retry", 0) - before.get("retry", 0) >= 1


def test_killing_the_delivery_worker_mid_batch_loses_no_event(
    harness_factory: HarnessFactory, receivers: tuple[Receiver, Receiver]
) -> None:
    harness = harness_factory("webhook-crash")
    buyer_hook, seller_hook = receivers
    buyer_hook.delay_s = seller_hook.delay_s = 0.05  # slow receivers: plenty of deliveries in flight at the kill
    buyer = harness.register_broker("wh-buyer", buyer_hook.url)
    seller = harness.register_broker("wh-seller", seller_hook.url)

    cross(buyer, seller, unique_symbol("WK"), 40)
    wait_until(lambda: len(buyer_hook.event_ids()) >= 5, timeout=30, message="the first deliveries")
    harness.kill_service("webhooks")
    delivered_at_kill = len(buyer_hook.event_ids()) + len(seller_hook.event_ids())
    time.sleep(1.0)  # what a supervisor waits before restarting a dead process
    harness.start_service("webhooks", ["webhooks", "--threads", "8"])

    wait_until(
        lambda: len(buyer_hook.event_ids()) == 40 and len(seller_hook.event_ids()) == 40,
        timeout=60,
        message="all 80 events at the receivers after the restart",
    )
    assert delivered_at_kill < 80
    assert_every_event_received(harness, buyer, buyer_hook, 40)
    assert_every_event_received(harness, seller, seller_hook, 40)
    harness.check_invariants()

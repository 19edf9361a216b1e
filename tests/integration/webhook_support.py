"""Helpers of the webhook integration tests: brokers with endpoints, fills that write outbox events, the real
delivery pump with a shrunk retry schedule driven one pass at a time, and a loop that drives deliveries the way
the worker + sweeper would."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy import Engine, text

from exchange.matching.service import BookCache, process_symbol
from exchange.orders.brokers import new_webhook_secret
from exchange.webhooks.delivery import DeliveryConfig
from exchange.webhooks.outcomes import DeliveryResult, Outcome
from exchange.webhooks.pump import Observer, Pump
from tests.integration.sql_orders import add_broker, place

FAST = DeliveryConfig(
    retry_schedule=(0.05, 0.05, 0.05),
    connect_timeout_s=1.0,
    read_timeout_s=2.0,
    lease_s=1.0,
    disable_after=3,
    allow_private=True,
    max_in_flight=4,
)


class Deliverer:
    """Runs the real :class:`Pump` the way a worker process does, one pass at a time: a pass claims every event
    that is due (and whatever comes due while it runs), delivers and records them, and ends when nothing due is
    left and everything is recorded. ``observe`` (the worker's own, say:
    :func:`~exchange.webhooks.pump.count_in_metrics`) gets every result too."""

    def __init__(
        self, engine: Engine, config: DeliveryConfig, capacity: int = 8, observe: Observer | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.capacity = capacity
        self.observe = observe

    def drain(self) -> list[DeliveryResult]:
        """One pass; returns every result in the order they were recorded."""
        return asyncio.run(self._drain())

    def deliver(self, event_id: uuid.UUID) -> DeliveryResult:
        """One pass, which must attempt (or skip) ``event_id``; returns its result."""
        results = [r for r in self.drain() if r.event_id == event_id]
        assert results, f"event {event_id} was not due"
        return results[0]

    async def _drain(self) -> list[DeliveryResult]:
        results: list[DeliveryResult] = []
        observe = self.observe

        def observed(result: DeliveryResult) -> None:
            results.append(result)
            if observe is not None:
                observe(result)

        pump = Pump(self.engine, self.config, capacity=self.capacity, observe=observed)
        stop = asyncio.Event()
        running = asyncio.create_task(pump.run(stop))
        idle = asyncio.create_task(pump.idle())
        await asyncio.wait({idle, running}, return_when=asyncio.FIRST_COMPLETED)  # a pump that died is not idle
        idle.cancel()
        stop.set()
        await running  # raises PumpDiedError if it died
        return results


def deliverer(engine: Engine, observe: Observer | None = None, **overrides: Any) -> Deliverer:
    return Deliverer(engine, replace(FAST, **overrides), observe=observe)


def broker_with_endpoint(engine: Engine, url: str | None, name: str | None = None) -> tuple[uuid.UUID, str]:
    """A broker whose webhook URL is ``url``; returns (id, whsec secret)."""
    broker_id = add_broker(engine, name or f"wh-{uuid.uuid4().hex[:8]}")
    secret = new_webhook_secret()
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE brokers SET webhook_url = :url, webhook_secret = :s WHERE id = :id"),
            {"url": url, "s": secret, "id": broker_id},
        )
    return broker_id, secret


def fills(engine: Engine, buyer: uuid.UUID, seller: uuid.UUID, n: int = 1) -> list[uuid.UUID]:
    """``n`` one-share fills between ``buyer`` and ``seller`` (2 events each); returns the outbox event ids."""
    symbol = "W" + uuid.uuid4().hex[:6].upper()
    for _ in range(n):
        place(engine, seller, symbol, "ask", 1, 100)
        place(engine, buyer, symbol, "bid", 1, 100)
    return process_symbol(engine, BookCache(), symbol).event_ids


def events_of(engine: Engine, broker_id: uuid.UUID) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, sequence, status, attempts, last_error, payload::text AS body FROM webhook_events "
                    "WHERE broker_id = :b ORDER BY sequence"
                ),
                {"b": broker_id},
            )
        )


def broker_row(engine: Engine, broker_id: uuid.UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(text("SELECT * FROM brokers WHERE id = :id"), {"id": broker_id}).one()


def status_counts(engine: Engine, broker_id: uuid.UUID) -> dict[str, int]:
    """Events of a broker by status, claimed ones (pending with an attempt in flight) counted apart."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT CASE WHEN status = 'pending' AND attempts > 0 THEN 'claimed' ELSE status END, count(*) "
                "FROM webhook_events WHERE broker_id = :b GROUP BY 1"
            ),
            {"b": broker_id},
        )
        return {row[0]: row[1] for row in rows}


def attempts_of(engine: Engine, event_id: uuid.UUID) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(text("SELECT * FROM webhook_attempts WHERE event_id = :id ORDER BY id"), {"id": event_id})
        )


def deliver_until_settled(d: Deliverer, event_id: uuid.UUID, timeout: float = 10.0) -> list[DeliveryResult]:
    """Run passes as retries come due until the event leaves ``pending``; returns the event's results."""
    results: list[DeliveryResult] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results += [r for r in d.drain() if r.event_id == event_id]
        if results and results[-1].outcome in (Outcome.DELIVERED, Outcome.FAILED, Outcome.SKIPPED):
            return results
        time.sleep(0.02)
    raise AssertionError(f"event {event_id} not settled after {timeout}s: {results}")


def drive(
    d: Deliverer,
    engine: Engine,
    ids: list[uuid.UUID],
    timeout: float = 15.0,
    each_round: Callable[[int], None] | None = None,
) -> int:
    """Run passes until no event of ``ids`` is pending (a stand-in for the worker + sweeper); ``each_round(n)``
    runs after pass ``n``. Returns the number of passes."""
    deadline = time.monotonic() + timeout
    rounds = 0
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            pending = (
                conn.execute(
                    text("SELECT id FROM webhook_events WHERE id = ANY(:ids) AND status = 'pending'"), {"ids": ids}
                )
                .scalars()
                .all()
            )
        if not pending:
            return rounds
        d.drain()
        rounds += 1
        if each_round is not None:
            each_round(rounds)
        time.sleep(0.02)
    raise AssertionError("events still pending")

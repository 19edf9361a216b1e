"""Fault injection: a matcher killed with SIGKILL while orders flow loses nothing (on a private exchange)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest

from exchange.dev import FIRST_RESTART_DELAY_S
from tests.e2e.conftest import PARTITIONS, Broker, Harness, HarnessFactory, unique_symbol

ORDERS = 300
SYMBOLS_PER_SIDE = 10
CONCURRENCY = 8
KILL_AFTER = 60
"""Orders answered before the kill (the rest flow during the outage and after the restart)."""
RESTART_DELAY_S = FIRST_RESTART_DELAY_S
"""What a supervisor waits before restarting a dead process (``exchange dev`` and Docker: 100 ms)."""
DEAD_PARTITIONS = {0, 1}
LIVE_PARTITIONS = set(range(PARTITIONS)) - DEAD_PARTITIONS


def _random_order(rng: random.Random, symbols: list[str], n: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "document_number": f"{rng.randint(1, 5):011d}",
        "side": rng.choice(["bid", "ask"]),
        "symbol": rng.choice(symbols),
        "quantity": rng.randint(1, 5),
        "client_order_id": f"crash-{n}-{uuid.uuid4().hex[:12]}",
    }
    if rng.random() < 0.1:
        body["order_type"] = "market"
    else:
        body["order_type"] = "limit"
        body["price"] = rng.randint(95, 105)
    return body


class OrderFlow:
    """Posts the planned orders from a background thread, CONCURRENCY at a time, retrying transport errors with
    the same client_order_id (as a broker would); records every order id answered with 201."""

    def __init__(self, harness: Harness, plan: list[tuple[Broker, dict[str, Any]]]) -> None:
        self.harness = harness
        self.plan = plan
        self.accepted: dict[str, str] = {}
        self.failures: list[str] = []
        self.answered = 0
        self.enough = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="order-flow", daemon=True)

    async def _run(self) -> None:
        semaphore = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=self.harness.base_url, timeout=30, limits=limits) as client:

            async def post(broker: Broker, body: dict[str, Any]) -> None:
                async with semaphore:
                    for attempt in range(3):
                        try:
                            response = await client.post("/orders", json=body, headers=broker.headers)
                        except httpx.HTTPError as exc:
                            if attempt == 2:
                                self.failures.append(f"{body['client_order_id']}: {exc!r}")
                            continue
                        if response.status_code == 201:
                            self.accepted[body["client_order_id"]] = response.json()["order_id"]
                        else:
                            self.failures.append(f"{body['client_order_id']}: {response.status_code} {response.text}")
                        break
                    self.answered += 1
                    if self.answered >= KILL_AFTER:
                        self.enough.set()

            await asyncio.gather(*(post(broker, body) for broker, body in self.plan))
        self.enough.set()


def test_sigkill_of_a_matcher_while_orders_flow_loses_no_order(
    harness_factory: HarnessFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    h = harness_factory("crash")
    brokers = [h.register_broker("alpha"), h.register_broker("beta")]
    dead = [unique_symbol("K", DEAD_PARTITIONS) for _ in range(SYMBOLS_PER_SIDE)]
    live = [unique_symbol("L", LIVE_PARTITIONS) for _ in range(SYMBOLS_PER_SIDE)]
    rng = random.Random(20240611)
    plan = [(brokers[n % 2], _random_order(rng, dead + live, n)) for n in range(ORDERS)]
    flow = OrderFlow(h, plan)

    flow.thread.start()
    assert flow.enough.wait(60), "orders did not start flowing"
    t_kill: datetime = h.scalar("SELECT clock_timestamp()")
    h.kill_service("matcher-a")  # partitions 0-1: SIGKILL to its whole process group
    time.sleep(RESTART_DELAY_S)
    t_restart: datetime = h.scalar("SELECT clock_timestamp()")
    h.start_matcher("matcher-a", "0-1")
    flow.thread.join(timeout=120)
    assert not flow.thread.is_alive(), "the order flow did not finish"
    h.drain(timeout=90)

    # Every order that got a 201 exists, was applied, and is open or closed; nothing else was created.
    assert flow.failures == []
    assert len(flow.accepted) == ORDERS
    ids = list(flow.accepted.values())
    states = dict(h.query("SELECT id::text, status FROM orders WHERE id = ANY(%s::uuid[])", (ids,)))
    assert set(states) == set(ids)
    assert set(states.values()) <= {"open", "closed"}
    assert h.scalar("SELECT count(*) FROM orders WHERE symbol = ANY(%s)", (dead + live,)) == ORDERS

    # Orders did flow during the outage, and the surviving matcher kept serving its partitions meanwhile.
    during = h.scalar(
        "SELECT count(*) FROM orders WHERE symbol = ANY(%s) AND created_at > %s AND created_at < %s",
        (dead + live, t_kill, t_restart),
    )
    assert during > 0, "no order was accepted while the matcher was down"
    live_during = h.scalar(
        "SELECT count(*) FROM commands WHERE symbol = ANY(%s) AND created_at > %s AND created_at < %s",
        (live, t_kill, t_restart),
    )
    if live_during:
        served = h.scalar(
            "SELECT count(*) FROM commands WHERE symbol = ANY(%s) AND processed_at > %s AND processed_at < %s",
            (live, t_kill, t_restart),
        )
        assert served > 0, "the surviving matcher processed nothing while the other one was down"

    first: datetime | None = h.scalar(
        "SELECT min(processed_at) FROM commands WHERE symbol = ANY(%s) AND processed_at > %s", (dead, t_kill)
    )
    assert first is not None, "no command of the killed matcher's partitions was processed after the kill"
    with capsys.disabled():
        print(
            f"\n[matcher SIGKILL] orders accepted during the outage: {during}; "
            f"kill -> first processed command on partitions 0-1: {(first - t_kill).total_seconds():.3f}s "
            f"(restart after {(t_restart - t_kill).total_seconds():.3f}s; "
            f"restart -> first processed: {(first - t_restart).total_seconds():.3f}s)"
        )
    h.check_invariants()

"""The sweeper against real PostgreSQL and Redis: stale symbols are re-nudged, due GTD orders expire."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import Engine, text

from exchange.matching.service import BookCache, process_symbol
from exchange.messaging.partitions import matching_queue, partition_of
from exchange.sweeper import _LOG_EXPIRIES, EXPIRY_LOCK, SweepResult, sweep_once
from tests.integration.redis_support import namespaced_broker
from tests.integration.sql_orders import add_broker, place

PARTITIONS = 4


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    """A real Redis broker in a namespace of its own, so concurrent runs and other tests never share queues."""
    with namespaced_broker(RedisBroker) as broker:
        yield broker


def queued_messages(broker: RedisBroker, symbol: str) -> list[list[str]]:
    """The symbols each message queued on ``symbol``'s partition names, in queue order."""
    queue = f"{broker.namespace}:{matching_queue(partition_of(symbol, PARTITIONS))}"
    ids = broker.client.lrange(queue, 0, -1)
    bodies = [broker.client.hget(f"{queue}.msgs", i) for i in ids]
    return [list(json.loads(b)["args"]) for b in bodies if b]


def queued_symbols(broker: RedisBroker, symbol: str) -> list[str]:
    return [name for message in queued_messages(broker, symbol) for name in message]


def test_a_symbol_with_an_old_pending_command_is_renudged_to_its_partition(engine: Engine, broker: RedisBroker) -> None:
    place(engine, add_broker(engine, "b"), "PETR4", "bid", 1, 100)

    result = sweep_once(engine, broker, PARTITIONS, stale_after_s=0.0)

    assert result.renudged == ["PETR4"]
    assert queued_symbols(broker, "PETR4") == ["PETR4"]


def test_stale_symbols_are_renudged_with_one_message_per_partition_naming_them_all(
    engine: Engine, broker: RedisBroker
) -> None:
    symbols = [f"SWP{n:03d}" for n in range(40)]
    first = symbols[0]
    together = [s for s in symbols if partition_of(s, PARTITIONS) == partition_of(first, PARTITIONS)][:3]
    apart = next(s for s in symbols if partition_of(s, PARTITIONS) != partition_of(first, PARTITIONS))
    b = add_broker(engine, "b")
    for symbol in [*together, apart]:
        place(engine, b, symbol, "bid", 1, 100)

    result = sweep_once(engine, broker, PARTITIONS, stale_after_s=0.0)

    assert sorted(result.renudged) == sorted([*together, apart])
    assert len(together) == 3
    assert queued_messages(broker, first) == [sorted(together)]
    assert queued_messages(broker, apart) == [[apart]]


def test_a_fresh_pending_command_is_left_to_its_own_wakeup(engine: Engine, broker: RedisBroker) -> None:
    place(engine, add_broker(engine, "b"), "PETR4", "bid", 1, 100)

    assert sweep_once(engine, broker, PARTITIONS, stale_after_s=60).renudged == []


def test_due_gtd_orders_get_one_expire_command_and_are_closed_expired(engine: Engine, broker: RedisBroker) -> None:
    b = add_broker(engine, "b")
    order_id = place(engine, b, "VALE3", "ask", 1, 100, valid_until=datetime.now(UTC) + timedelta(minutes=10))
    cache = BookCache()
    process_symbol(engine, cache, "VALE3")
    with engine.begin() as conn:  # let it come due without sleeping: move valid_until into the past
        conn.execute(text("UPDATE orders SET valid_until = now() - interval '1 second'"))

    first = sweep_once(engine, broker, PARTITIONS, stale_after_s=60)
    second = sweep_once(engine, broker, PARTITIONS, stale_after_s=60)
    process_symbol(engine, BookCache(), "VALE3")

    assert (first.expiring, second.expiring) == (["VALE3"], [])
    assert "VALE3" in queued_symbols(broker, "VALE3")
    with engine.connect() as conn:
        row = conn.execute(text("SELECT status, close_reason FROM orders WHERE id = :id"), {"id": order_id}).one()
        kinds = conn.execute(text("SELECT kind FROM commands ORDER BY seq")).scalars().all()
    assert tuple(row) == ("closed", "expired")
    assert kinds == ["place", "expire"]


def test_two_sweepers_at_once_log_one_expire_command_per_symbol(engine: Engine, broker: RedisBroker) -> None:
    b = add_broker(engine, "b")
    place(engine, b, "ITSA4", "ask", 1, 100, valid_until=datetime.now(UTC) + timedelta(minutes=10))
    process_symbol(engine, BookCache(), "ITSA4")
    with engine.begin() as conn:
        conn.execute(text("UPDATE orders SET valid_until = now() - interval '1 second'"))
    other = engine.connect()  # another sweeper, inside its expiry logging: its insert made, not yet committed
    other.execute(text("SELECT pg_advisory_xact_lock(:s, :k)"), {"s": EXPIRY_LOCK[0], "k": EXPIRY_LOCK[1]})
    assert [row.symbol for row in other.execute(_LOG_EXPIRIES)] == ["ITSA4"]
    results: list[SweepResult] = []
    sweeping = threading.Thread(target=lambda: results.append(sweep_once(engine, broker, PARTITIONS)))
    sweeping.start()
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
    )
    deadline = time.monotonic() + 10
    with engine.connect() as conn:  # this sweeper waits for its turn while the other's insert is not committed
        while conn.execute(text(waiting)).scalar_one() == 0:
            conn.rollback()  # pg_stat_activity is read once per transaction: each poll needs a new one
            assert time.monotonic() < deadline, "the sweeper never waited for the other's turn"
            time.sleep(0.01)
    other.commit()
    other.close()
    sweeping.join(10)

    assert results[0].expiring == []
    with engine.connect() as conn:
        expires = conn.execute(text("SELECT count(*) FROM commands WHERE kind = 'expire'")).scalar_one()
    assert expires == 1

"""The matcher actor in a real ``exchange matcher`` process (dramatiq, Redis, PostgreSQL): a partition's message
and the symbols woken on the partition while it was held are processed in one transaction, the partition is released
afterwards, and a single-symbol message (the sweeper's) still works."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, text

from exchange.matching.service import FAILURE_BACKOFF_S, MAX_EXPIRIES_PER_TRANSACTION, MAX_SYMBOLS_PER_BATCH
from exchange.messaging.broker import DoorbellRedisBroker
from exchange.messaging.names import read_namespace
from exchange.messaging.partitions import matching_queue, partition_of
from exchange.messaging.wakeups import busy_key, partition_message, send_wakeups, woken_key
from exchange.observability.propagation import REQUEST_ID_OPTION
from tests.integration.redis_support import claimed_database
from tests.integration.sql_orders import add_broker, close_order, place, rest_crossed_pair
from tests.integration.test_expiry_backlog import add_due_asks
from tests.integration.worker_processes import running_matcher

PARTITIONS = 4


@pytest.fixture
def redis_url() -> Iterator[str]:
    with claimed_database() as url:
        yield url


@pytest.fixture
def namespace(fresh_migrated_database_url: str) -> str:
    """The Redis namespace the matcher derives from its database."""
    return read_namespace(fresh_migrated_database_url)


@pytest.fixture
def matcher(fresh_migrated_database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Path]:
    """An ``exchange matcher`` over every partition; yields its log file (in pytest's own temporary directory,
    which pytest prunes, unlike a directory of ``tempfile`` left behind by every run)."""
    with running_matcher(tmp_path, "matcher", fresh_migrated_database_url, redis_url, PARTITIONS) as log_path:
        yield log_path


def same_partition(n: int, count: int) -> list[str]:
    tag = uuid.uuid4().hex[:5].upper()
    return [s for i in range(40 * count) if partition_of(s := f"A{tag}{i}", PARTITIONS) == n][:count]


def wait_processed(engine: Engine, symbols: list[str], log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            pending = conn.execute(
                text("SELECT count(*) FROM commands WHERE symbol = ANY(:s) AND processed_at IS NULL"), {"s": symbols}
            ).scalar_one()
        if pending == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"{symbols} not processed within {timeout} s; matcher log:\n{log_path.read_text()[-4000:]}")


def test_a_partition_message_takes_the_symbols_woken_on_it_into_one_transaction_and_releases_the_partition(
    engine: Engine, redis_url: str, namespace: str, matcher: Path
) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    grouped = same_partition(2, 5)
    [single] = same_partition(1, 1)
    for symbol in [*grouped, single]:
        place(engine, seller, symbol, "ask", 3, 100)
        place(engine, buyer, symbol, "bid", 2, 100)
    client = redis.Redis.from_url(redis_url)
    # As the api leaves a held partition: the message names the first symbols, the rest were woken after it was sent.
    client.sadd(woken_key(namespace, 2), *grouped[2:])
    client.set(busy_key(namespace, 2), b"1", px=60_000)
    broker = DoorbellRedisBroker(url=redis_url, namespace=namespace)  # type: ignore[no-untyped-call]
    for n in range(PARTITIONS):
        broker.declare_queue(matching_queue(n))

    broker.enqueue(partition_message(2, grouped[:2]))
    send_wakeups(broker, [single], PARTITIONS)  # the sweeper's re-nudge, partition not held
    wait_processed(engine, [*grouped, single], matcher)

    with engine.connect() as conn:
        traded = dict(conn.execute(text("SELECT symbol, sum(quantity) FROM trades GROUP BY symbol")).all())
        # One transaction stamps every command it applies with its one clock reading.
        stamps = conn.execute(
            text("SELECT count(DISTINCT processed_at) FROM commands WHERE symbol = ANY(:s)"), {"s": grouped}
        ).scalar_one()
        balances = conn.execute(text("SELECT sum(balance) FROM brokers")).scalar_one()
    assert traded == dict.fromkeys([*grouped, single], 2)
    assert stamps == 1
    assert balances == 0
    keys = [woken_key(namespace, 2), busy_key(namespace, 2), woken_key(namespace, 1), busy_key(namespace, 1)]
    deadline = time.monotonic() + 5  # the release follows the commit and the published results
    while client.exists(*keys) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.exists(*keys) == 0  # taken, then released
    client.close()
    broker.close()


def test_a_transaction_of_several_books_logs_one_matched_line_naming_each_book(
    engine: Engine, redis_url: str, namespace: str, matcher: Path
) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    grouped = same_partition(3, 3)
    for symbol in grouped:
        place(engine, seller, symbol, "ask", 3, 100)
        place(engine, buyer, symbol, "bid", 2, 100)
    broker = DoorbellRedisBroker(url=redis_url, namespace=namespace)  # type: ignore[no-untyped-call]
    broker.declare_queue(matching_queue(3))
    broker.enqueue(partition_message(3, grouped))
    wait_processed(engine, grouped, matcher)

    deadline = time.monotonic() + 5  # the line follows the commit, through dramatiq's log relay
    while time.monotonic() < deadline and "matched books=" not in matcher.read_text():
        time.sleep(0.05)
    time.sleep(0.5)  # a second line, were there one, would have arrived by now
    lines = [line for line in matcher.read_text().splitlines() if "matched books=" in line]
    assert len(lines) == 1, lines
    assert "matched books=3 commands=6 trades=3 " in lines[0], lines[0]
    named = lines[0].split(" symbols=", 1)[1].split()[0]
    assert sorted(named.split(",")) == sorted(grouped), lines[0]
    broker.close()


def test_a_transaction_that_closes_a_share_of_an_expiry_backlog_logs_its_matched_line(
    engine: Engine, redis_url: str, namespace: str, matcher: Path
) -> None:
    # It applies no command, yet it is the transaction nearest the idle limit: its line (and latency) must show.
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    [symbol] = same_partition(3, 1)
    add_due_asks(engine, seller, symbol, MAX_EXPIRIES_PER_TRANSACTION + 1)
    place(engine, buyer, symbol, "bid", 1, 1)  # pending behind the backlog
    broker = DoorbellRedisBroker(url=redis_url, namespace=namespace)  # type: ignore[no-untyped-call]
    broker.declare_queue(matching_queue(3))
    broker.enqueue(partition_message(3, [symbol]))
    wait_processed(engine, [symbol], matcher)

    deadline = time.monotonic() + 5  # the lines follow the commits, through dramatiq's log relay
    while time.monotonic() < deadline and matcher.read_text().count("matched books=") < 2:
        time.sleep(0.05)
    lines = [line for line in matcher.read_text().splitlines() if "matched books=" in line]
    assert len(lines) == 2, lines
    expired = f"matched books=1 commands=0 trades=0 events={MAX_EXPIRIES_PER_TRANSACTION} rebuilt=1 symbols={symbol}"
    assert expired in lines[0], lines[0]
    assert "matched books=1 commands=1 trades=0 events=0 rebuilt=0" in lines[1], lines[1]
    broker.close()


def test_only_the_first_transaction_of_a_hold_carries_the_request_id_of_its_message(
    engine: Engine, redis_url: str, namespace: str, matcher: Path
) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    symbols = same_partition(0, MAX_SYMBOLS_PER_BATCH + 1)  # two transactions: 32 books, then the last one
    for symbol in symbols:
        place(engine, seller, symbol, "ask", 3, 100)
        place(engine, buyer, symbol, "bid", 2, 100)
    broker = DoorbellRedisBroker(url=redis_url, namespace=namespace)  # type: ignore[no-untyped-call]
    broker.declare_queue(matching_queue(0))
    message = partition_message(0, symbols)
    message.options[REQUEST_ID_OPTION] = "rid-first"
    broker.enqueue(message)
    wait_processed(engine, symbols, matcher)

    deadline = time.monotonic() + 5  # the lines follow the commits, through dramatiq's log relay
    while time.monotonic() < deadline and matcher.read_text().count("matched books=") < 2:
        time.sleep(0.05)
    lines = [line for line in matcher.read_text().splitlines() if "matched books=" in line]
    assert [line.split("matched books=", 1)[1].split()[0] for line in lines] == ["32", "1"], lines
    assert lines[0].endswith(" request_id=rid-first"), lines[0]
    assert "request_id=" not in lines[1], lines[1]  # was rid-first: the first message's id for every transaction
    broker.close()


def test_a_symbol_whose_failure_clears_is_matched_when_its_backoff_ends_without_a_sweeper(
    engine: Engine, redis_url: str, namespace: str, matcher: Path
) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    [symbol] = same_partition(1, 1)
    crossed_bid = rest_crossed_pair(engine, symbol, buyer, seller)  # its rebuild fails: FAILURE_BACKOFF_S
    place(engine, buyer, symbol, "bid", 1, 50)
    broker = DoorbellRedisBroker(url=redis_url, namespace=namespace)  # type: ignore[no-untyped-call]
    broker.declare_queue(matching_queue(1))
    broker.enqueue(partition_message(1, [symbol]))  # one wake-up, and no sweeper: nothing else wakes the symbol
    failed = f"processing {symbol} failed (ValueError, 1 in a row)"
    deadline = time.monotonic() + 10
    while failed not in matcher.read_text():
        assert time.monotonic() < deadline, matcher.read_text()[-4000:]
        time.sleep(0.02)

    close_order(engine, crossed_bid)  # mended while the symbol backs off: its next attempt succeeds
    # Within its backoff (and a margin), though no sweeper runs and no new command wakes it.
    wait_processed(engine, [symbol], matcher, timeout=FAILURE_BACKOFF_S + 1.0)
    broker.close()

"""The matcher actor in a real ``exchange matcher`` process (dramatiq, Redis, PostgreSQL): a message naming several
symbols of a partition is processed in one transaction, and a single-symbol message (the sweeper's, or one queued
before multi-symbol messages existed) still works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from sqlalchemy import Engine, text

from exchange.messaging.broker import DoorbellRedisBroker
from exchange.messaging.partitions import matching_queue, partition_of
from exchange.messaging.wakeups import match_message, partition_message, wake_key
from tests.integration.redis_support import redis_test_url
from tests.integration.sql_orders import add_broker, place

REPO_ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
REDIS_CLAIM_KEY = "exchange:e2e:claimed-by"
"""The claim the e2e harness puts on a Redis database it uses (tests/e2e/conftest.py): honoured here too."""


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of this test's own on the tests' Redis server (1..15, claimed like the e2e harness does),
    flushed after: the matcher process consumes every matching queue of it."""
    run_id = uuid.uuid4().hex
    server = urlsplit(redis_test_url())
    for n in range(15, 0, -1):
        url = server._replace(path=f"/{n}", query="").geturl()
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
        try:
            if client.set(REDIS_CLAIM_KEY, run_id, nx=True, ex=600):
                break
        finally:
            client.close()
    else:
        pytest.skip("no free Redis database in 1..15")
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        client.set(REDIS_CLAIM_KEY, run_id, ex=600)
        yield url
        if client.get(REDIS_CLAIM_KEY) == run_id.encode():
            client.flushdb()
    finally:
        client.close()


@pytest.fixture
def matcher(fresh_migrated_database_url: str, redis_url: str) -> Iterator[Path]:
    """An ``exchange matcher`` over every partition; yields its log file."""
    work = Path(tempfile.mkdtemp(prefix="exchange-test-matcher-actor-"))
    (work / "empty.env").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXCHANGE_", "dramatiq_"))}
    env.update(
        EXCHANGE_ENV_FILE=str(work / "empty.env"),
        EXCHANGE_LOG_FORMAT="text",
        EXCHANGE_DATABASE_URL=fresh_migrated_database_url,
        EXCHANGE_REDIS_URL=redis_url,
        EXCHANGE_PARTITIONS=str(PARTITIONS),
        PYTHONUNBUFFERED="1",
    )
    log_path = work / "matcher.log"
    argv = [sys.executable, "-m", "exchange.cli", "matcher", "--partitions", "all", "--threads", "1"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def same_partition(n: int, count: int) -> list[str]:
    tag = uuid.uuid4().hex[:5].upper()
    return [s for i in range(400) if partition_of(s := f"A{tag}{i}", PARTITIONS) == n][:count]


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


def test_one_message_per_partition_is_processed_in_one_transaction_and_single_symbol_messages_still_work(
    engine: Engine, redis_url: str, matcher: Path
) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    grouped = same_partition(2, 5)
    [single] = same_partition(1, 1)
    for symbol in [*grouped, single]:
        place(engine, seller, symbol, "ask", 3, 100)
        place(engine, buyer, symbol, "bid", 2, 100)
    client = redis.Redis.from_url(redis_url)
    for symbol in [*grouped, single]:
        client.set(wake_key(symbol), b"1", px=60_000)  # as wake_async leaves them: the actor must clear them
    broker = DoorbellRedisBroker(url=redis_url)  # type: ignore[no-untyped-call]
    for n in range(PARTITIONS):
        broker.declare_queue(matching_queue(n))

    broker.enqueue(partition_message(2, grouped))
    broker.enqueue(match_message(single, PARTITIONS))  # args=(symbol,): the old message shape
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
    assert client.exists(*(wake_key(symbol) for symbol in [*grouped, single])) == 0
    client.close()
    broker.close()

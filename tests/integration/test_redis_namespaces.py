"""Two exchanges (two PostgreSQL databases) on ONE Redis database: each keeps its own work.

Every Redis key and channel of an exchange is named under a namespace derived from its database's identity
(:mod:`exchange.messaging.names`). Before that, a matcher of another database on the same Redis database took this
exchange's partition messages and its set of woken symbols, found nothing in its own database, and this exchange's
orders waited for its sweeper (or forever, without one).

The cross-exchange test goes through the processes' own interfaces only (the api app, ``exchange matcher``,
``/metrics``), so it runs unchanged against the code before the namespaces, where it fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from litestar.testing import TestClient

from exchange.api.app import create_app
from exchange.config import Settings
from tests.conftest import DatabaseFactory
from tests.integration.api_helpers import Broker, new_symbol, register
from tests.integration.redis_support import claimed_database
from tests.integration.worker_processes import running_matcher

pytest_plugins = ["tests.integration.api_fixtures"]

PROCESSED_WITHIN_S = 60.0
"""A generous bound on work that either happens in milliseconds or never (not a latency assert)."""


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition, or None."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in exposition.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return None


@pytest.fixture
def redis_url() -> Iterator[str]:
    with claimed_database() as url:  # one Redis database, shared by the two exchanges below and no one else
        yield url


@pytest.fixture
def other_database_url(database_factory: DatabaseFactory, _migrated_template_name: str) -> Iterator[str]:
    """A second exchange's database (migrated, empty), beside ``fresh_migrated_database_url``."""
    url = database_factory.create(template=_migrated_template_name)
    yield url
    database_factory.drop(url)


@pytest.fixture
def app_on(client_factory: Callable[..., TestClient[Any]]) -> Callable[[str, str], TestClient[Any]]:
    """Start an api app (lifespan included) on a database and a Redis database, one partition; closed at teardown."""
    return lambda database_url, redis_url: client_factory(
        database_url=database_url, redis_url=redis_url, partitions="1"
    )


def place_bid(client: TestClient[Any], broker: Broker, symbol: str) -> str:
    body = {"document_number": "1", "side": "bid", "symbol": symbol, "price": 100, "quantity": 10}
    response = client.post("/orders", json=body, headers=broker.headers)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "pending"  # EXCHANGE_ORDER_WAIT_MS=0: answered before any matcher
    order_id: str = response.json()["id"]
    return order_id


def status(client: TestClient[Any], broker: Broker, order_id: str) -> str:
    value: str = client.get(f"/orders/{order_id}", headers=broker.headers).json()["status"]
    return value


def wait_matched(client: TestClient[Any], broker: Broker, order_id: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + PROCESSED_WITHIN_S
    while status(client, broker, order_id) == "pending":
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
            pytest.fail(f"order {order_id} never left 'pending' (its wake-up was taken elsewhere?)\n{tails}")
        time.sleep(0.05)


def test_a_matcher_of_another_database_on_the_same_redis_database_never_takes_this_exchanges_work(
    fresh_migrated_database_url: str,
    other_database_url: str,
    redis_url: str,
    app_on: Callable[[str, str], TestClient[Any]],
    tmp_path: Path,
) -> None:
    ours, theirs = app_on(fresh_migrated_database_url, redis_url), app_on(other_database_url, redis_url)
    our_broker, their_broker = register(ours), register(theirs)
    with running_matcher(tmp_path, "their-matcher", other_database_url, redis_url, 1) as their_log:
        ours_pending = place_bid(ours, our_broker, new_symbol())  # woken: a message for OUR matcher (none runs)
        theirs_pending = place_bid(theirs, their_broker, new_symbol())
        wait_matched(theirs, their_broker, theirs_pending, [their_log])  # their matcher is up and consuming

        # Their matcher has processed a message enqueued after ours: it never took ours, which still waits in our
        # exchange's queue (as our /metrics reads it), and our order is untouched.
        assert sample(ours.get("/metrics").text, "exchange_queue_messages", queue="matching.0", state="ready") == 1
        assert status(ours, our_broker, ours_pending) == "pending"

        # Our matcher, once it runs, finds our wake-up (message and woken symbols) and processes our order.
        with running_matcher(tmp_path, "our-matcher", fresh_migrated_database_url, redis_url, 1) as our_log:
            wait_matched(ours, our_broker, ours_pending, [our_log, their_log])
            # And each exchange's later orders are matched by its own matcher alone.
            for client, broker in ((ours, our_broker), (theirs, their_broker)):
                wait_matched(client, broker, place_bid(client, broker, new_symbol()), [our_log, their_log])


def test_one_database_reached_by_two_urls_derives_one_namespace_and_two_databases_two(
    fresh_migrated_database_url: str, other_database_url: str
) -> None:
    from exchange.messaging.names import read_namespace

    parts = urlsplit(fresh_migrated_database_url)
    if parts.hostname != "127.0.0.1":
        pytest.skip("renames the host 127.0.0.1 of the tests' PostgreSQL (here it is elsewhere)")
    by_name = parts._replace(netloc=parts.netloc.replace("127.0.0.1", "localhost")).geturl()
    ours = read_namespace(fresh_migrated_database_url)
    assert read_namespace(by_name) == ours
    assert read_namespace(other_database_url) != ours
    assert ours.startswith("exchange-")


def test_a_configured_namespace_names_the_apis_broker_and_its_keys(
    fresh_migrated_database_url: str, redis_url: str
) -> None:
    from exchange.api.state import api_state

    settings = Settings.from_env(
        {
            "EXCHANGE_DATABASE_URL": fresh_migrated_database_url,
            "EXCHANGE_REDIS_URL": redis_url,
            "EXCHANGE_REDIS_NAMESPACE": "staging-1",
        }
    )
    with TestClient(create_app(settings)) as client:
        assert api_state(client.app).broker.namespace == "staging-1"

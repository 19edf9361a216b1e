"""A real Redis for integration tests that talk to it directly (not through the api).

``EXCHANGE_TEST_REDIS_URL`` when set (the session sets it when it starts an embedded Redis), else database 11 on
the local server, like the api tests: never the database a running dev exchange uses.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/11"
REDIS_CLAIM_KEY = "exchange:e2e:claimed-by"
"""Put on a Redis database a test run uses (here and by the e2e harness), so concurrent runs keep off it."""

B = TypeVar("B", bound=RedisBroker)


def redis_test_url() -> str:
    return os.environ.get("EXCHANGE_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)


@contextmanager
def namespaced_broker(broker_class: type[B]) -> Iterator[B]:
    """A dramatiq Redis broker in a namespace of its own (concurrent runs and other tests never share its queues),
    its keys and doorbells deleted afterwards. Fails the test when Redis is unreachable."""
    url = redis_test_url()
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is unreachable at {url}: {exc}")
    namespace = f"exchange-test-{uuid.uuid4().hex[:8]}"
    broker = broker_class(url=url, namespace=namespace)
    try:
        yield broker
    finally:
        # Keys named after the namespace: its queues, doorbells, and e.g. the webhook hint key and its ring.
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)
        broker.close()
        client.close()


def database_url(server_url: str, n: int) -> str:
    """Database ``n`` on the server of ``server_url`` (``redis://host:port/n``, or ``unix:///path.sock?db=n`` for
    the embedded Redis the session starts when none answers at 127.0.0.1)."""
    parts = urlsplit(server_url)
    if parts.scheme == "unix":  # urlunsplit would drop the empty authority ("unix:/path"), which redis-py refuses
        return f"unix://{parts.path}?db={n}"
    return parts._replace(path=f"/{n}", query="").geturl()


def shared_database() -> int:
    """The number of the database the api integration tests share (:func:`redis_test_url`'s, 11 by default). They
    never claim it: they read the api's queues there and rely on no matcher consuming them."""
    return int(redis.connection.parse_url(redis_test_url()).get("db", 0))  # type: ignore[no-untyped-call]


def claim_database(server_url: str, run_id: str, ttl_s: int, candidates: Iterable[int]) -> int | None:
    """The first of ``candidates`` (database numbers on ``server_url``'s server) that no other test run has
    claimed, claimed for ``run_id`` for ``ttl_s`` and flushed; None when every one is taken. Never the api tests'
    :func:`shared_database`: an exchange started there (the session-long e2e harness) would consume their queues."""
    shared = shared_database()
    for n in candidates:
        if n == shared:
            continue
        client = redis.Redis.from_url(database_url(server_url, n), socket_connect_timeout=5)
        try:
            if not client.set(REDIS_CLAIM_KEY, run_id, nx=True, ex=ttl_s):
                continue  # another run (or a killed one, until the claim expires) uses this database
            client.flushdb()
            client.set(REDIS_CLAIM_KEY, run_id, ex=ttl_s)
            return n
        finally:
            client.close()
    return None


def release_database(url: str, run_id: str) -> None:
    """Flush a database :func:`claim_database` gave ``run_id``, unless its claim has passed to another run."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        if client.get(REDIS_CLAIM_KEY) == run_id.encode():
            client.flushdb()
    finally:
        client.close()


@contextmanager
def claimed_database() -> Iterator[str]:
    """A Redis database of the caller's own on the tests' Redis server (1..15, claimed like the e2e harness does),
    flushed before and after: for tests whose keys are not named per test (a matcher process consumes every matching
    queue of its database; wake-up flags are per partition). Skips the test when every database is taken."""
    run_id = uuid.uuid4().hex
    n = claim_database(redis_test_url(), run_id, 600, range(15, 0, -1))
    if n is None:
        pytest.skip("no free Redis database in 1..15")
    url = database_url(redis_test_url(), n)
    try:
        yield url
    finally:
        release_database(url, run_id)

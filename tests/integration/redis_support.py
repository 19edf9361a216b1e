"""A real Redis for integration tests that talk to it directly (not through the api).

``EXCHANGE_TEST_REDIS_URL`` when set (the session sets it when it starts an embedded Redis), else database 11 on
the local server, like the api tests: never the database a running dev exchange uses.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from exchange.messaging.broker import doorbell_key

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/11"

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
        for key in [*client.scan_iter(f"{namespace}*"), *client.scan_iter(doorbell_key(f"{namespace}*"))]:
            client.delete(key)
        broker.close()
        client.close()

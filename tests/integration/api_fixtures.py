"""Fixtures of the api integration tests; a test module loads them with
``pytest_plugins = ["tests.integration.api_fixtures"]`` (see :mod:`tests.integration.api_helpers`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from litestar.testing import TestClient
from sqlalchemy import Engine

from exchange.api.app import create_app
from exchange.api.state import api_state
from exchange.config import Settings
from exchange.db.engines import pooled_engine
from exchange.messaging.names import DERIVED_PREFIX, read_namespace
from tests.conftest import skip_or_fail
from tests.integration.api_helpers import ADMIN_KEY
from tests.integration.redis_support import redis_test_url


@pytest.fixture(scope="session")
def api_redis_url() -> Iterator[str]:
    url = redis_test_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        skip_or_fail(f"Redis is unreachable at {url}: {exc}")
    yield url
    # No matcher consumes the test database's queues: drop what the tests enqueued (and only that), in the
    # namespaces the exchange derives from the tests' databases (``exchange-<hash>``, exchange.messaging.names).
    for pattern in (f"{DERIVED_PREFIX}*:matching.*", f"{DERIVED_PREFIX}*:wake:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def api_namespace(migrated_database_url: str) -> str:
    """The Redis namespace of the exchange on the run's migrated database (its apps' unless told otherwise)."""
    return read_namespace(migrated_database_url)


def app_namespace(client: TestClient[Any]) -> str:
    """The Redis namespace of a started test app."""
    namespace: str = api_state(client.app).broker.namespace
    return namespace


@pytest.fixture(scope="session")
def api_engine(migrated_database_url: str) -> Iterator[Engine]:
    engine = pooled_engine(migrated_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def api_settings_factory(migrated_database_url: str, api_redis_url: str) -> Callable[..., Settings]:
    """Settings for the test app; keyword overrides use the environment variable names' suffixes."""

    def make(**overrides: str) -> Settings:
        env = {
            "EXCHANGE_DATABASE_URL": migrated_database_url,
            "EXCHANGE_REDIS_URL": api_redis_url,
            "EXCHANGE_ADMIN_API_KEY": ADMIN_KEY,
            "EXCHANGE_ORDER_WAIT_MS": "0",
            "EXCHANGE_PARTITIONS": "4",
        }
        env.update({f"EXCHANGE_{k.upper()}": v for k, v in overrides.items()})
        return Settings.from_env(env)

    return make


@pytest.fixture
def client_factory(api_settings_factory: Callable[..., Settings]) -> Iterator[Callable[..., TestClient[Any]]]:
    """Start an app (lifespan included) with settings overrides; every client is closed at teardown."""
    clients: list[TestClient[Any]] = []

    def make(**overrides: str) -> TestClient[Any]:
        client = TestClient(create_app(api_settings_factory(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api_client(client_factory: Callable[..., TestClient[Any]]) -> TestClient[Any]:
    return client_factory()

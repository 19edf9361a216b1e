"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import Engine

from exchange.db import migrate
from exchange.db.engines import AsyncPool, pooled_engine
from tests.conftest import DatabaseFactory


@pytest.fixture
def engine(fresh_migrated_database_url: str) -> Iterator[Engine]:
    engine = pooled_engine(fresh_migrated_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
async def api_pool(fresh_migrated_database_url: str) -> AsyncIterator[AsyncPool]:
    """The api's kind of pool (async psycopg) on the same fresh database as ``engine``."""
    pool = AsyncPool(fresh_migrated_database_url)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
def latin1_database_url(database_factory: DatabaseFactory) -> Iterator[str]:
    """A database whose server encoding is LATIN1 (an operator's ``initdb`` in a Latin-1 locale), migrated; shared
    by the tests of a module, which each use brokers of their own."""
    url = database_factory.create(encoding="LATIN1")
    migrate.upgrade(url)
    yield url
    database_factory.drop(url)

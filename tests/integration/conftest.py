"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import Engine

from exchange.db.engines import AsyncPool, pooled_engine


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

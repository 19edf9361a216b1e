"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from exchange.db.engines import pooled_async_engine, pooled_engine


@pytest.fixture
def engine(fresh_migrated_database_url: str) -> Iterator[Engine]:
    engine = pooled_engine(fresh_migrated_database_url)
    yield engine
    engine.dispose()


@pytest.fixture
async def async_engine(fresh_migrated_database_url: str) -> AsyncIterator[AsyncEngine]:
    """The api's kind of engine (async) on the same fresh database as ``engine``."""
    engine = pooled_async_engine(fresh_migrated_database_url)
    yield engine
    await engine.dispose()

"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from exchange.db.engines import pooled_engine


@pytest.fixture
def engine(fresh_migrated_database_url: str) -> Iterator[Engine]:
    engine = pooled_engine(fresh_migrated_database_url)
    yield engine
    engine.dispose()

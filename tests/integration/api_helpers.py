"""Helpers of the api integration tests; their fixtures are in :mod:`tests.integration.api_fixtures`.

The app runs in-process (Litestar's TestClient, lifespan included) against the REAL migrated PostgreSQL test
database and a REAL Redis. Redis: ``EXCHANGE_TEST_REDIS_URL`` (default database 11 on the local server, so queue
messages the api enqueues never reach a matcher of a running dev exchange); skipped when unreachable, failed when
``CI=true``. No matcher process runs: tests call :func:`match` (the matcher's ``process_symbol``) to apply the
pending commands when they need matches.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from litestar.testing import TestClient
from sqlalchemy import Engine, text

from exchange.matching.service import BatchResult, BookCache, process_symbol

ADMIN_KEY = "test-admin-key"


@dataclass(frozen=True)
class Broker:
    id: str
    name: str
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def new_symbol() -> str:
    """A symbol no other test uses (tests share one database)."""
    return "T" + uuid.uuid4().hex[:8].upper()


def register(client: TestClient[Any], name: str | None = None) -> Broker:
    name = name or f"broker-{uuid.uuid4().hex[:8]}"
    response = client.post("/register", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 201, response.text
    body = response.json()
    return Broker(body["broker_id"], name, body["api_key"])


def match(engine: Engine, symbol: str) -> BatchResult:
    """Apply every pending command of ``symbol`` as a matcher would (fresh cache: rebuilt from Postgres)."""
    return process_symbol(engine, BookCache(), symbol)


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())

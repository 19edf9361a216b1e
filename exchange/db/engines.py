"""SQLAlchemy engines for the two kinds of connection the exchange uses.

* ``pooled``: request and transaction work (api, matcher, sweeper, webhooks). In production it points at
  pgbouncer in transaction-pooling mode, so every connection disables server-side prepared statements
  (``prepare_threshold=None``; pgbouncer 1.18 cannot track them and fails with DuplicatePreparedStatement) and
  nothing session-scoped (LISTEN, session advisory locks, SET) may be relied on.
* direct: migrations (:mod:`exchange.db.migrate`, its own short-lived engine) and session-scoped work, straight
  to PostgreSQL via ``EXCHANGE_DATABASE_URL``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from exchange.db.urls import sqlalchemy_url

# connect_timeout: a database host that silently drops packets must turn into a quick 503, not a hung request.
_POOLED_CONNECT_ARGS: dict[str, Any] = {"prepare_threshold": None, "connect_timeout": 5}

# No ``pool_pre_ping``: it costs a round trip on every checkout (two per order on the api's hot path). Through
# pgbouncer a PostgreSQL restart does not break the client connections at all (pgbouncer opens new server
# connections), and when a connection does break (pgbouncer or a direct PostgreSQL restarted) SQLAlchemy's disconnect
# handling invalidates the whole pool on the first error: that request fails with a retryable error (api: 503;
# matcher/webhooks: the message is retried) and the next checkout reconnects.


def pooled_engine(url: str, *, pool_size: int = 5, max_overflow: int = 5, **kw: Any) -> Engine:
    """A synchronous engine safe to use through pgbouncer's transaction pooling."""
    return create_engine(
        sqlalchemy_url(url),
        connect_args=dict(_POOLED_CONNECT_ARGS),
        pool_size=pool_size,
        max_overflow=max_overflow,
        **kw,
    )


def pooled_async_engine(url: str, *, pool_size: int = 10, max_overflow: int = 10, **kw: Any) -> AsyncEngine:
    """An asyncio engine safe to use through pgbouncer's transaction pooling."""
    return create_async_engine(
        sqlalchemy_url(url),
        connect_args=dict(_POOLED_CONNECT_ARGS),
        pool_size=pool_size,
        max_overflow=max_overflow,
        **kw,
    )


@asynccontextmanager
async def single_statement(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A pooled connection in autocommit mode, for work that is ONE statement (a read, or a write that a single
    statement makes atomic): PostgreSQL runs the statement as its own transaction, durably committed before it
    answers. One round trip, where an explicit transaction costs three (``BEGIN``, the statement,
    ``COMMIT``/``ROLLBACK``: psycopg sends ``BEGIN`` on its own). A connection used for two statements gives them
    two snapshots: use a transaction for that."""
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn

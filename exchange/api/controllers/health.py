"""Health endpoints (no auth): ``/health`` and ``/health/live`` answer while the process runs; ``/health/ready``
answers 200 only when PostgreSQL (taking writes: not read-only) and Redis (``PING``) both respond, the database
schema is at the newest migration of this build (``migrations``: a process running against an un-migrated or newer
database is not ready) and the process's result subscriber is subscribed (``results``: without it every new order
answers ``pending`` after its wait), else 503, with a check per component: what failed, not the driver's message
(which names hosts, ports and users: it is logged instead)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg
from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec
from sqlalchemy.exc import DBAPIError

from exchange.api.dependencies import API, Api
from exchange.api.errors import error_responses
from exchange.api.schemas import CheckOut, HealthOut, ReadyOut
from exchange.db import migrate
from exchange.db.engines import single_statement
from exchange.db.errors import sqlstate

CHECK_TIMEOUT_S = 2.0

log = logging.getLogger("exchange.api")


class MigrationsNotAtHeadError(RuntimeError):
    pass


class ResultsNotSubscribedError(RuntimeError):
    pass


class DatabaseReadOnlyError(RuntimeError):
    pass


_OWN_ERRORS = (MigrationsNotAtHeadError, ResultsNotSubscribedError, DatabaseReadOnlyError, TimeoutError)
"""Failures whose message says nothing of the deployment: shown as they are."""


async def _check(probe: Callable[[], Awaitable[object]]) -> CheckOut:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), timeout=CHECK_TIMEOUT_S)
    except Exception as exc:
        return CheckOut(ok=False, error=_shown(exc))
    return CheckOut(ok=True, latency_ms=round((time.perf_counter() - started) * 1000, 2))


def _shown(exc: Exception) -> str:
    """What an unauthenticated caller is told of a failed check: a driver's or server's message names hosts, ports,
    users and databases, so it goes to the log (for operators) and the answer keeps its kind (and SQLSTATE)."""
    if isinstance(exc, _OWN_ERRORS):
        return f"{exc.__class__.__name__}: {exc}"[:300]
    log.warning("readiness check failed: %s: %s", exc.__class__.__name__, exc)
    code = sqlstate(exc) if isinstance(exc, DBAPIError | psycopg.Error) else ""
    return exc.__class__.__name__ + (f" (SQLSTATE {code})" if code else "")


@functools.cache
def _head_revision() -> str:
    """The newest migration shipped with this build (read from disk once per process)."""
    return migrate.head()


class HealthController(Controller):
    path = "/health"
    dependencies = API

    @get("/", responses=error_responses())
    async def health(self) -> HealthOut:
        return HealthOut(status="ok")

    @get("/live", responses=error_responses())
    async def live(self) -> HealthOut:
        return HealthOut(status="ok")

    @get(
        "/ready",
        responses={
            **error_responses(),
            503: ResponseSpec(ReadyOut, description="not ready: a check failed (see `checks`)"),
        },
    )
    async def ready(self, api: Api) -> Response[ReadyOut]:
        async def postgres() -> None:
            # The database must take writes: a standby (after a failover) or default_transaction_read_only answers
            # reads, but every order would be refused (503). One statement, as SELECT 1 was.
            async with single_statement(api.pool) as conn:
                row = await (await conn.execute("SELECT current_setting('transaction_read_only')")).fetchone()
            if row is not None and row[0] == "on":
                raise DatabaseReadOnlyError("the database is read-only (a standby, or default_transaction_read_only)")

        async def redis() -> None:
            await api.redis.ping()

        async def migrations() -> None:
            async with single_statement(api.pool) as conn:
                row = await (await conn.execute("SELECT max(version_num) FROM alembic_version")).fetchone()
            current = None if row is None else row[0]
            head = _head_revision()
            if current != head:
                raise MigrationsNotAtHeadError(f"database at {current or 'base'}, this build needs {head}")

        async def results() -> None:
            # This process hears the matchers' results: without it every new order waits out its wait, `pending`.
            if not api.waiter.subscribed:
                raise ResultsNotSubscribedError("the result subscriber is not subscribed (reconnecting to Redis)")

        pg, rd, mg, rs = await asyncio.gather(_check(postgres), _check(redis), _check(migrations), _check(results))
        ok = pg.ok and rd.ok and mg.ok and rs.ok
        checks = {"postgres": pg, "redis": rd, "migrations": mg, "results": rs}
        body = ReadyOut(status="ok" if ok else "unavailable", checks=checks)
        return Response(body, status_code=200 if ok else 503)

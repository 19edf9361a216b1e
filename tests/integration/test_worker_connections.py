"""The workers' pooled connections after an error that leaves a connection unusable
(:func:`exchange.db.errors.leaves_the_connection_unusable`), against a real PostgreSQL.

The error is a real one from the server, raised by a statement with the SQLSTATE pgbouncer gives its
``query_wait_timeout`` (08P01) before it closes the connection: psycopg sees an ordinary error on a connection that
looks idle, as it does then. Here the server keeps the session, so a connection that went back to the pool would be
handed out again with the same backend: what the tests look for. A statement's own error is the control: its
connection is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from exchange.db.engines import pooled_engine
from exchange.matching import store as matching_store
from exchange.webhooks import store as webhook_store

SESSION_ENDED = "DO $$ BEGIN RAISE EXCEPTION 'query_wait_timeout' USING ERRCODE = '08P01'; END $$"
STATEMENTS_FAILED = {
    "division-by-zero": "SELECT 1 / 0",
    # an OperationalError with a SQLSTATE, after which the session goes on: kept (the webhook store dropped it)
    "deadlock": "DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END $$",
}


def through_sqlalchemy(engine: Engine, sql: str) -> None:
    """As the sweeper does: a statement executed by SQLAlchemy."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(sql)


def through_the_matcher(engine: Engine, sql: str) -> None:
    """As the matcher does: a psycopg cursor on a connection of :func:`exchange.matching.store.connect`."""
    with matching_store.connect(engine) as conn:
        psycopg.ClientCursor(matching_store._driver(conn)).execute(sql)


def through_the_webhook_store(engine: Engine, sql: str) -> None:
    """As the webhook store does: one statement in a bounded transaction of its own, on a raw pooled connection."""
    webhook_store._execute(engine, sql, {})


def backend_of_the_next_checkout(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


def backend_that_failed(path: Callable[[Engine, str], None], engine: Engine, sql: str) -> int:
    """Run ``sql`` through ``path`` (it raises) on the pool's one connection; that connection's backend."""
    used = backend_of_the_next_checkout(engine)  # opens the connection the path checks out again (one at a time)
    with pytest.raises((psycopg.Error, DBAPIError)):
        path(engine, sql)
    return used


PATHS = pytest.mark.parametrize(
    "path",
    [through_sqlalchemy, through_the_matcher, through_the_webhook_store],
    ids=["sqlalchemy-execution", "matcher-cursor", "webhook-store"],
)


@PATHS
def test_a_worker_connection_whose_session_ended_is_not_handed_out_again(
    engine: Engine, path: Callable[[Engine, str], None]
) -> None:
    used = backend_that_failed(path, engine, SESSION_ENDED)
    assert backend_of_the_next_checkout(engine) != used


@PATHS
@pytest.mark.parametrize("statement", STATEMENTS_FAILED.values(), ids=STATEMENTS_FAILED.keys())
def test_a_worker_connection_whose_statement_failed_is_handed_out_again(
    engine: Engine, path: Callable[[Engine, str], None], statement: str
) -> None:
    used = backend_that_failed(path, engine, statement)
    assert backend_of_the_next_checkout(engine) == used


def test_a_worker_connection_whose_session_ended_goes_alone_the_pools_others_are_kept(engine: Engine) -> None:
    with engine.connect() as other:  # checked out while the failing statement runs on a second connection
        kept = int(other.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        with pytest.raises(DBAPIError):
            through_sqlalchemy(engine, SESSION_ENDED)
    # Both connections are back in the pool (the failed one's record reconnects when handed out): take both.
    with engine.connect() as first, engine.connect() as second:
        backends = {int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()) for conn in (first, second)}
    assert kept in backends  # only a connection psycopg saw break makes the others suspect


@PATHS
def test_a_worker_connection_the_server_closed_while_idle_is_not_handed_out(
    engine: Engine, path: Callable[[Engine, str], None], fresh_migrated_database_url: str
) -> None:
    idle = backend_of_the_next_checkout(engine)
    with psycopg.connect(fresh_migrated_database_url, autocommit=True) as admin:  # as a restarted pgbouncer would
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", [idle])
    path(engine, "SELECT 1")  # no error: the pool saw the close at checkout and connected anew
    assert backend_of_the_next_checkout(engine) != idle


def errors_counted(sqlstate: str) -> float:
    """``exchange_database_errors_total`` of this process for ``sqlstate``."""
    return REGISTRY.get_sample_value("exchange_database_errors_total", {"sqlstate": sqlstate}) or 0.0


@PATHS
def test_a_worker_statements_error_is_counted_once_by_its_sqlstate(
    engine: Engine, path: Callable[[Engine, str], None]
) -> None:
    before = errors_counted("22012"), errors_counted("08P01")
    for sql in ("SELECT 1 / 0", SESSION_ENDED):
        with pytest.raises((psycopg.Error, DBAPIError)):
            path(engine, sql)
    assert (errors_counted("22012"), errors_counted("08P01")) == (before[0] + 1, before[1] + 1)


@PATHS
def test_a_worker_connect_that_fails_is_counted_once(path: Callable[[Engine, str], None]) -> None:
    unreachable = pooled_engine("postgresql://postgres@127.0.0.1:1/nothing")
    try:
        before = errors_counted("client")
        with pytest.raises((psycopg.Error, DBAPIError)):
            path(unreachable, "SELECT 1")
        assert errors_counted("client") == before + 1
    finally:
        unreachable.dispose()

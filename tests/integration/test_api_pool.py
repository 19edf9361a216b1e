"""The api's connection pool (:class:`exchange.db.engines.AsyncPool`) against a real PostgreSQL."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from prometheus_client import REGISTRY

from exchange.db import engines
from exchange.db.engines import AsyncPgConnection, AsyncPool, PoolTimeoutError, single_statement

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nothing"


async def backend_pid(pool: AsyncPool) -> int:
    async with single_statement(pool) as conn:
        row = await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone()
    assert row is not None
    return int(row.pid)


@pytest.mark.anyio
async def test_a_clean_connection_is_reused_by_the_next_request(api_pool: AsyncPool) -> None:
    assert await backend_pid(api_pool) == await backend_pid(api_pool)


@pytest.mark.anyio
async def test_a_connection_returned_inside_a_transaction_is_closed_not_reused(api_pool: AsyncPool) -> None:
    async with single_statement(api_pool) as conn:
        await conn.execute("BEGIN")  # an open transaction must never reach the next request
        first = conn
    assert first.closed
    async with single_statement(api_pool) as conn:
        assert conn is not first
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def errors_counted(sqlstate: str) -> float:
    return REGISTRY.get_sample_value("exchange_database_errors_total", {"sqlstate": sqlstate}) or 0.0


@pytest.mark.anyio
async def test_a_statements_error_is_counted_by_its_sqlstate(api_pool: AsyncPool) -> None:
    before = errors_counted("22012")
    with pytest.raises(psycopg.errors.DivisionByZero):
        async with single_statement(api_pool) as conn:
            await conn.execute("SELECT 1 / 0")
    assert errors_counted("22012") == before + 1


@pytest.mark.anyio
async def test_a_connect_that_fails_is_counted_as_the_clients_own_error() -> None:
    before = errors_counted("client")
    with pytest.raises(psycopg.OperationalError):
        async with single_statement(AsyncPool(UNREACHABLE)):
            pass
    assert errors_counted("client") == before + 1


@pytest.mark.anyio
async def test_an_unreachable_database_fails_the_request_at_once_not_with_a_pool_timeout() -> None:
    pool = AsyncPool(UNREACHABLE)
    with pytest.raises(psycopg.OperationalError) as raised:
        async with single_statement(pool):
            pass
    assert not isinstance(raised.value, PoolTimeoutError)


async def terminated_idle_pair(pool: AsyncPool, url: str) -> tuple[AsyncPgConnection, AsyncPgConnection]:
    """Two idle connections of ``pool`` whose backends were then terminated (as a restarted pgbouncer, or a session
    ended while idle, leaves them)."""
    async with single_statement(pool) as a, single_statement(pool) as b:  # two idle connections afterwards
        pids = [a.info.backend_pid, b.info.backend_pid]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        for pid in pids:
            await admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
    return a, b


@pytest.mark.anyio
async def test_idle_connections_the_server_closed_are_not_handed_out_so_no_request_fails(
    api_pool: AsyncPool, fresh_migrated_database_url: str
) -> None:
    a, b = await terminated_idle_pair(api_pool, fresh_migrated_database_url)
    pids = [a.info.backend_pid, b.info.backend_pid]
    fresh = await backend_pid(api_pool)
    assert fresh not in pids  # answered, on a new connection
    assert [conn.info.backend_pid for conn in api_pool._idle] == [fresh]  # the closed ones were dropped
    assert a.closed
    assert b.closed


@pytest.mark.anyio
async def test_a_request_waits_for_a_free_connection_then_times_out_with_pool_timeout(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engines, "POOL_WAIT_S", 0.2)
    pool = AsyncPool(fresh_database_url, max_size=1)
    try:
        async with single_statement(pool) as held:
            waiting = asyncio.create_task(backend_pid(pool))
            await asyncio.sleep(0)
            assert not waiting.done()
            with pytest.raises(PoolTimeoutError):
                await waiting
        # once it is free, the next request gets the connection that was held
        assert await backend_pid(pool) == held.info.backend_pid
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_every_connection_of_a_burst_is_kept_for_the_next_one(api_pool: AsyncPool) -> None:
    async with single_statement(api_pool) as a, single_statement(api_pool) as b, single_statement(api_pool) as c:
        burst = {a.info.backend_pid, b.info.backend_pid, c.info.backend_pid}
    async with single_statement(api_pool) as a, single_statement(api_pool) as b, single_statement(api_pool) as c:
        assert {a.info.backend_pid, b.info.backend_pid, c.info.backend_pid} == burst  # no reconnections


@pytest.mark.anyio
async def test_a_connection_in_use_when_the_pool_closes_is_closed_when_it_comes_back(fresh_database_url: str) -> None:
    pool = AsyncPool(fresh_database_url)
    async with single_statement(pool) as idle:
        pass
    async with single_statement(pool) as in_use:
        assert in_use is idle
        await pool.close()
        assert not in_use.closed  # still serving its request
    assert in_use.closed


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        # psycopg's own, when a connection answers what it cannot account for (seen through pgbouncer while
        # PostgreSQL restarted: two results for one BEGIN): no SQLSTATE, the connection's state unknown.
        psycopg.InternalError("received 2 results from command 'BEGIN'"),
        # pgbouncer's answer to a query that waited out query_wait_timeout while PostgreSQL was down, before it
        # closes the connection: psycopg raises it without noticing the close, so the connection looks idle.
        psycopg.errors.ProtocolViolation("query_wait_timeout"),
    ],
    ids=["no-sqlstate", "session-ended"],
)
async def test_a_connection_that_raised_a_connection_level_error_is_closed_not_reused(
    api_pool: AsyncPool, error: psycopg.Error
) -> None:
    with pytest.raises(type(error)):
        async with single_statement(api_pool) as conn:
            raise error
    assert conn.closed
    assert api_pool._idle == []
    async with single_statement(api_pool) as fresh:
        assert fresh is not conn


@pytest.mark.anyio
async def test_a_connection_whose_statement_failed_is_kept(api_pool: AsyncPool) -> None:
    with pytest.raises(psycopg.errors.DivisionByZero):
        async with single_statement(api_pool) as conn:
            await conn.execute("SELECT 1 / 0")
    async with single_statement(api_pool) as again:
        assert again is conn  # a bad statement says nothing about the connection


@pytest.mark.anyio
async def test_a_connection_that_broke_in_use_discards_the_idle_ones_so_one_request_fails_not_one_per_connection(
    api_pool: AsyncPool, fresh_migrated_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For a close the checkout cannot see (a half-open connection: the peer gone without a word), the first
    failure makes every idle connection suspect."""
    monkeypatch.setattr(engines, "closed_by_peer", lambda conn: False)  # as if no close had reached the sockets
    a, b = await terminated_idle_pair(api_pool, fresh_migrated_database_url)
    pids = [a.info.backend_pid, b.info.backend_pid]
    with pytest.raises(psycopg.OperationalError):
        await backend_pid(api_pool)
    assert await backend_pid(api_pool) not in pids  # a new connection, not the other dead one

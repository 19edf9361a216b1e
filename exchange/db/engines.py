"""Connection pools for the two kinds of connection the exchange uses.

* ``pooled``: request and transaction work (api, matcher, sweeper, webhooks). In production it points at
  pgbouncer in transaction-pooling mode, so every connection disables server-side prepared statements
  (``prepare_threshold=None``; pgbouncer 1.18 cannot track them and fails with DuplicatePreparedStatement) and
  nothing session-scoped (LISTEN, session advisory locks, SET) may be relied on. The threaded processes (matcher,
  sweeper, webhooks) use a synchronous SQLAlchemy engine; the api uses psycopg's async connections directly
  (:class:`AsyncPool`): SQLAlchemy's asyncio layer cost ~0.3 ms of the api's CPU per statement on top of
  psycopg's ~0.2 ms (checkout, greenlet hand-offs, result wrapping), and the api runs one or more per request.
* direct: migrations (:mod:`exchange.db.migrate`, its own short-lived engine) and session-scoped work, straight
  to PostgreSQL via ``EXCHANGE_DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import RowFactory, namedtuple_row, tuple_row
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DisconnectionError

from exchange.db.errors import DatabaseError, leaves_the_connection_unusable, sqlstate
from exchange.db.urls import libpq_url, sqlalchemy_url
from exchange.observability.metrics import count_database_error

AsyncPgConnection = psycopg.AsyncConnection[Any]
"""An api connection: autocommit, rows are named tuples (``row.column``)."""

DEAD_PEER_S = 10
"""How long a pooled TCP connection waits on a database host (pgbouncer's, or PostgreSQL's) that went silent without
closing it (the host lost, a network cut): a half-open connection. Without a bound the kernel's own gives up after
about 15 minutes of retransmissions (``tcp_retries2``), and the request, the api's group commit, or the matcher's
partition that sent the statement waits as long. With it, a statement the peer's kernel never acknowledged fails
after :data:`DEAD_PEER_S` (``tcp_user_timeout``), and one that it acknowledged but never answered fails at the
first keepalive probe left unanswered (sent after :data:`DEAD_PEER_S` of silence, then every 2 s; once the user
timeout has passed, Linux gives up at the first unanswered one, so ``keepalives_count`` does not count then). Either
way the statement fails as a lost connection within about 10-12 s (the api answers 503, the message is retried), and
the pools drop the connection. A live host's kernel acknowledges and answers probes within milliseconds however busy its
server, so neither a long statement nor a healthy idle connection is cut short. (On recent Linux kernels a window
the peer keeps shut for longer than the user timeout ends the connection too: a server that reads nothing of a
client's input for 10 s; the exchange's statements are a few kilobytes, which the socket buffers take whole.
libpq ignores these options for a unix socket.)"""

DEAD_PEER_OPTIONS: dict[str, int] = {
    "tcp_user_timeout": DEAD_PEER_S * 1000,
    "keepalives": 1,
    "keepalives_idle": DEAD_PEER_S,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
"""libpq's options for :data:`DEAD_PEER_S` (``ops/pgbouncer.ini`` bounds its own sockets the same way)."""

# connect_timeout: a database host that silently drops packets must turn into a quick 503, not a hung request;
# DEAD_PEER_OPTIONS: the same for a host that goes silent later.
_POOLED_CONNECT_ARGS: dict[str, Any] = {"prepare_threshold": None, "connect_timeout": 5, **DEAD_PEER_OPTIONS}

# No round-trip check on checkout (``pool_pre_ping``): it costs a round trip every time. Instead one ``poll`` of the
# socket (:func:`closed_by_peer`) finds an idle connection the other end closed cleanly (pgbouncer or a direct
# PostgreSQL restarted, a session ended) and replaces it. Through pgbouncer a PostgreSQL restart does not close the
# client connections at all (pgbouncer opens new server connections). A connection that breaks in use, or a half-open
# one (the peer gone without a close: within DEAD_PEER_S and its probes), still fails its request or message with a
# retryable error (api: 503; matcher/webhooks: the message is retried), and the pool then drops its idle connections
# too (SQLAlchemy's disconnect handling; :class:`AsyncPool` likewise). An idle half-open connection whose keepalive
# probes went unanswered has an error pending on its socket, which the checkout poll sees as it does a close.


def pooled_engine(url: str, *, pool_size: int = 5, max_overflow: int = 5, **kw: Any) -> Engine:
    """A synchronous engine safe to use through pgbouncer's transaction pooling.

    Invariants: an idle connection the other end closed meanwhile is not handed out (:func:`closed_by_peer`, at
    checkout, as in :class:`AsyncPool`); a connection whose statement raised an error after which it is unusable
    (:func:`~exchange.db.errors.leaves_the_connection_unusable`) is invalidated, not checked in again. SQLAlchemy's
    own rule for psycopg only looks at whether psycopg saw the connection close, which it has not when pgbouncer
    answers ``query_wait_timeout`` (PostgreSQL down) and then closes it: the next checkout would fail a later sweep
    or claim with it. As in :class:`AsyncPool`, only a connection psycopg saw break makes the pool's others suspect
    (SQLAlchemy's own rule, which invalidates them all); one that is merely unusable goes alone. (Work that runs
    psycopg cursors on a checked-out connection directly, as the matcher and the webhook store do, applies the same
    rule itself: SQLAlchemy never sees those errors.)"""
    engine = create_engine(
        sqlalchemy_url(url),
        connect_args=dict(_POOLED_CONNECT_ARGS),
        pool_size=pool_size,
        max_overflow=max_overflow,
        **kw,
    )
    event.listen(engine, "handle_error", _unusable_is_a_disconnect)
    event.listen(engine, "checkout", _refuse_closed_by_peer)
    return engine


def _refuse_closed_by_peer(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """SQLAlchemy's ``checkout`` hook of :func:`pooled_engine`: an idle connection the other end closed meanwhile
    (:func:`closed_by_peer`) is refused, and the pool hands out another (SQLAlchemy's documented way: it retries)."""
    if isinstance(dbapi_connection, psycopg.Connection) and closed_by_peer(dbapi_connection):
        raise DisconnectionError("the server or pgbouncer closed this idle connection")


def statement_failed(error: psycopg.Error) -> bool:
    """Every pool's rule for an error a statement raised (the api's :class:`AsyncPool`, the workers' engines, the
    matcher's and the webhook store's psycopg cursors): it is counted by SQLSTATE (``exchange_database_errors_total``,
    what an operator alerts on: 53100 a full disk, 08xxx the server or pgbouncer gone), and True means its connection
    must never be used again (:func:`~exchange.db.errors.leaves_the_connection_unusable`)."""
    count_database_error(sqlstate(error))
    return leaves_the_connection_unusable(error)


def connect_failed(error: DatabaseError) -> None:
    """Every pool's rule for a connect that failed (the server down, refusing, or full of connections): counted as a
    statement's error is; there is no connection to drop."""
    count_database_error(sqlstate(error))


def _unusable_is_a_disconnect(context: ExceptionContext) -> None:
    """SQLAlchemy's ``handle_error`` hook of :func:`pooled_engine`: an error that leaves its connection unusable
    is a disconnect of that connection alone (SQLAlchemy then invalidates it). Every error is counted."""
    error = context.original_exception
    if not isinstance(error, psycopg.Error):
        return
    if context.connection is None:  # a failed connect (through engine.connect(); raw_connection() does not come here)
        connect_failed(error)
        return
    # (A disconnect already, the connection broken: SQLAlchemy's own rule invalidates it.)
    if statement_failed(error) and not context.is_disconnect:
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = False


POOL_WAIT_S = 5.0
"""How long a request waits for a free pooled connection when all of them are in use (then 503; SQLAlchemy's pool
waited 30 s). With group commit a worker's accepts, cancels and read-backs hold at most three connections per
``EXCHANGE_GROUP_COMMIT_CONCURRENCY`` slot, far below ``max_size``."""


class PoolTimeoutError(psycopg.OperationalError):
    """Every connection of the pool stayed in use for :data:`POOL_WAIT_S` (the api answers 503, as for any
    connection-level failure)."""


class AsyncPool:
    """The api's connections: autocommit psycopg connections (rows as named tuples) opened on demand, at most
    ``max_size`` at once, kept for reuse when they come back clean. Safe through pgbouncer's transaction pooling.

    Invariants:

    * A connection is handed out only when it is idle (no transaction open or in error, no statement running) and
      not broken; one that comes back otherwise, through a psycopg error without SQLSTATE (the client library's
      own failure, e.g. a protocol surprise through pgbouncer while PostgreSQL restarts), or through an error after
      which the server or pgbouncer closes the connection (pgbouncer's ``query_wait_timeout`` while PostgreSQL is
      down; both: :func:`~exchange.db.errors.leaves_the_connection_unusable`), is closed, never reused.
      (The api opens no transaction: every connection runs single statements, see :func:`single_statement`; and
      psycopg cancels a statement whose task is cancelled and waits for the server, so a connection that comes
      back not idle is a lost connection, a statement the server did not stop in time, or a bug.)
    * Opening a connection happens in the request that needs it: when the server is unreachable that request fails
      at once with psycopg's error (503), rather than waiting out a pool timeout as ``psycopg_pool`` does (its
      background workers keep retrying while callers wait ``timeout`` seconds: 5 s per request in
      ``test_api_health_admin``).
    * An idle connection the other end closed (pgbouncer restarted, a session PostgreSQL or pgbouncer ended) is
      not handed out: :func:`closed_by_peer` sees it at checkout, so no request fails on it while the database is
      up. A connection that broke in use makes every idle one suspect too (they are closed).
    * Every connection speaks UTF-8 (``client_encoding``), as the api's JSON does, whatever the database's server
      encoding: a text the database cannot store (a character a LATIN1 database lacks) is refused by the server, as
      a statement's error of SQLSTATE class 22 (``22P05``) that the api answers 422 and a group commit retries
      order by order, rather than by psycopg as a ``UnicodeEncodeError`` (a 500, which failed the whole group).
    * Every clean connection is kept for the next request (up to ``max_size``; none after :meth:`close`): closing
      a burst's extra ones, as SQLAlchemy's pool did with its overflow, cost ~560 reconnections per 20-s run at
      ``--scale 100``. Without pgbouncer each is a PostgreSQL backend: ``max_size`` per api worker.
    """

    def __init__(self, url: str, *, max_size: int = 20) -> None:
        self._conninfo = libpq_url(url)
        self._idle: list[AsyncPgConnection] = []
        self._slots = asyncio.Semaphore(max_size)
        self._closed = False

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncPgConnection]:
        if self._slots.locked():  # every connection is in use: wait for one, but not forever
            try:
                async with asyncio.timeout(POOL_WAIT_S):
                    await self._slots.acquire()
            except TimeoutError:
                raise PoolTimeoutError(f"no free database connection within {POOL_WAIT_S:g} s") from None
        else:
            await self._slots.acquire()  # returns at once
        conn: AsyncPgConnection | None = None
        confused = False
        try:
            try:
                conn = await self._take_idle() or await self._connect()
            except psycopg.Error as exc:
                connect_failed(exc)
                raise
            try:
                yield conn
            except psycopg.Error as exc:
                # never hand it out again: a reused one would fail a later request, long after the outage
                confused = statement_failed(exc)
                raise
        finally:
            try:
                if conn is not None:
                    await self._put(conn, reuse=not confused)
            finally:
                self._slots.release()

    async def _take_idle(self) -> AsyncPgConnection | None:
        """The most recently used idle connection that the other end has not closed meanwhile (the others found on
        the way are closed), or None."""
        while self._idle:
            conn = self._idle.pop()
            if not closed_by_peer(conn):
                return conn
            with contextlib.suppress(psycopg.Error):
                await conn.close()
        return None

    async def _connect(self) -> AsyncPgConnection:
        return await psycopg.AsyncConnection.connect(
            self._conninfo, **_POOLED_CONNECT_ARGS, client_encoding="UTF8", autocommit=True, row_factory=namedtuple_row
        )

    async def _put(self, conn: AsyncPgConnection, *, reuse: bool) -> None:
        reusable = reuse and not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE
        if reusable and not self._closed:
            self._idle.append(conn)
            return
        stale = [conn]
        if conn.broken:
            stale += self._idle
            self._idle.clear()
        for each in stale:
            with contextlib.suppress(psycopg.Error):
                await each.close()

    async def close(self) -> None:
        """Close the idle connections, and every connection in use as it comes back (at shutdown)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(psycopg.Error):
                await conn.close()


def closed_by_peer(conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> bool:
    """An idle connection whose socket is readable was sent something nobody asked for: the server's or pgbouncer's
    close (end of file, perhaps after an error such as an ended session). psycopg learns of it only at the next
    statement, which would then fail a request while the database is up. One ``poll`` of the socket, no round trip
    (a check query would cost one per request); a healthy connection wrongly taken for closed only costs a
    reconnection. Nothing else reaches an idle connection here (the exchange never LISTENs), but for the error the
    kernel leaves on a connection whose keepalive probes went unanswered (:data:`DEAD_PEER_S`), which the poll
    reports as well."""
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:  # no socket: closed already
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def single_statement(pool: AsyncPool) -> AbstractAsyncContextManager[AsyncPgConnection]:
    """A pooled connection (autocommit) for work that is ONE statement (a read, or a write that a single
    statement makes atomic): PostgreSQL runs the statement as its own transaction, durably committed before it
    answers. One round trip, where an explicit transaction costs three (``BEGIN``, the statement,
    ``COMMIT``/``ROLLBACK``). The api's only kind of connection use: every write of the api is one statement
    (a CTE or a SQL function where it takes several steps), so the api never holds a lock between round trips,
    which an event loop busy with other requests, or a stopped process, would stretch."""
    return pool.connection()


IDLE_HOLDER_LIMIT_MS = 2000
"""How long a transaction of the exchange that spans several round trips may sit idle between them before
PostgreSQL ends its session (``idle_in_transaction_session_timeout``). A process frozen inside one (stopped,
swapping, cut off from the database) would otherwise keep its locks until it woke: a matcher its books, from every
other matcher, a hot standby included; a webhook record its broker's row (its failure count, its endpoint), which
a matcher's write then waits for while it holds its books; a webhook claim its events. With the limit
they are free after it, the frozen transaction rolls back, and the process's next statement fails with a
connection error (the message or delivery is retried). A live process's window is its own work between two
statements: milliseconds. One kept off the CPU longer only loses that transaction. (The api opens no such
transaction: :func:`single_statement`.)"""

BOUNDED_BEGIN_STATEMENTS = ("BEGIN", f"SET LOCAL idle_in_transaction_session_timeout = {IDLE_HOLDER_LIMIT_MS}")
BOUNDED_BEGIN = "; ".join(BOUNDED_BEGIN_STATEMENTS)
"""Opens a transaction bounded by :data:`IDLE_HOLDER_LIMIT_MS`. One query message without parameters (psycopg sends
it with the simple query protocol, which takes several statements), so it costs the one round trip a bare
``BEGIN`` costs. ``SET LOCAL`` lasts until the transaction ends: the only scope safe through pgbouncer's
transaction pooling. Every transaction of the running services that spans round trips opens with it (migrations,
run by an operator on a direct connection, do not); a single statement in autocommit holds its locks only while
PostgreSQL runs it and needs no bound."""


def _check_began(status: TransactionStatus) -> None:
    """After :data:`BOUNDED_BEGIN` the connection must be inside a transaction. One that is not answered something
    else than what was asked (seen through pgbouncer while PostgreSQL restarted, as psycopg's own ``BEGIN`` reported:
    "received 2 results"): an error without SQLSTATE, which the pools treat as a lost connection."""
    if status != TransactionStatus.INTRANS:
        raise psycopg.InternalError(f"the connection is {status.name} after BEGIN, not in a transaction")


@contextmanager
def bounded_transaction(
    conn: psycopg.Connection[Any], *, row_factory: RowFactory[Any] = tuple_row
) -> Iterator[psycopg.Cursor[Any]]:
    """One transaction on a synchronous psycopg connection, opened with :data:`BOUNDED_BEGIN`: committed when the
    block ends, rolled back if it raises. Yields the cursor that opened it (rows made by ``row_factory``); one cursor
    for the whole transaction costs ~5 µs of CPU less per transaction than one per statement. The connection is in
    autocommit mode for the block, so that psycopg sends no ``BEGIN`` of its own (a round trip more), and goes back
    to its previous mode after it, when it is usable."""
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        with conn.cursor(row_factory=row_factory) as cursor:
            cursor.execute(BOUNDED_BEGIN)
            _check_began(conn.info.transaction_status)
            yield cursor
            cursor.execute("COMMIT")
    except BaseException:
        if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise
    finally:
        if not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE:
            conn.autocommit = autocommit

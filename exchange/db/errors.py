"""Classifying database errors by SQLSTATE: what is worth retrying, and what would fail the same way again.

Every function takes an error raised by psycopg directly or wrapped by SQLAlchemy (``DBAPIError.orig``)."""

from __future__ import annotations

import psycopg
from sqlalchemy.exc import DBAPIError

DatabaseError = DBAPIError | psycopg.Error

RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
"""Deadlock detected, serialization failure: the same transaction may well succeed when run again."""
READ_ONLY_SQLSTATE = "25006"
"""``read_only_sql_transaction``: the server refuses writes (a hot standby, or ``default_transaction_read_only``)."""
_DETERMINISTIC_CLASSES = frozenset({"22", "23"})
"""Data exception, integrity constraint violation: the same statement on the same data fails again."""


def sqlstate(exc: DatabaseError) -> str:
    """The error's SQLSTATE, or ``""`` (e.g. the connection broke before the server answered)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return getattr(orig, "sqlstate", None) or ""


def is_client_side_failure(exc: DatabaseError) -> bool:
    """No SQLSTATE: not the server's answer to a statement but the client library's own failure (a lost socket, an
    answer it cannot account for, e.g. through pgbouncer while PostgreSQL restarts; also a value it refused to
    send). The connection's state is not known for sure: it must never be used again (a healthy one dropped costs a
    reconnection, a broken one reused fails the next request)."""
    return not sqlstate(exc)


SESSION_ENDING_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05", "25P03"})
"""The server ends the session with the error: admin shutdown, crash shutdown, cannot connect now, database dropped,
a server-side ``idle_session_timeout`` (if one is set), and the idle-in-transaction timeout (a worker's bounded
transaction frozen past :data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS`; psycopg usually sees that close
itself)."""


def ends_the_session(exc: DatabaseError) -> bool:
    """The server, or pgbouncer, closes the connection after this error: a connection exception (class 08, e.g.
    pgbouncer's ``query_wait_timeout``, 08P01, while PostgreSQL is down) or one of :data:`SESSION_ENDING_SQLSTATES`.
    psycopg may not have seen the close yet (after pgbouncer's ``query_wait_timeout`` the connection looks idle, not
    broken): it must not be used again."""
    state = sqlstate(exc)
    return state[:2] == "08" or state in SESSION_ENDING_SQLSTATES


def leaves_the_connection_unusable(exc: DatabaseError) -> bool:
    """After this error a pooled connection must be closed, never handed out again: the client library's own
    failure (:func:`is_client_side_failure`) or a session the server or pgbouncer ends (:func:`ends_the_session`).
    Every pool of the exchange applies it: the api's :class:`~exchange.db.engines.AsyncPool`, the workers'
    SQLAlchemy engines (:func:`~exchange.db.engines.pooled_engine`), and the connections the matcher and the webhook
    store use through psycopg directly. A statement's own error (a constraint, a division by zero) keeps it."""
    return is_client_side_failure(exc) or ends_the_session(exc)


def is_retryable(exc: DatabaseError) -> bool:
    return sqlstate(exc) in RETRYABLE_SQLSTATES


def is_deterministic(exc: DatabaseError) -> bool:
    """The failure is caused by the data written, not by the database's state: retrying cannot help."""
    return sqlstate(exc)[:2] in _DETERMINISTIC_CLASSES

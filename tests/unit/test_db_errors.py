"""Classifying database errors by SQLSTATE (:mod:`exchange.db.errors`), raised by psycopg or wrapped by SQLAlchemy."""

from __future__ import annotations

import psycopg
from sqlalchemy.exc import DBAPIError

from exchange.db.errors import (
    ends_the_session,
    is_client_side_failure,
    is_deterministic,
    is_retryable,
    leaves_the_connection_unusable,
)


def wrapped(exc: psycopg.Error) -> DBAPIError:
    return DBAPIError("SELECT 1", None, exc)


def test_an_error_without_sqlstate_is_a_client_side_failure_raised_or_wrapped() -> None:
    confused = psycopg.InternalError("received 2 results from command 'BEGIN'")
    assert is_client_side_failure(confused)
    assert is_client_side_failure(wrapped(confused))


def test_an_error_the_server_answered_is_not_a_client_side_failure() -> None:
    assert not is_client_side_failure(psycopg.errors.UniqueViolation("duplicate key"))
    assert not is_client_side_failure(wrapped(psycopg.errors.DeadlockDetected("deadlock")))


def test_deadlocks_and_serialization_failures_are_retryable_and_data_errors_deterministic() -> None:
    assert is_retryable(psycopg.errors.DeadlockDetected("deadlock"))
    assert is_retryable(wrapped(psycopg.errors.SerializationFailure("could not serialize")))
    assert not is_retryable(psycopg.errors.UniqueViolation("duplicate key"))
    assert is_deterministic(psycopg.errors.UniqueViolation("duplicate key"))
    assert is_deterministic(psycopg.errors.NumericValueOutOfRange("out of range"))
    assert not is_deterministic(psycopg.errors.DeadlockDetected("deadlock"))


def test_connection_exceptions_and_shutdowns_end_the_session_and_statement_errors_do_not() -> None:
    assert ends_the_session(psycopg.errors.ProtocolViolation("query_wait_timeout"))  # 08P01, from pgbouncer
    assert ends_the_session(wrapped(psycopg.errors.AdminShutdown("terminating connection")))  # 57P01
    assert ends_the_session(psycopg.errors.CrashShutdown("crash"))  # 57P02
    assert ends_the_session(psycopg.errors.IdleInTransactionSessionTimeout("idle in transaction"))  # 25P03
    assert ends_the_session(psycopg.errors.IdleSessionTimeout("idle session"))  # 57P05
    assert ends_the_session(psycopg.errors.DatabaseDropped("database dropped"))  # 57P04
    assert not ends_the_session(psycopg.errors.QueryCanceled("statement timeout"))  # 57014: the session goes on
    assert not ends_the_session(psycopg.errors.DivisionByZero("division by zero"))
    assert not ends_the_session(psycopg.InternalError("no sqlstate"))


def test_a_client_failure_or_an_ended_session_leaves_the_connection_unusable_and_a_statement_error_does_not() -> None:
    assert leaves_the_connection_unusable(psycopg.InternalError("received 2 results from command 'BEGIN'"))
    assert leaves_the_connection_unusable(wrapped(psycopg.errors.ProtocolViolation("query_wait_timeout")))
    assert not leaves_the_connection_unusable(psycopg.errors.DivisionByZero("division by zero"))
    assert not leaves_the_connection_unusable(wrapped(psycopg.errors.QueryCanceled("statement timeout")))


def test_a_full_disk_is_neither_the_commands_fault_nor_the_end_of_the_connection() -> None:
    # 53100 for a statement that needs a new page: a matcher must retry its batch later (never quarantine a command
    # for it), and the connection goes on (tests/e2e/test_faults.py fills PostgreSQL's disk under the load).
    full = psycopg.errors.DiskFull("could not extend file")
    assert not is_deterministic(full)
    assert not is_deterministic(wrapped(full))
    assert not leaves_the_connection_unusable(full)

"""Which database errors the api answers 503 ``database_unavailable`` (retry later) rather than 500."""

from __future__ import annotations

import psycopg

from exchange.api.errors import is_database_unavailable


def test_psycopgs_own_internal_error_without_sqlstate_is_the_database_being_unavailable() -> None:
    # Seen through pgbouncer while PostgreSQL restarted: a connection-level failure, not a bad statement.
    assert is_database_unavailable(psycopg.InternalError("received 2 results from command 'BEGIN'"))


def test_connection_failures_are_the_database_being_unavailable() -> None:
    assert is_database_unavailable(psycopg.OperationalError("connection refused"))
    assert is_database_unavailable(psycopg.InterfaceError("the connection is closed"))


def test_a_client_side_data_error_is_not_the_database_being_unavailable() -> None:
    # A value psycopg cannot send is a bug of ours (500), not a reason for the client to retry later.
    assert not is_database_unavailable(psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"))

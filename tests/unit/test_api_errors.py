"""Which database errors the api answers 503 ``database_unavailable`` (retry later) rather than 500; every code
the api answers is in ``ERRORS`` (what the OpenAPI schema documents) with the status it is answered with."""

from __future__ import annotations

import psycopg

from exchange.api.errors import _DOMAIN_STATUS, _HTTP_CODES, ERRORS, is_database_unavailable
from exchange.orders.errors import OrderServiceError


def test_psycopgs_own_internal_error_without_sqlstate_is_the_database_being_unavailable() -> None:
    # Seen through pgbouncer while PostgreSQL restarted: a connection-level failure, not a bad statement.
    assert is_database_unavailable(psycopg.InternalError("received 2 results from command 'BEGIN'"))


def test_connection_failures_are_the_database_being_unavailable() -> None:
    assert is_database_unavailable(psycopg.OperationalError("connection refused"))
    assert is_database_unavailable(psycopg.InterfaceError("the connection is closed"))


def test_a_client_side_data_error_is_not_the_database_being_unavailable() -> None:
    # A value psycopg cannot send is a bug of ours (500), not a reason for the client to retry later.
    assert not is_database_unavailable(psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"))


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def test_every_domain_error_is_documented_with_the_status_the_api_answers() -> None:
    for cls in _subclasses(OrderServiceError):
        status = next(s for base, s in _DOMAIN_STATUS.items() if issubclass(cls, base))
        assert ERRORS[cls.code].status == status, cls.__name__


def test_every_code_the_http_layer_maps_to_is_documented_with_its_status() -> None:
    for status, code in _HTTP_CODES.items():
        assert ERRORS[code].status == status, code

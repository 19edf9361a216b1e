"""Which database errors the api answers 503 ``database_unavailable`` (retry later) rather than 500; every code
the api answers is in ``ERRORS`` (what the OpenAPI schema documents) with the status it is answered with."""

from __future__ import annotations

from typing import Any, cast

import psycopg

from exchange.api.errors import _HTTP_CODES, ERRORS, _domain_error, is_database_unavailable
from exchange.orders.errors import OrderServiceError
from exchange.webhooks import errors as webhook_errors


def test_psycopgs_own_internal_error_without_sqlstate_is_the_database_being_unavailable() -> None:
    # Seen through pgbouncer while PostgreSQL restarted: a connection-level failure, not a bad statement.
    assert is_database_unavailable(psycopg.InternalError("received 2 results from command 'BEGIN'"))


def test_connection_failures_are_the_database_being_unavailable() -> None:
    assert is_database_unavailable(psycopg.OperationalError("connection refused"))
    assert is_database_unavailable(psycopg.InterfaceError("the connection is closed"))


def test_a_full_disk_is_the_database_being_unavailable() -> None:
    # 53100 for a statement that needs a new page: the client may retry once there is room (503, not 500).
    assert is_database_unavailable(psycopg.errors.DiskFull("could not extend file"))


def test_a_client_side_data_error_is_not_the_database_being_unavailable() -> None:
    # A value psycopg cannot send is a bug of ours (500), not a reason for the client to retry later.
    assert not is_database_unavailable(psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"))


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def test_every_domain_error_answers_the_status_documented_for_its_code() -> None:
    classes = _subclasses(OrderServiceError)
    assert webhook_errors.WebhookEventNotFoundError in classes
    for cls in classes:
        assert cls.code in ERRORS, cls.__name__
        assert _domain_error(cast(Any, None), cls("message")).status_code == ERRORS[cls.code].status, cls.__name__


def test_every_code_the_http_layer_maps_to_is_documented_with_its_status() -> None:
    for status, code in _HTTP_CODES.items():
        assert ERRORS[code].status == status, code

"""The ONE place that turns exceptions into HTTP error responses, and that documents them in the OpenAPI schema.

Every error body is :class:`ErrorOut` (``{"code": str, "message": str, "details"?: any}``). Codes are stable
(clients branch on them); :data:`ERRORS` says which status each code has and when it is answered. A handler names
the codes it can answer with ``responses=error_responses(...)`` (plus :data:`BROKER_ERRORS`, :data:`ADMIN_ERRORS`
or :data:`BODY_ERRORS`), which puts them in its OpenAPI operation with :class:`ErrorOut` as the body, in place of
Litestar's own error shape that the api never sends. 500 ``internal_error`` (a bug; logged with its traceback, no
details returned) is not documented: it is never meant to happen.

Bad input is always 4xx, never 500. Handlers are registered at the app level, so they also cover routing errors.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, NamedTuple

import msgspec
import psycopg
import redis.exceptions
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ExceptionHandlersMap

from exchange.db.errors import READ_ONLY_SQLSTATE, is_client_side_failure, sqlstate
from exchange.orders import errors as domain

log = logging.getLogger("exchange.api")


class ErrorOut(msgspec.Struct, omit_defaults=True):
    """The body of every error response."""

    code: str
    """Stable: one of :data:`ERRORS`."""
    message: str
    """For people; may change."""
    details: Any = None
    """The offending field or path, when known (absent otherwise)."""


class ErrorCode(NamedTuple):
    """The status an error code is answered with, and when (the OpenAPI description says it)."""

    status: int
    when: str


ERRORS: dict[str, ErrorCode] = {
    "bad_request": ErrorCode(400, "a request the api cannot read (its HTTP layer refused it)"),
    "malformed_json": ErrorCode(400, "the request body is not parseable JSON (or is empty where a body is needed)"),
    "unauthorized": ErrorCode(401, "missing, malformed or unknown Bearer key (`WWW-Authenticate: Bearer`)"),
    "forbidden": ErrorCode(403, "not allowed (an HTTP-layer fallback: no endpoint answers it today)"),
    "not_found": ErrorCode(404, "no such route (or a disabled debug endpoint)"),
    "order_not_found": ErrorCode(404, "no such order for this broker (another broker's order looks the same)"),
    "no_trades": ErrorCode(404, "the symbol has had no trade yet"),
    "event_not_found": ErrorCode(404, "no such webhook event for this broker"),
    "method_not_allowed": ErrorCode(405, "the route exists but not for this method (`Allow` header set)"),
    "order_closed": ErrorCode(409, "amend of a closed order (or of one that closed before the matcher reached it)"),
    "amend_rejected": ErrorCode(
        409,
        "the matcher refused the amend, the order is unchanged; `details.reason`: `not_amendable` (the new quantity "
        "is not above the shares already filled, or the order reached its valid_until) or `unprocessable` (the "
        "matcher could not apply it)",
    ),
    "webhook_endpoint_unavailable": ErrorCode(
        409, "redeliver while the broker has no webhook URL or its endpoint is disabled (PUT /webhooks/endpoint)"
    ),
    "payload_too_large": ErrorCode(413, "request body over the size limit"),
    "unsupported_media_type": ErrorCode(415, "refused by the HTTP layer for its media type (a fallback)"),
    "validation_error": ErrorCode(
        422,
        "well-formed JSON (or query/path/header parameter) with a bad field: a query parameter the route takes "
        "given twice, wrong type, out of range, unknown field, naive, past or out-of-range datetime, price/time in "
        "force inconsistent with the order type, bad cursor, a text with a character the database's encoding lacks "
        "(a database that is not UTF8); `details` names the field or path when known",
    ),
    "idempotency_key_reused": ErrorCode(
        422, "a client_order_id/Idempotency-Key already used by this broker with different order fields"
    ),
    "invalid_webhook_url": ErrorCode(
        422,
        "not an absolute http(s) URL, or its host is or resolves to a loopback, private, link-local or metadata "
        "address (SSRF guard)",
    ),
    "rate_limited": ErrorCode(429, "too many requests (an HTTP-layer fallback: the api sets no limit today)"),
    "admin_disabled": ErrorCode(503, "admin endpoint called but EXCHANGE_ADMIN_API_KEY is unset"),
    "database_unavailable": ErrorCode(
        503,
        "PostgreSQL unreachable, failing at the connection level, out of resources (disk full) or refusing writes "
        "(read-only: a standby); retry later",
    ),
    "redis_unavailable": ErrorCode(
        503, "Redis unreachable where a request cannot do without it (the ops dramatiq dashboard); retry later"
    ),
    "service_unavailable": ErrorCode(503, "the HTTP layer cannot serve the request now (a fallback)"),
}
"""Every error code the api answers (besides ``internal_error``), in status order: its status and when. The
statuses of :class:`ApiError` and of the domain errors are read from here; the HTTP-layer fallbacks are the codes
of ``_HTTP_CODES`` that no handler raises itself."""

BROKER_ERRORS = ("unauthorized", "database_unavailable")
"""What any broker endpoint may answer (add ``validation_error`` where it takes parameters or a body)."""
ADMIN_ERRORS = ("unauthorized", "admin_disabled", "database_unavailable")
"""What any admin endpoint may answer."""
BODY_ERRORS = ("malformed_json", "payload_too_large", "validation_error")
"""What an endpoint with a JSON request body may answer besides."""


def error_responses(*codes: str) -> dict[int, ResponseSpec]:
    """The OpenAPI ``responses`` of a handler that may answer ``codes`` and ``bad_request`` (the HTTP layer's, on any
    route): one entry per status, naming its codes, with :class:`ErrorOut` as the body."""
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(("bad_request", *codes)):
        by_status.setdefault(ERRORS[code].status, []).append(code)
    return {
        status: ResponseSpec(
            ErrorOut,
            generate_examples=False,
            description="; ".join(f"`{code}`: {ERRORS[code].when}" for code in names),
        )
        for status, names in sorted(by_status.items())
    }


class ApiError(Exception):
    """An error response decided by the api itself (auth, body parsing, …); its status is its code's in
    :data:`ERRORS`."""

    def __init__(self, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = ERRORS[code].status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def unauthorized(message: str = "missing or invalid API key") -> ApiError:
    return ApiError("unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def error_response(
    status_code: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> Response[ErrorOut]:
    return Response(
        ErrorOut(code, message, details), status_code=status_code, media_type=MediaType.JSON, headers=headers
    )


def coded_response(code: str, message: str, details: Any = None) -> Response[ErrorOut]:
    """The error response of ``code``, with its status from :data:`ERRORS`."""
    return error_response(ERRORS[code].status, code, message, details)


_HTTP_CODES = {
    ERRORS[code].status: code
    for code in (
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "method_not_allowed",
        "payload_too_large",
        "unsupported_media_type",
        "rate_limited",
        "service_unavailable",
    )
}
"""The code of each status Litestar's own HTTP exceptions are answered with (not-found, method and auth errors
get their own messages in :func:`_http_error`)."""


def _api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[ErrorOut]:
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


def _domain_error(_: Request[Any, Any, Any], exc: domain.OrderServiceError) -> Response[ErrorOut]:
    known = ERRORS.get(exc.code)
    return error_response(known.status if known else 422, exc.code, exc.message, exc.details)


def _validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[ErrorOut]:
    # Litestar raises this for bad query/path/header parameters (bodies are decoded by schemas.decode_body).
    details = exc.extra if exc.extra else None
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else "invalid request parameters"
    return coded_response("validation_error", message, details)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorOut]:
    status = exc.status_code
    if status >= 500:
        log.error("http error %s: %s", status, exc.detail)
    if isinstance(exc, NotFoundException):
        code, message = "not_found", "no such resource"
    elif isinstance(exc, MethodNotAllowedException):
        code, message = "method_not_allowed", "method not allowed for this resource"
    elif isinstance(exc, NotAuthorizedException):
        code, message = "unauthorized", "missing or invalid API key"
    elif isinstance(exc, PermissionDeniedException):
        code, message = "forbidden", "not allowed"
    else:
        code = _HTTP_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
        message = exc.detail or HTTPStatus(status).phrase
    return error_response(status, code, message, None, exc.headers)


def _integrity_error(request: Request[Any, Any, Any], exc: psycopg.IntegrityError) -> Response[ErrorOut]:
    constraint = exc.diag.constraint_name or ""
    if constraint.startswith("fk_") and constraint.endswith("_brokers"):
        # The authenticated broker no longer exists (e.g. after /debug/reset while its key was cached).
        return _api_error(request, unauthorized("unknown broker"))
    if constraint.startswith("ck_"):
        return coded_response("validation_error", "value rejected by a database rule", {"rule": constraint})
    return _unexpected(request, exc)


def is_database_unavailable(exc: BaseException) -> bool:
    """True for failures to reach or keep a PostgreSQL connection, of a server out of resources (class 53, e.g. a
    full disk) or refusing writes (read-only), as opposed to a bad statement: the same request may pass later."""
    # OperationalError covers a failed connect, a connection lost mid-statement, the pool's PoolTimeoutError and
    # every SQLSTATE of classes 08/53/57P0x (psycopg maps them to it); also deadlocks, serialization failures and
    # statement timeouts (40P01, 40001, 57014), which a retry may pass too. An InternalError with no SQLSTATE is
    # psycopg's own "the connection answered what it cannot" (seen through pgbouncer while PostgreSQL restarted, when
    # the api still sent BEGIN: "received 2 results from command 'BEGIN'"): a connection-level failure too; the pool
    # drops that connection.
    if isinstance(exc, psycopg.InternalError) and is_client_side_failure(exc):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    # 25006: a database that refuses writes (a standby a failover left behind pgbouncer, default_transaction_read_only
    # set for maintenance) cannot take the request now, whatever it holds; once a primary is back it passes.
    if sqlstate(exc) == READ_ONLY_SQLSTATE:
        return True
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def _unstorable_text(_: Request[Any, Any, Any], exc: psycopg.errors.UntranslatableCharacter) -> Response[ErrorOut]:
    # SQLSTATE 22P05: a text of the request holds a character the database's server encoding lacks (a LATIN1
    # database and a "€"). The api's connections speak UTF-8 (AsyncPool), so the server, not psycopg, refuses it.
    return coded_response(
        "validation_error", "a text holds a character the database cannot store", {"rule": "encoding"}
    )


def _database_error(request: Request[Any, Any, Any], exc: psycopg.Error) -> Response[ErrorOut]:
    if is_database_unavailable(exc):
        log.warning("database unavailable: %s", exc.__class__.__name__, exc_info=True)
        return coded_response("database_unavailable", "the database is unavailable; retry later")
    return _unexpected(request, exc)


def _redis_error(request: Request[Any, Any, Any], exc: redis.exceptions.RedisError) -> Response[ErrorOut]:
    # Only what needs Redis to answer at all gets here (the order path's wake-ups and redeliveries never raise:
    # their commands are durable, the sweeper catches up). A connection failure or timeout is Redis being
    # unavailable, like database_unavailable; any other Redis error is a bug.
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        log.warning("redis unavailable: %s", exc.__class__.__name__, exc_info=True)
        return coded_response("redis_unavailable", "Redis is unavailable; retry later")
    return _unexpected(request, exc)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorOut]:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ApiError: _api_error,
    domain.OrderServiceError: _domain_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    psycopg.IntegrityError: _integrity_error,
    psycopg.errors.UntranslatableCharacter: _unstorable_text,
    psycopg.Error: _database_error,
    redis.exceptions.RedisError: _redis_error,
    Exception: _unexpected,
}

"""Bearer-key authentication. Both kinds run before the body or parameters are parsed, so an unauthenticated
request is 401 even when its body is invalid.

* Broker endpoints (the controllers' ``before_request`` hook :func:`broker_auth`): ``Authorization: Bearer <api
  key>``; the key's SHA-256 (hex) is looked up in ``brokers.api_key_hash`` (with a short in-process cache). The
  broker is put in the request's scope state, where the busy controllers read it with :func:`current_broker` and the
  others get it from the ``broker`` dependency (:mod:`exchange.api.dependencies`). A hook rather
  than a Litestar guard: Litestar copies the route handler for every guard call and builds a ``State`` (with a
  lock) on every ``connection.state`` access, together ~6 % of an api worker's CPU at ``--scale 100`` (py-spy).
  Not a route middleware either: an error raised there bypasses the request middleware (no request id, logged
  as 500).
* Admin endpoints (guard :func:`admin_guard`, rare calls): the key must equal ``EXCHANGE_ADMIN_API_KEY``
  (constant-time comparison); when that setting is unset every admin endpoint answers 503 ``admin_disabled``.
"""

from __future__ import annotations

import hmac
from typing import Any, TypeVar, cast

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Scope

from exchange.api.errors import ApiError, unauthorized
from exchange.api.query import refuse_repeated_query_parameters
from exchange.api.state import api_state
from exchange.db.engines import single_statement
from exchange.observability.requests import scope_header
from exchange.orders.brokers import broker_for_key_hash, hash_api_key
from exchange.orders.models import BrokerIdentity

MAX_KEY_LENGTH = 512
T = TypeVar("T")


BROKER_STATE_KEY = "broker"
"""Where :func:`broker_auth` leaves the authenticated broker in ``scope["state"]``."""


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value (None if absent or malformed)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_KEY_LENGTH:
        return None
    return token


async def authenticate_broker(scope: Scope) -> BrokerIdentity:
    """The broker whose API key the request carries; raises 401 ``unauthorized`` otherwise."""
    token = bearer_token(scope_header(scope, b"authorization"))
    if token is None:
        raise unauthorized()
    state = api_state(scope["app"])
    key_hash = hash_api_key(token)
    broker = state.keys.get(key_hash)
    if broker is None:
        async with single_statement(state.pool) as conn:
            broker = await broker_for_key_hash(conn, key_hash)
        if broker is None:
            raise unauthorized()
        state.keys.put(key_hash, broker)
    return broker


async def broker_auth(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook of the broker controllers: authenticate the request and leave its broker in
    ``scope["state"]`` for :func:`current_broker` (called directly, or through the ``broker`` dependency), then refuse
    a repeated query parameter (:mod:`exchange.api.query`). Litestar runs it before it parses the handler's
    parameters, and maps what it raises like any error of the handler."""
    request.scope.setdefault("state", {})[BROKER_STATE_KEY] = await authenticate_broker(request.scope)
    await refuse_repeated_query_parameters(request)  # the app's own before_request, which this hook replaces


def configured_admin_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """``EXCHANGE_ADMIN_API_KEY``; 503 ``admin_disabled`` when unset (admin endpoints and the ops pages)."""
    expected = api_state(connection.app).settings.admin_api_key
    if not expected:
        raise ApiError("admin_disabled", "admin endpoints are disabled: EXCHANGE_ADMIN_API_KEY is not set")
    return expected


def key_matches(candidate: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented key (None: none presented) with the expected one."""
    return candidate is not None and hmac.compare_digest(candidate.encode("utf-8"), expected.encode("utf-8"))


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    expected = configured_admin_key(connection)
    if not key_matches(bearer_token(connection.headers.get("authorization")), expected):
        raise unauthorized("missing or invalid admin key")


def current_broker(request: Request[Any, Any, Any]) -> BrokerIdentity:
    """Dependency ``broker``: the broker authenticated by :func:`broker_auth`."""
    return cast(BrokerIdentity, request.scope["state"][BROKER_STATE_KEY])


def unauthorized_if_missing(value: T | None) -> T:
    """A row of the authenticated broker that is gone (deleted while its key was cached) → 401."""
    if value is None:
        raise unauthorized("unknown broker")
    return value

"""Bearer-key authentication, as Litestar guards (they run before the body or parameters are parsed, so an
unauthenticated request is 401 even when its body is invalid).

* Broker endpoints: ``Authorization: Bearer <api key>``; the key's SHA-256 (hex) is looked up in
  ``brokers.api_key_hash`` (with a short in-process cache). The broker is put in ``request.state.broker`` and
  handed to controllers by the ``broker`` dependency.
* Admin endpoints: the key must equal ``EXCHANGE_ADMIN_API_KEY`` (constant-time comparison); when that setting is
  unset every admin endpoint answers 503 ``admin_disabled``.
"""

from __future__ import annotations

import hmac
from typing import Any, TypeVar, cast

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from exchange.api.errors import ApiError, unauthorized
from exchange.api.state import api_state
from exchange.db.engines import single_statement
from exchange.orders.brokers import broker_for_key_hash, hash_api_key
from exchange.orders.models import BrokerIdentity

MAX_KEY_LENGTH = 512
T = TypeVar("T")


def bearer_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_KEY_LENGTH:
        return None
    return token


async def broker_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    token = bearer_token(connection)
    if token is None:
        raise unauthorized()
    state = api_state(connection.app)
    key_hash = hash_api_key(token)
    broker = state.keys.get(key_hash)
    if broker is None:
        async with single_statement(state.pool) as conn:
            broker = await broker_for_key_hash(conn, key_hash)
        if broker is None:
            raise unauthorized()
        state.keys.put(key_hash, broker)
    connection.state.broker = broker


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    expected = api_state(connection.app).settings.admin_api_key
    if not expected:
        raise ApiError(503, "admin_disabled", "admin endpoints are disabled: EXCHANGE_ADMIN_API_KEY is not set")
    token = bearer_token(connection)
    if token is None or not hmac.compare_digest(token.encode("utf-8"), expected.encode("utf-8")):
        raise unauthorized("missing or invalid admin key")


def current_broker(request: Request[Any, Any, Any]) -> BrokerIdentity:
    """Dependency ``broker``: the broker authenticated by :func:`broker_guard`."""
    return cast(BrokerIdentity, request.state.broker)


def unauthorized_if_missing(value: T | None) -> T:
    """A row of the authenticated broker that is gone (deleted while its key was cached) → 401."""
    if value is None:
        raise unauthorized("unknown broker")
    return value

"""Admin authentication of the ops surfaces (``/ops``, ``/ops/data.json``, ``/ops/dramatiq``).

Accepted, in this order:

1. ``Authorization: Bearer <EXCHANGE_ADMIN_API_KEY>`` — scripts and curl;
2. the cookie ``exchange_ops`` set by ``GET /ops/login?key=<admin key>[&next=/ops/…]`` — browsers, which cannot
   add a header to a link. The cookie holds ``HMAC-SHA256(admin key, "exchange-ops-session")``, never the key; it
   is HttpOnly, ``SameSite=Strict`` (dramatiq-dashboard's delete/requeue forms cannot be triggered cross-site),
   scoped to ``/ops`` and lasts :data:`COOKIE_MAX_AGE_S`. Changing the admin key invalidates every cookie.

Without an admin key configured, every ops surface answers 503 ``admin_disabled`` like the other admin endpoints.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from exchange.api.auth import bearer_token, configured_admin_key, key_matches
from exchange.api.errors import unauthorized

COOKIE_NAME = "exchange_ops"
COOKIE_PATH = "/ops"
COOKIE_MAX_AGE_S = 12 * 3600
_SESSION_LABEL = b"exchange-ops-session"


def session_token(admin_key: str) -> str:
    """The cookie value for ``admin_key`` (derived, so the cookie never reveals the key)."""
    return hmac.new(admin_key.encode("utf-8"), _SESSION_LABEL, hashlib.sha256).hexdigest()


def ops_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    expected = configured_admin_key(connection)
    if key_matches(bearer_token(connection.headers.get("authorization")), expected):
        return
    if key_matches(connection.cookies.get(COOKIE_NAME), session_token(expected)):
        return
    raise unauthorized("admin key required: 'Authorization: Bearer <admin key>' or open /ops/login?key=<admin key>")

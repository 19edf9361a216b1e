"""Admin authentication of the ops surfaces (``/ops``, ``/ops/data.json``, ``/ops/dramatiq``).

Accepted, in this order:

1. ``Authorization: Bearer <EXCHANGE_ADMIN_API_KEY>`` — scripts and curl;
2. the cookie ``exchange_ops`` set by ``GET /ops/login?key=<admin key>[&next=/ops/…]`` — browsers, which cannot
   add a header to a link. The cookie holds the login's time and ``HMAC-SHA256(admin key, label + that time)``,
   never the key; it is HttpOnly, ``SameSite=Strict`` (dramatiq-dashboard's delete/requeue forms cannot be
   triggered cross-site), scoped to ``/ops``, and opens the ops pages for :data:`COOKIE_MAX_AGE_S` after the login,
   whatever the browser keeps (a copied cookie expires too). Changing the admin key invalidates every cookie.

Without an admin key configured, every ops surface answers 503 ``admin_disabled`` like the other admin endpoints.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from exchange.api.auth import bearer_token, configured_admin_key, key_matches
from exchange.api.errors import unauthorized

COOKIE_NAME = "exchange_ops"
COOKIE_PATH = "/ops"
COOKIE_MAX_AGE_S = 12 * 3600
_SESSION_LABEL = b"exchange-ops-session"


CLOCK_SKEW_S = 60
"""How far ahead of this process's clock a login may have been issued (by another api process or host)."""


def session_token(admin_key: str, issued_at: int) -> str:
    """The cookie value of a login at ``issued_at`` (Unix seconds) with ``admin_key``: the time, and a MAC of it
    derived from the key (so the cookie never reveals the key, and its time cannot be changed)."""
    mac = hmac.new(admin_key.encode("utf-8"), _SESSION_LABEL + b"." + str(issued_at).encode(), hashlib.sha256)
    return f"{issued_at}.{mac.hexdigest()}"


def session_valid(cookie: str | None, admin_key: str, now: float) -> bool:
    """``cookie`` is a login with ``admin_key`` made at most :data:`COOKIE_MAX_AGE_S` before ``now``."""
    issued, _, _ = (cookie or "").partition(".")
    if not (issued.isascii() and issued.isdigit()) or len(issued) > 12:  # isdigit() alone takes "²", int() not
        return False
    issued_at = int(issued)
    if not -CLOCK_SKEW_S <= now - issued_at <= COOKIE_MAX_AGE_S:
        return False
    return key_matches(cookie, session_token(admin_key, issued_at))


def ops_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    expected = configured_admin_key(connection)
    if key_matches(bearer_token(connection.headers.get("authorization")), expected):
        return
    if session_valid(connection.cookies.get(COOKIE_NAME), expected, time.time()):
        return
    raise unauthorized("admin key required: 'Authorization: Bearer <admin key>' or open /ops/login?key=<admin key>")

"""Broker registration and API-key lookup.

Invariants: an API key is ``exk_`` + 32 random bytes (url-safe base64) and is returned exactly once, at
registration; the database stores only its SHA-256 (lower-case hex), so a leaked table does not leak keys.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from urllib.parse import urlsplit

from exchange.db.engines import AsyncPgConnection, AsyncPool, single_statement
from exchange.orders.errors import InvalidWebhookUrlError
from exchange.orders.models import BrokerIdentity, RegisteredBroker
from exchange.webhooks.signing import SECRET_PREFIX
from exchange.webhooks.ssrf import UnsafeWebhookUrlError, check_url_async

API_KEY_PREFIX = "exk_"


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    """Standard Webhooks format: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def check_webhook_url(url: str) -> str:
    """An absolute http(s) URL with a host; raises :class:`InvalidWebhookUrlError` otherwise.

    (Whether the host may be private is checked by :func:`check_webhook_destination`, and again at delivery.)
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  # raises ValueError on a malformed port
    except ValueError as exc:
        raise InvalidWebhookUrlError(f"webhook_url is not a valid URL: {exc}", {"field": "webhook_url"}) from exc
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise InvalidWebhookUrlError("webhook_url must be an absolute http or https URL", {"field": "webhook_url"})
    if any(c.isspace() for c in url):
        raise InvalidWebhookUrlError("webhook_url must not contain whitespace", {"field": "webhook_url"})
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):  # NUL included; httpx refuses them at delivery
        raise InvalidWebhookUrlError("webhook_url must not contain control characters", {"field": "webhook_url"})
    return url


async def check_webhook_destination(url: str, *, allow_private: bool) -> str:
    """:func:`check_webhook_url` plus the SSRF guard (:mod:`exchange.webhooks.ssrf`): a host that is or resolves
    to a loopback, private, link-local or metadata address is refused unless ``allow_private``."""
    check_webhook_url(url)
    try:
        await check_url_async(url, allow_private)
    except UnsafeWebhookUrlError as exc:
        raise InvalidWebhookUrlError(f"webhook_url refused: {exc}", {"field": "webhook_url"}) from exc
    return url


_INSERT_BROKER = """
    INSERT INTO brokers (name, api_key_hash, webhook_url, webhook_secret)
    VALUES (%(name)s, %(api_key_hash)s, %(webhook_url)s, %(webhook_secret)s)
    RETURNING id
"""


async def register_broker(
    pool: AsyncPool, name: str, webhook_url: str | None, *, allow_private_webhooks: bool = False
) -> RegisteredBroker:
    """Create a broker with a fresh API key and webhook secret (one statement)."""
    if webhook_url is not None:
        await check_webhook_destination(webhook_url, allow_private=allow_private_webhooks)
    api_key = new_api_key()
    secret = new_webhook_secret()
    async with single_statement(pool) as conn:
        cur = await conn.execute(
            _INSERT_BROKER,
            {
                "name": name,
                "api_key_hash": hash_api_key(api_key),
                "webhook_url": webhook_url,
                "webhook_secret": secret,
            },
        )
        row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING of one row returns one row
    return RegisteredBroker(row.id, name, api_key, webhook_url, secret)


async def broker_for_key_hash(conn: AsyncPgConnection, key_hash: str) -> BrokerIdentity | None:
    """The broker whose API key has SHA-256 ``key_hash`` (see :func:`hash_api_key`), or None."""
    cur = await conn.execute("SELECT id, name FROM brokers WHERE api_key_hash = %(h)s", {"h": key_hash})
    row = await cur.fetchone()
    return None if row is None else BrokerIdentity(row.id, row.name)

"""SQL of the webhook endpoints (async, api side). Every broker query is scoped by ``broker_id``: a broker never
sees another broker's events, attempts or endpoint."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from exchange.config import redact
from exchange.db.engines import AsyncPgConnection
from exchange.orders.errors import InvalidCursorError
from exchange.webhooks.errors import WebhookEndpointUnavailableError, WebhookEventNotFoundError

# ------------------------------------------------------------------------------------------------- endpoint


@dataclass(frozen=True, slots=True)
class EndpointView:
    url: str | None
    enabled: bool
    disabled_reason: str | None
    consecutive_failures: int
    previous_secret_expires_at: datetime | None
    pending_events: int
    failed_events: int


_ENDPOINT = """
    SELECT b.webhook_url, b.webhook_enabled, b.webhook_disabled_reason, b.webhook_consecutive_failures,
           b.webhook_secret_previous_expires_at,
           (SELECT count(*) FROM webhook_events e WHERE e.broker_id = b.id AND e.status = 'pending') AS pending,
           (SELECT count(*) FROM webhook_events e WHERE e.broker_id = b.id AND e.status = 'failed') AS failed
    FROM brokers b WHERE b.id = %(broker_id)s
"""


async def endpoint(conn: AsyncPgConnection, broker_id: UUID) -> EndpointView | None:
    row = await (await conn.execute(_ENDPOINT, {"broker_id": broker_id})).fetchone()
    if row is None:
        return None
    return EndpointView(
        row.webhook_url,
        row.webhook_enabled,
        row.webhook_disabled_reason,
        row.webhook_consecutive_failures,
        row.webhook_secret_previous_expires_at,
        row.pending,
        row.failed,
    )


async def set_endpoint(conn: AsyncPgConnection, broker_id: UUID, url: str | None) -> None:
    """Set (or clear) the URL and re-enable the endpoint with a clean failure count (no such broker: no row)."""
    await conn.execute(
        "UPDATE brokers SET webhook_url = %(url)s, webhook_enabled = true, webhook_disabled_reason = NULL, "
        "webhook_consecutive_failures = 0 WHERE id = %(broker_id)s",
        {"broker_id": broker_id, "url": url},
    )


MAX_PREVIOUS_SECRETS = 4
"""The most secrets rotated out that still sign (each a ``v1,`` entry of every delivery's signature header)."""

# ``webhook_secret_previous`` holds the secrets rotated out that still sign, newest first, separated by spaces. A
# rotation within the grace of an earlier one keeps that one's secrets too (a client that lost the first answer
# and rotated again, or a receiver still deploying the secret before): all of them sign until this rotation's grace
# ends. One column of text, as before: the claim hands it over whole and the store splits it.
_ROTATE = f"""
    UPDATE brokers
    SET webhook_secret_previous = CASE WHEN %(grace)s > 0 THEN array_to_string((string_to_array(concat_ws(' ',
            webhook_secret,
            CASE WHEN webhook_secret_previous_expires_at > clock_timestamp() THEN webhook_secret_previous END
        ), ' '))[1:{MAX_PREVIOUS_SECRETS}], ' ') END,
        webhook_secret_previous_expires_at =
            CASE WHEN %(grace)s > 0 THEN clock_timestamp() + make_interval(secs => %(grace)s) END,
        webhook_secret = %(secret)s
    WHERE id = %(broker_id)s
    RETURNING webhook_secret_previous_expires_at
"""  # noqa: S608  # a constant


async def rotate_secret(
    conn: AsyncPgConnection, broker_id: UUID, new_secret: str, grace_s: int
) -> tuple[bool, datetime | None]:
    """Make ``new_secret`` current; the secrets it replaces (the current one, and those an earlier rotation left
    signing) keep signing for ``grace_s`` seconds (none when 0). Returns (found, their expiry)."""
    cur = await conn.execute(_ROTATE, {"broker_id": broker_id, "secret": new_secret, "grace": grace_s})
    row = await cur.fetchone()
    return (False, None) if row is None else (True, row[0])


# ------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class EventView:
    sequence: int
    event_id: UUID
    type: str
    created_at: datetime
    status: str
    attempts: int
    body: str
    """The webhook body exactly as it is sent (JSON text)."""


async def list_events(conn: AsyncPgConnection, broker_id: UUID, after: int, limit: int) -> list[EventView]:
    """The broker's durable event log: events with ``sequence > after`` in sequence order (gap-free per broker)."""
    cur = await conn.execute(
        "SELECT sequence, id, type, created_at, status, attempts, payload::text AS body FROM webhook_events "
        "WHERE broker_id = %(broker_id)s AND sequence > %(after)s ORDER BY sequence LIMIT %(limit)s",
        {"broker_id": broker_id, "after": after, "limit": limit},
    )
    return [
        EventView(r.sequence, r.id, r.type, r.created_at, r.status, r.attempts, r.body) for r in await cur.fetchall()
    ]


# The event made pending again only while its broker's endpoint can be sent to, and whether it can, in ONE
# statement: in autocommit it is its own transaction (the UPDATE locks the event row itself; a concurrent change of
# it is waited for and the update applied after it).
_REDELIVER = """
    WITH target AS (
        SELECT e.id, b.webhook_url IS NOT NULL AND b.webhook_enabled AS deliverable
        FROM webhook_events e JOIN brokers b ON b.id = e.broker_id
        WHERE e.id = %(id)s AND e.broker_id = %(broker_id)s
    ),
    made_pending AS (
        UPDATE webhook_events
        SET status = 'pending', delivered_at = NULL, last_error = NULL, next_attempt_at = clock_timestamp(),
            generation = generation + 1
        WHERE id = (SELECT id FROM target WHERE deliverable)
    )
    SELECT deliverable FROM target
"""


async def redeliver(conn: AsyncPgConnection, broker_id: UUID, event_id: UUID) -> None:
    """Make the event pending and due now (whatever its status), in one statement. The caller enqueues ``deliver``
    after it.

    It also starts the event's next ``generation``: an attempt in flight (claimed before) that fails is still
    logged but can no longer end the event ``failed`` or schedule its retry, so the redelivery is made; one that
    succeeds still delivers it (:mod:`exchange.webhooks.store` states the rule). ``attempts`` is left as it is:
    the redelivery is one more attempt of the schedule.

    Raises :class:`WebhookEventNotFoundError` (not this broker's event) or
    :class:`WebhookEndpointUnavailableError` (no URL or endpoint disabled: nothing could be sent; nothing changed).
    """
    row = await (await conn.execute(_REDELIVER, {"id": event_id, "broker_id": broker_id})).fetchone()
    if row is None:
        raise WebhookEventNotFoundError()
    if not row.deliverable:
        raise WebhookEndpointUnavailableError(
            "the webhook endpoint has no URL or is disabled; set it with PUT /webhooks/endpoint"
        )


# ----------------------------------------------------------------------------------------------- attempts


@dataclass(frozen=True, slots=True)
class AttemptView:
    attempt_id: int
    event_id: UUID
    sequence: int
    event_type: str
    event_status: str
    attempted_at: datetime
    url: str
    status_code: int | None
    latency_ms: int | None
    error: str | None
    response_excerpt: str | None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# The event is joined on its broker too: an attempt row naming another broker than its event's must not show that
# broker's event. The attempts' key refuses such a row (alembic 0021); the join keeps the rule where it is read.
_ATTEMPTS = """
    SELECT a.id, a.event_id, e.sequence, e.type, e.status, a.attempted_at, a.url, a.status_code, a.latency_ms,
           a.error, a.response_excerpt
    FROM webhook_attempts a JOIN webhook_events e ON e.id = a.event_id AND e.broker_id = a.broker_id
    WHERE {where}
    ORDER BY a.attempted_at DESC, a.id DESC
    LIMIT %(limit)s
"""


def encode_attempt_cursor(attempted_at: datetime, attempt_id: int) -> str:
    raw = json.dumps([attempted_at.isoformat(), attempt_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_attempt_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, attempt_id = json.loads(raw)
        moment = datetime.fromisoformat(stamp)
        # Any JSON may come back: the id must be an int the bigint column can hold (a bool is an int in Python).
        if (
            moment.tzinfo is None
            or not isinstance(attempt_id, int)
            or isinstance(attempt_id, bool)
            or not 0 <= attempt_id < 2**63
        ):
            raise ValueError("bad cursor")
        return moment, attempt_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursorError("cursor is not one this api returned", {"field": "cursor"}) from exc


async def list_attempts(
    conn: AsyncPgConnection, broker_id: UUID, *, status: str | None, cursor: str | None, limit: int
) -> tuple[list[AttemptView], str | None]:
    """The broker's delivery attempts, newest first (keyset on ``(attempted_at, id)``), and the next cursor."""
    conditions = ["a.broker_id = %(broker_id)s"]
    params: dict[str, Any] = {"broker_id": broker_id, "limit": limit + 1}
    if status == "succeeded":
        conditions.append("a.status_code BETWEEN 200 AND 299")
    elif status == "failed":
        conditions.append("(a.status_code IS NULL OR a.status_code NOT BETWEEN 200 AND 299)")
    if cursor is not None:
        params["c_at"], params["c_id"] = decode_attempt_cursor(cursor)
        conditions.append("(a.attempted_at, a.id) < (%(c_at)s, %(c_id)s)")
    # Constant fragments only; every value is a bound parameter.
    statement = _ATTEMPTS.format(where=" AND ".join(conditions))
    rows = await (await conn.execute(statement, params)).fetchall()
    items = [AttemptView(*row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = items[-1]
        next_cursor = encode_attempt_cursor(last.attempted_at, last.attempt_id)
    return items, next_cursor


# -------------------------------------------------------------------------------------------------- admin


@dataclass(frozen=True, slots=True)
class FailingEndpoint:
    broker_id: UUID
    broker_name: str
    url: str | None
    enabled: bool
    disabled_reason: str | None
    consecutive_failures: int
    failed_events: int
    retrying_events: int
    oldest_pending_at: datetime | None


# Retrying: pending after a failed attempt (a recorded retry sets last_error; a delivery or a redelivery clears it).
# Not attempts > 0: a first attempt in flight has claimed its event (attempts 1) and has not failed.
_FAILING = """
    SELECT b.id, b.name, b.webhook_url, b.webhook_enabled, b.webhook_disabled_reason,
           b.webhook_consecutive_failures,
           (SELECT count(*) FROM webhook_events e WHERE e.broker_id = b.id AND e.status = 'failed') AS failed,
           (SELECT count(*) FROM webhook_events e
            WHERE e.broker_id = b.id AND e.status = 'pending' AND e.last_error IS NOT NULL) AS retrying,
           (SELECT min(e.created_at) FROM webhook_events e
            WHERE e.broker_id = b.id AND e.status = 'pending') AS oldest_pending
    FROM brokers b
    WHERE NOT b.webhook_enabled OR b.webhook_consecutive_failures > 0
       OR EXISTS (SELECT 1 FROM webhook_events e
                  WHERE e.broker_id = b.id AND e.status = 'pending' AND e.last_error IS NOT NULL)
    ORDER BY b.webhook_enabled, b.webhook_consecutive_failures DESC, b.name
    LIMIT %(limit)s
"""


async def failing_endpoints(conn: AsyncPgConnection, limit: int = 500) -> list[FailingEndpoint]:
    """Endpoints disabled, with failed events in a row, or with events being retried: worst first. The one list of
    unhealthy endpoints: ``GET /admin/webhooks/failing`` and the ops page both show it. URLs come without their
    password, or their user name when it comes alone (a token): a receiver's basic-auth credentials are the
    broker's, not the operator's to read."""
    cur = await conn.execute(_FAILING, {"limit": limit})
    return [
        FailingEndpoint(broker_id, name, None if url is None else redact(url, lone_user_is_secret=True), *rest)
        for broker_id, name, url, *rest in await cur.fetchall()
    ]

"""Webhook endpoints (issue 4): the broker's endpoint, secret, delivery log and durable event log; admin's view
of failing endpoints.

Broker (Bearer API key):

* ``GET /webhooks/endpoint`` 200 — URL, enabled, why it was disabled, failure count, pending/failed counts.
* ``PUT /webhooks/endpoint`` ``{"url": str | null}`` 200 — set or clear the URL; always re-enables the endpoint
  and resets its failure count. 422 ``invalid_webhook_url`` (not http(s), or SSRF guard).
* ``POST /webhooks/secret/rotate`` 200 ``{webhook_secret, previous_secret_expires_at}`` — the old secret keeps
  signing (a further ``v1,`` entry of ``webhook-signature``) until ``previous_secret_expires_at``, as do those an
  earlier rotation within its grace replaced (up to 4).
* ``GET /webhooks/deliveries?status=succeeded|failed&cursor=&limit=`` 200 — the attempt log, newest first (as long
  as the sweeper keeps attempts: ``EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS``).
* ``POST /webhooks/events/{id}/redeliver`` 202 — make the event pending and due now (one more attempt; if the retry
  schedule is already used up, a failure ends it ``failed`` again). An attempt already in flight that fails does
  not undo it; one that succeeds delivers the event. 404 ``event_not_found``, 409
  ``webhook_endpoint_unavailable``.
* ``GET /events?after=<sequence>&limit=`` 200 ``{items, next_after}`` — every event of the broker in sequence order
  (gap-free), whatever its delivery status, each with the exact webhook body: a broker that was down catches up
  without webhooks by polling with ``after = next_after``.

Admin: ``GET /admin/webhooks/failing`` 200 — disabled endpoints and endpoints with failures or retries (URLs without
their password); the ops page lists the same.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from litestar import Controller, Request, Response, get, post, put
from litestar.params import FromPath, QueryParameter

from exchange.api.auth import admin_guard, broker_auth, unauthorized_if_missing
from exchange.api.bodies import JsonBody
from exchange.api.dependencies import API, BROKER, Api, CurrentBroker, Cursor, PageLimit
from exchange.api.errors import ADMIN_ERRORS, BODY_ERRORS, BROKER_ERRORS, error_responses
from exchange.api.schemas import Url, to_wire
from exchange.db.engines import single_statement
from exchange.orders.brokers import check_webhook_destination, new_webhook_secret
from exchange.webhooks import queries
from exchange.webhooks.errors import WebhookEventNotFoundError
from exchange.webhooks.queue import enqueue_deliveries

log = logging.getLogger("exchange.api")

REDELIVER_ENQUEUE_WAIT_S = 0.5
"""How long a redelivery waits for its enqueue; a Redis that has not answered by then (a stalled server: the
broker's socket timeout is 10 s) leaves the event to the sweeper, which hints the workers about overdue events."""

_REDELIVERIES = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redeliver")
"""The enqueues of redeliveries, one at a time: while Redis stalls, an enqueue given up on still holds its thread
(up to the socket timeout), and on the loop's default executor a few would hold the threads that name lookups
(webhook URL checks) need."""

# ------------------------------------------------------------------------------------------------ wire types


class EndpointRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: Url | None  # refuses NUL (PostgreSQL text cannot hold it) as a 422, not a 500 DataError


ENDPOINT_BODY = JsonBody(EndpointRequest)


class EndpointOut(msgspec.Struct, kw_only=True):
    url: str | None
    enabled: bool
    disabled_reason: str | None
    consecutive_failed_events: int
    previous_secret_expires_at: datetime | None
    pending_events: int
    failed_events: int


class SecretOut(msgspec.Struct, kw_only=True):
    webhook_secret: str
    previous_secret_expires_at: datetime | None


class AttemptOut(msgspec.Struct, kw_only=True):
    attempt_id: int
    event_id: UUID
    sequence: int
    event_type: str
    event_status: str
    attempted_at: datetime
    url: str
    succeeded: bool
    status_code: int | None
    latency_ms: int | None
    error: str | None
    response_excerpt: str | None


class AttemptPageOut(msgspec.Struct, kw_only=True):
    items: list[AttemptOut]
    next_cursor: str | None


class RedeliverOut(msgspec.Struct, kw_only=True):
    event_id: UUID
    status: str


class EventOut(msgspec.Struct, kw_only=True):
    sequence: int
    event_id: UUID
    type: str
    created_at: datetime
    delivery_status: str
    attempts: int
    payload: msgspec.Raw
    """The webhook body, byte for byte."""


class EventPageOut(msgspec.Struct, kw_only=True):
    items: list[EventOut]
    next_after: int
    """Pass back as ``after``; equals the request's ``after`` when there was nothing new."""


class FailingEndpointOut(msgspec.Struct, kw_only=True):
    broker_id: UUID
    broker_name: str
    url: str | None
    enabled: bool
    disabled_reason: str | None
    consecutive_failed_events: int
    failed_events: int
    retrying_events: int
    oldest_pending_at: datetime | None


def _endpoint_out(view: queries.EndpointView) -> EndpointOut:
    return EndpointOut(
        url=view.url,
        enabled=view.enabled,
        disabled_reason=view.disabled_reason,
        consecutive_failed_events=view.consecutive_failures,
        previous_secret_expires_at=view.previous_secret_expires_at,
        pending_events=view.pending_events,
        failed_events=view.failed_events,
    )


# ---------------------------------------------------------------------------------------------- controllers


class WebhooksController(Controller):
    path = "/"
    before_request = staticmethod(broker_auth)  # Litestar reads these class attributes
    dependencies = {**API, **BROKER}  # noqa: RUF012

    @get("/webhooks/endpoint", responses=error_responses(*BROKER_ERRORS))
    async def get_endpoint(self, api: Api, broker: CurrentBroker) -> EndpointOut:
        """The broker's webhook endpoint and why it is disabled, if it is."""
        async with single_statement(api.pool) as conn:
            view = unauthorized_if_missing(await queries.endpoint(conn, broker.id))
        return _endpoint_out(view)

    @put(
        "/webhooks/endpoint",
        responses=error_responses(*BROKER_ERRORS, *BODY_ERRORS, "invalid_webhook_url"),
        operation_class=ENDPOINT_BODY.operation_class,
    )
    async def put_endpoint(self, request: Request[Any, Any, Any], api: Api, broker: CurrentBroker) -> EndpointOut:
        """Set (or, with ``null``, clear) the webhook URL; re-enables the endpoint. Events skipped while it was
        disabled are not re-sent: fetch them from ``GET /events`` or redeliver them one by one."""
        body = await ENDPOINT_BODY.read(request)
        if body.url is not None:
            await check_webhook_destination(body.url, allow_private=api.settings.webhook_allow_private)
        async with single_statement(api.pool) as conn:
            # Two statements, each its own transaction: the broker's row is locked only while the UPDATE runs, and
            # the read after it counts the events as they are then. A missing broker: endpoint() is None.
            await queries.set_endpoint(conn, broker.id, body.url)
            view = unauthorized_if_missing(await queries.endpoint(conn, broker.id))
        return _endpoint_out(view)

    @post("/webhooks/secret/rotate", status_code=200, responses=error_responses(*BROKER_ERRORS))
    async def rotate_secret(self, api: Api, broker: CurrentBroker) -> Response[SecretOut]:
        """A new signing secret, shown once; the previous one stays valid for ``EXCHANGE_WEBHOOK_SECRET_GRACE_S``."""
        secret = new_webhook_secret()
        async with single_statement(api.pool) as conn:  # one UPDATE: its own transaction, no lock between round trips
            found, expires = await queries.rotate_secret(conn, broker.id, secret, api.settings.webhook_secret_grace_s)
        unauthorized_if_missing(found or None)
        out = SecretOut(webhook_secret=secret, previous_secret_expires_at=expires)
        return Response(out, status_code=200, headers={"Cache-Control": "no-store"})

    @get("/webhooks/deliveries", responses=error_responses(*BROKER_ERRORS, "validation_error"))
    async def deliveries(
        self,
        api: Api,
        broker: CurrentBroker,
        status: Annotated[Literal["succeeded", "failed"] | None, QueryParameter()] = None,
        cursor: Cursor = None,
        limit: PageLimit = 50,
    ) -> AttemptPageOut:
        """Delivery attempts, newest first; pass ``next_cursor`` back as ``cursor``. Attempts older than the
        exchange's retention (``EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS``, a week by default) are deleted; a cursor
        stays valid (the keyset is a time and an id, not a row)."""
        async with single_statement(api.pool) as conn:
            items, next_cursor = await queries.list_attempts(conn, broker.id, status=status, cursor=cursor, limit=limit)
        return AttemptPageOut(items=[to_wire(a, AttemptOut) for a in items], next_cursor=next_cursor)

    @post(
        "/webhooks/events/{event_id:str}/redeliver",
        status_code=202,
        responses=error_responses(*BROKER_ERRORS, "event_not_found", "webhook_endpoint_unavailable"),
    )
    async def redeliver(self, api: Api, broker: CurrentBroker, event_id: FromPath[str]) -> RedeliverOut:
        """Send the event again (whatever its status); delivery is asynchronous."""
        try:
            parsed = uuid.UUID(event_id)
        except ValueError:
            raise WebhookEventNotFoundError() from None
        async with single_statement(api.pool) as conn:
            await queries.redeliver(conn, broker.id, parsed)
        try:
            # dramatiq's enqueue blocks on Redis: keep it off the event loop (a rare request: the order path's
            # wake-ups use the async AsyncEnqueuer instead), and answer without it when Redis stalls.
            async with asyncio.timeout(REDELIVER_ENQUEUE_WAIT_S):
                await api.names.get()  # known unless the database was down when the api started
                await asyncio.get_running_loop().run_in_executor(
                    _REDELIVERIES, enqueue_deliveries, api.broker, [parsed]
                )
        except Exception:  # committed: the sweeper hints about it once it is overdue
            log.warning("redeliver: could not enqueue event %s", parsed, exc_info=True)
        return RedeliverOut(event_id=parsed, status="pending")

    @get("/events", responses=error_responses(*BROKER_ERRORS, "validation_error"))
    async def events(
        self,
        api: Api,
        broker: CurrentBroker,
        after: Annotated[int, QueryParameter(ge=0, le=2**63 - 1)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> EventPageOut:
        """The broker's events with ``sequence > after``, in sequence order."""
        async with single_statement(api.pool) as conn:
            rows = await queries.list_events(conn, broker.id, after, limit)
        return EventPageOut(
            items=[
                EventOut(
                    sequence=r.sequence,
                    event_id=r.event_id,
                    type=r.type,
                    created_at=r.created_at,
                    delivery_status=r.status,
                    attempts=r.attempts,
                    payload=msgspec.Raw(r.body.encode("utf-8")),
                )
                for r in rows
            ],
            next_after=rows[-1].sequence if rows else after,
        )


class WebhooksAdminController(Controller):
    path = "/admin/webhooks"
    guards = [admin_guard]  # noqa: RUF012
    dependencies = API

    @get("/failing", responses=error_responses(*ADMIN_ERRORS))
    async def failing(self, api: Api) -> list[FailingEndpointOut]:
        """Disabled endpoints and endpoints whose events fail or are being retried, worst first."""
        async with single_statement(api.pool) as conn:
            rows = await queries.failing_endpoints(conn)
        return [
            FailingEndpointOut(
                broker_id=r.broker_id,
                broker_name=r.broker_name,
                url=r.url,
                enabled=r.enabled,
                disabled_reason=r.disabled_reason,
                consecutive_failed_events=r.consecutive_failures,
                failed_events=r.failed_events,
                retrying_events=r.retrying_events,
                oldest_pending_at=r.oldest_pending_at,
            )
            for r in rows
        ]

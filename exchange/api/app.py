"""The Litestar application: ``create_app()`` is what gunicorn loads (``exchange.api.app:create_app()``).

Endpoints (auth; success status; error codes beyond 401/422/503 ``database_unavailable`` — every code is in
:data:`exchange.api.errors.ERRORS`, and each operation's are in the OpenAPI schema, as are the JSON bodies the
handlers decode themselves: :mod:`exchange.api.bodies`):

* ``POST /register`` (admin) 201 · ``GET /debug/trade-count`` (admin) 200 · ``POST /debug/reset`` (admin, only with
  ``EXCHANGE_DEBUG_ENDPOINTS=true``, else 404) 200 · admin endpoints are 503 ``admin_disabled`` without an admin key.
* ``POST /orders`` 201 (also for an idempotent replay) · ``GET /orders`` 200 · ``DELETE /orders?symbol=`` 200
  ``{symbol, cancelled}`` · ``GET /orders/{id}`` 200/404 ``order_not_found`` · ``PATCH /orders/{id}`` 200/404/409
  ``order_closed`` · ``POST /orders/{id}/cancel`` 204 (200 with ``Prefer: return=representation``)/404.
* ``GET /stocks/{symbol}/book|price|trades`` 200 (price: 404 ``no_trades``) · ``GET /balance`` · ``GET /positions``.
* ``GET /health``, ``/health/live`` 200; ``GET /health/ready`` 200/503.
* Webhooks (:mod:`exchange.api.controllers.webhooks`): ``GET|PUT /webhooks/endpoint``, ``POST
  /webhooks/secret/rotate``, ``GET /webhooks/deliveries``, ``POST /webhooks/events/{id}/redeliver`` 202 (404
  ``event_not_found``, 409 ``webhook_endpoint_unavailable``), ``GET /events``; admin ``GET /admin/webhooks/failing``.

Each worker process builds its own resources in the lifespan (:mod:`exchange.api.state`).
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Litestar, Response, Router
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_404_NOT_FOUND

from exchange.api.bodies import publish_request_bodies
from exchange.api.controllers.account import AccountController
from exchange.api.controllers.admin import AdminController
from exchange.api.controllers.health import HealthController
from exchange.api.controllers.orders import OrdersController
from exchange.api.controllers.stocks import StocksController
from exchange.api.controllers.webhooks import WebhooksAdminController, WebhooksController
from exchange.api.errors import EXCEPTION_HANDLERS, coded_response
from exchange.api.query import refuse_repeated_query_parameters
from exchange.api.state import lifespan
from exchange.config import Settings
from exchange.observability.logs import configure_logging
from exchange.observability.requests import observe_requests
from exchange.ops.controller import MetricsController, OpsController
from exchange.ops.dashboard import dramatiq_dashboard

MAX_BODY_BYTES = 64 * 1024
SCHEMA_PATH = "/schema"


def _schema_not_found_as_json(response: Response[Any]) -> Response[Any]:
    """``after_request`` of the schema's router: Litestar answers a path there that no documentation site serves
    with an HTML page of its own (not an exception the app's handlers see); every error of the api is JSON."""
    if response.status_code == HTTP_404_NOT_FOUND:
        return coded_response("not_found", "no such resource")
    return response


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the app for ``settings`` (default: :meth:`Settings.from_env`)."""
    settings = settings or Settings.from_env()
    configure_logging("api", level=settings.log_level, fmt=settings.log_format)
    logging.getLogger("exchange").setLevel(settings.log_level.upper())
    app = Litestar(
        route_handlers=[
            *(AdminController, OrdersController, StocksController, AccountController, HealthController),
            *(OpsController, MetricsController, dramatiq_dashboard),
            *(WebhooksController, WebhooksAdminController),
        ],
        lifespan=[lifespan(settings)],
        exception_handlers=EXCEPTION_HANDLERS,
        before_request=refuse_repeated_query_parameters,  # the broker controllers' broker_auth calls it too
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="exchange",
            version="1",
            openapi_router=Router(
                SCHEMA_PATH, route_handlers=[], include_in_schema=False, after_request=_schema_not_found_as_json
            ),
        ),
        logging_config=None,
        debug=False,
    )
    publish_request_bodies(app.openapi_schema)  # builds it now: Litestar keeps this one and serves it
    observe_requests(app, settings.slow_request_ms)
    return app

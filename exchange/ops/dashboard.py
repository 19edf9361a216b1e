"""dramatiq-dashboard mounted at ``/ops/dramatiq`` inside the Litestar app.

The dashboard is a WSGI app with no authentication of its own; a2wsgi runs it on a thread pool inside the api's
event loop and the mount's guard (:func:`exchange.ops.auth.ops_guard`) runs before it. It reads the queues the
broker declared (:func:`exchange.messaging.broker.make_broker` declares every ``matching.<n>`` and ``webhooks``)
and the workers' heartbeats from Redis. One dashboard per api process, built on first use from that process's
broker.
"""

from __future__ import annotations

from a2wsgi import WSGIMiddleware
from dramatiq.brokers.redis import RedisBroker
from litestar import asgi
from litestar.types import Receive, Scope, Send

from exchange.api.state import api_state
from exchange.ops.auth import ops_guard

DASHBOARD_PREFIX = "/ops/dramatiq"


def _build(broker: RedisBroker) -> WSGIMiddleware:
    from dramatiq_dashboard.application import DashboardApp  # type: ignore[import-untyped]

    return WSGIMiddleware(DashboardApp(broker, DASHBOARD_PREFIX), workers=4)


@asgi(DASHBOARD_PREFIX, is_mount=True, guards=[ops_guard], copy_scope=True)
async def dramatiq_dashboard(scope: Scope, receive: Receive, send: Send) -> None:
    """Everything under ``/ops/dramatiq`` (the mount strips the prefix; the dashboard's links put it back)."""
    app = scope["litestar_app"]
    wsgi = getattr(app.state, "ops_dashboard", None)
    if wsgi is None:
        api = api_state(app)
        await api.names.get()  # the broker's namespace: its queues are the exchange's, not another's
        wsgi = _build(api.broker)
        app.state.ops_dashboard = wsgi
    scope["root_path"] = ""  # copy_scope=True: this is the mount's own copy
    await wsgi(scope, receive, send)  # type: ignore[arg-type]

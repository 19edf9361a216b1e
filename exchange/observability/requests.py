"""The api's request middleware: request ids, ``X-Process-Time``, access lines, slow-request warnings, metrics.

For every HTTP request, one that matches no route (404) or no method of its route (405) too:

* the request id is the client's ``X-Request-ID`` when it is short and plain, else a fresh one; it is the current
  request id (:mod:`~exchange.observability.context`) while the request runs, so every log line and every
  dramatiq message of the request carries it, and it is echoed in the ``X-Request-ID`` response header;
* ``X-Process-Time`` (seconds, 6 decimals) is the time from entering the middleware to the response start;
* one access line is logged at INFO (``exchange.access``), or WARNING when slower than
  ``EXCHANGE_SLOW_REQUEST_MS`` (``slow: true``); the query string is never logged (``/ops/login?key=`` carries
  the admin key);
* ``exchange_http_requests_total`` / ``exchange_http_request_duration_seconds`` are updated with the route
  template (never the raw path: bounded label values; ``unmatched`` for a request no route handler took).

It wraps the app's ASGI handler (:func:`observe_requests`), outside the router and the app-level exception handler
that turns the router's 404/405 into responses: Litestar's ``middleware=`` only runs for a request that reached a
route handler.
"""

from __future__ import annotations

import logging
import time

from litestar import Litestar
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from exchange.observability.context import REQUEST_ID_HEADER, accept_request_id, request_id_var
from exchange.observability.metrics import HTTP_LATENCY, HTTP_REQUESTS, LabelCache

access_log = logging.getLogger("exchange.access")

QUIET_ROUTES = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})
"""Probed every few seconds by orchestrators and Prometheus: logged at DEBUG unless slow or failing."""

_REQUEST_ID_KEY = REQUEST_ID_HEADER.encode()

_requests = LabelCache(HTTP_REQUESTS)
_latency = LabelCache(HTTP_LATENCY)


def observe_requests(app: Litestar, slow_request_ms: int) -> None:
    """Wrap ``app``'s ASGI handler (the router inside the app-level exception handler) in this module's request
    observability, so that every HTTP request, routed or not, gets it."""
    inner = app.asgi_handler

    async def observed(scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope["type"]) != "http":
            await inner(scope, receive, send)
            return
        await _observe(inner, scope, receive, send, slow_request_ms)

    app.asgi_handler = observed


def scope_header(scope: Scope, name: bytes) -> str | None:
    """A request header's value straight from the ASGI scope (``name`` lower-case, as ASGI servers send names),
    without building a framework ``Headers`` object."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _route(scope: Scope) -> str:
    """The matched route's template (a mount's prefix for mounted apps), ``unmatched`` when the router matched no
    handler (404, 405): a bounded metric label. Read after the request: the router writes it into the scope."""
    template = scope.get("path_template")
    if template:
        return str(template)
    handler = scope.get("route_handler")
    paths = sorted(getattr(handler, "paths", ()) or ())
    return str(paths[0]) if paths else "unmatched"


async def _observe(app: ASGIApp, scope: Scope, receive: Receive, send: Send, slow_request_ms: int) -> None:
    started = time.perf_counter()
    request_id = accept_request_id(scope_header(scope, _REQUEST_ID_KEY))
    token = request_id_var.set(request_id)
    status = 500
    method = str(scope.get("method", "GET"))

    async def send_with_headers(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
            elapsed = time.perf_counter() - started
            headers = list(message.get("headers", []))
            headers.append((_REQUEST_ID_KEY, request_id.encode("latin-1")))
            headers.append((b"x-process-time", f"{elapsed:.6f}".encode()))
            message = {**message, "headers": headers}
        await send(message)

    try:
        await app(scope, receive, send_with_headers)
    finally:
        try:
            elapsed = time.perf_counter() - started
            route = _route(scope)
            _count(method, route, status, elapsed)
            _access_line(scope, method, route, status, round(elapsed * 1000, 2), slow_request_ms)
        finally:
            request_id_var.reset(token)


def _count(method: str, route: str, status: int, elapsed: float) -> None:
    _requests(method, route, str(status)).inc()
    _latency(method, route).observe(elapsed)


def _access_line(scope: Scope, method: str, route: str, status: int, duration_ms: float, slow_request_ms: int) -> None:
    slow = slow_request_ms > 0 and duration_ms > slow_request_ms
    if slow:
        level = logging.WARNING
    elif route in QUIET_ROUTES and status < 500:
        level = logging.DEBUG
    else:
        level = logging.INFO
    if not access_log.isEnabledFor(level):
        return  # health probes and scrapes at DEBUG: skip building the line's fields
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else str(scope.get("path", ""))
    path = path.partition("?")[0]  # some servers put the query in raw_path; it may hold a key
    extra = {"method": method, "path": path, "route": route, "status": status, "duration_ms": duration_ms}
    if slow:
        extra["slow"] = True
        access_log.warning(
            "slow request %s %s %d %.1f ms (threshold %d ms)",
            method,
            path,
            status,
            duration_ms,
            slow_request_ms,
            extra=extra,
        )
    else:
        access_log.log(level, "%s %s %d %.1f ms", method, path, status, duration_ms, extra=extra)

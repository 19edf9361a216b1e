"""The busy broker endpoints (orders, market data, account) take ``api`` and ``broker`` from the request, not from
Litestar's dependency injection, which resolves every provider on every request (14-35 us of api CPU per
request: :mod:`exchange.api.dependencies`)."""

from __future__ import annotations

from litestar import Litestar

from exchange.api.controllers.account import AccountController
from exchange.api.controllers.orders import OrdersController
from exchange.api.controllers.stocks import StocksController


def test_the_busy_broker_endpoints_resolve_no_dependencies_per_request() -> None:
    app = Litestar(route_handlers=[OrdersController, StocksController, AccountController])
    handlers = [handler for route in app.routes for handler in getattr(route, "route_handlers", ())]
    assert len(handlers) >= 11  # every order, market-data and account endpoint
    assert {handler.handler_name: handler.resolve_dependencies() for handler in handlers} == {
        handler.handler_name: {} for handler in handlers
    }

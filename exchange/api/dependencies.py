"""Dependencies shared by the controllers: ``api`` (the process's :class:`ApiState`) and ``broker``; the
query parameters of the keyset-paginated listings.

The busy broker endpoints (orders, market data, account) take neither dependency: they take the ``request`` and
call :func:`request_api` / :func:`~exchange.api.auth.current_broker`, the providers' own functions, without
Litestar's dependency injection, which resolves each provider on every request (its signature parsed, a
``msgspec.convert`` of its arguments, then the call): 14-35 us of the api worker's CPU per request (5-12 %) for
``GET /balance``, ``/book`` and ``/price`` (``ops.bench_api``, the worker's own CPU, alternating runs in two
sittings of a shared machine, every run without the injection below every run with it). The rarely called
endpoints keep them."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request
from litestar.di import NamedDependency, Provide
from litestar.params import QueryParameter

from exchange.api.auth import current_broker
from exchange.api.state import ApiState, api_state
from exchange.orders.models import BrokerIdentity


def request_api(request: Request[Any, Any, Any]) -> ApiState:
    """The process's :class:`ApiState` (the ``api`` dependency, without dependency injection)."""
    return api_state(request.app)


def provide_broker(request: Request[Any, Any, Any], api: NamedDependency[ApiState]) -> BrokerIdentity:
    """The authenticated broker. ``api`` is taken only to chain the two dependencies: Litestar resolves
    independent dependencies concurrently, in an anyio task group with a task per dependency per request, which
    cost ~7% of an api worker's CPU under load; chained, each is one plain call."""
    del api
    return current_broker(request)


API = {"api": Provide(request_api, sync_to_thread=False)}
BROKER = {"broker": Provide(provide_broker, sync_to_thread=False)}

Api = NamedDependency[ApiState]
"""Annotation of the ``api`` dependency in handlers."""
CurrentBroker = NamedDependency[BrokerIdentity]
"""Annotation of the ``broker`` dependency in handlers."""

Cursor = Annotated[str | None, QueryParameter(max_length=512)]
"""``cursor`` of a paginated listing: the previous page's ``next_cursor``."""
PageLimit = Annotated[int, QueryParameter(ge=1, le=200)]
"""``limit`` of a paginated listing."""

"""One rule for every query string: a parameter the route takes is not given twice.

Every query parameter of the api holds one value, and Litestar keeps the last of a repeated one: ``?status=open&
status=closed`` listed the closed orders only, ``DELETE /orders?symbol=A&symbol=B`` cancelled B's, and
``?limit=x&limit=1`` was a 200 where ``?limit=1&limit=x`` was a 422. A repeated parameter the route takes is
ambiguous input, so it is 422 ``validation_error`` naming it (``details.parameter``), before the handler runs
(nothing is written). A parameter the route does not take is ignored, repeated or not, as before; so a route
without query parameters (``/health``) never answers 422 for its query string.

It is the app's ``before_request`` hook; the broker controllers replace that hook with
:func:`~exchange.api.auth.broker_auth`, which calls it after authenticating (an unauthenticated request stays 401).
"""

from __future__ import annotations

from typing import Any, cast

from litestar import Request

from exchange.api.errors import ApiError

_TAKEN = "exchange.single_valued_query_parameters"
"""Key of a route handler's ``opt`` (its own dict, for the app's use) caching the query parameters it takes."""


async def refuse_repeated_query_parameters(request: Request[Any, Any, Any]) -> None:
    """Raise 422 ``validation_error`` when a query parameter the route takes occurs more than once. A coroutine
    function, though it never waits: Litestar runs a plain function hook in a worker thread."""
    if b"&" not in request.scope.get("query_string", b""):
        return  # at most one parameter (most requests: none): nothing to compare, no parse
    seen: set[str] = set()
    repeated: list[str] = []
    for name, _ in request.query_params.multi_items():  # Litestar's own parse, cached for the handler's parameters
        if name in seen:
            repeated.append(name)
        seen.add(name)
    if not repeated:
        return
    taken = _taken(request)
    for name in repeated:
        if name in taken:
            raise ApiError("validation_error", f"query parameter {name!r} is given more than once", {"parameter": name})


def _taken(request: Request[Any, Any, Any]) -> frozenset[str]:
    """The single-valued query parameters the request's route handler takes (its own or its dependencies'), as
    Litestar reads them; worked out on the first repeated parameter, then cached on the handler."""
    handler = request.route_handler
    names = handler.opt.get(_TAKEN)
    if names is None:
        # Only the path parameters' names are read (to tell them from query parameters).
        model = handler.create_kwargs_model(path_parameters=cast(Any, dict.fromkeys(request.path_params)))
        names = frozenset(p.field_alias for p in model.expected_query_params if not p.is_sequence)
        handler.opt[_TAKEN] = names
    return cast(frozenset[str], names)

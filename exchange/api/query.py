"""One rule for every query string: no parameter is given twice.

Every query parameter of the api holds one value, and Litestar keeps the last of a repeated one: ``?status=open&
status=closed`` listed the closed orders only, ``DELETE /orders?symbol=A&symbol=B`` cancelled B's, and
``?limit=x&limit=1`` was a 200 where ``?limit=1&limit=x`` was a 422. A repeated parameter is ambiguous input, so it
is 422 ``validation_error`` naming it (``details.parameter``), whether or not the route reads it, before the
handler runs (nothing is written).

It is the app's ``before_request`` hook; the broker controllers replace that hook with
:func:`~exchange.api.auth.broker_auth`, which calls it after authenticating (an unauthenticated request stays 401).
"""

from __future__ import annotations

from typing import Any

from litestar import Request

from exchange.api.errors import ApiError


async def refuse_repeated_query_parameters(request: Request[Any, Any, Any]) -> None:
    """Raise 422 ``validation_error`` when a query parameter name occurs more than once. A coroutine function, though
    it never waits: Litestar runs a plain function hook in a worker thread."""
    if b"&" not in request.scope.get("query_string", b""):
        return  # at most one parameter (most requests: none): nothing to compare, no parse
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():  # Litestar's own parse, cached for the handler's parameters
        if name in seen:
            raise ApiError("validation_error", f"query parameter {name!r} is given more than once", {"parameter": name})
        seen.add(name)

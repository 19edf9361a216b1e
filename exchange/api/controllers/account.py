"""The broker's account: ``/balance`` and ``/positions``."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get

from exchange.api.auth import broker_auth, current_broker, unauthorized_if_missing
from exchange.api.dependencies import request_api
from exchange.api.errors import BROKER_ERRORS, error_responses
from exchange.api.schemas import BalanceOut, PositionOut, to_wire
from exchange.db.engines import single_statement
from exchange.orders import queries


class AccountController(Controller):
    path = "/"
    before_request = staticmethod(broker_auth)

    @get("/balance", responses=error_responses(*BROKER_ERRORS))
    async def balance(self, request: Request[Any, Any, Any]) -> BalanceOut:
        """Net cash from trades in cents (sales minus purchases)."""
        async with single_statement(request_api(request).pool) as conn:
            view = unauthorized_if_missing(await queries.balance(conn, current_broker(request).id))
        return to_wire(view, BalanceOut)

    @get("/positions", responses=error_responses(*BROKER_ERRORS))
    async def positions(self, request: Request[Any, Any, Any]) -> list[PositionOut]:
        """Net shares per symbol (negative = net seller); symbols netting to zero are omitted."""
        async with single_statement(request_api(request).pool) as conn:
            rows = await queries.positions(conn, current_broker(request).id)
        return [to_wire(p, PositionOut) for p in rows]

"""Admin endpoints (``EXCHANGE_ADMIN_API_KEY``): ``/register`` and the debug helpers."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Controller, Request, Response, get, post

from exchange.api.auth import admin_guard
from exchange.api.bodies import JsonBody
from exchange.api.dependencies import API, Api
from exchange.api.errors import ADMIN_ERRORS, BODY_ERRORS, ApiError, error_responses
from exchange.api.schemas import RegisterRequest, RegisterResponse, ResetOut, TradeCountOut, to_wire
from exchange.db.engines import single_statement
from exchange.messaging.wakeups import wake_key_pattern
from exchange.orders import brokers, maintenance, queries

log = logging.getLogger("exchange.api")

REGISTER_BODY = JsonBody(RegisterRequest)


class AdminController(Controller):
    path = "/"
    guards = [admin_guard]  # noqa: RUF012
    dependencies = API

    @post(
        "/register",
        status_code=201,
        responses=error_responses(*ADMIN_ERRORS, *BODY_ERRORS, "invalid_webhook_url"),
        operation_class=REGISTER_BODY.operation_class,
    )
    async def register(self, request: Request[Any, Any, Any], api: Api) -> Response[RegisterResponse]:
        """Create a broker. The API key is in this response only (stored as its SHA-256)."""
        body = await REGISTER_BODY.read(request)
        created = await brokers.register_broker(
            api.pool, body.name, body.webhook_url, allow_private_webhooks=api.settings.webhook_allow_private
        )
        return Response(to_wire(created, RegisterResponse), status_code=201, headers={"Cache-Control": "no-store"})

    @get("/debug/trade-count", responses=error_responses(*ADMIN_ERRORS))
    async def trade_count(self, api: Api) -> TradeCountOut:
        async with single_statement(api.pool) as conn:
            return TradeCountOut(trade_count=await queries.trade_count(conn))

    @post("/debug/reset", status_code=200, responses=error_responses(*ADMIN_ERRORS, "not_found"))
    async def reset(self, api: Api) -> ResetOut:
        """Delete every row of every data table and the exchange's wake-up keys in Redis (nothing else there, and
        no other exchange's).
        404 unless ``EXCHANGE_DEBUG_ENDPOINTS=true``."""
        if not api.settings.debug_endpoints:
            raise ApiError("not_found", "no such resource")
        await maintenance.reset_all_data(api.pool)
        api.keys.clear()
        try:
            pattern = wake_key_pattern(await api.names.get())  # this exchange's keys only
            keys = [k async for k in api.redis.scan_iter(match=pattern, count=1000)]
            if keys:
                await api.redis.delete(*keys)
        except Exception as exc:  # the wake keys expire by themselves within a second
            log.warning("reset: could not clear wake-up keys: %s", exc)
        return ResetOut(reset=True)

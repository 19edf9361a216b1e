"""Market data for brokers: ``/stocks/{symbol}/book``, ``/price``, ``/trades``."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.params import FromPath, QueryParameter

from exchange.api.auth import broker_auth
from exchange.api.dependencies import request_api
from exchange.api.errors import BROKER_ERRORS, error_responses
from exchange.api.schemas import BookOut, PriceOut, PublicTradeOut, TradesOut, to_wire
from exchange.db.engines import single_statement
from exchange.orders import queries
from exchange.orders.accept import normalize_symbol
from exchange.orders.errors import NoTradesError


class StocksController(Controller):
    path = "/stocks/{symbol:str}"
    before_request = staticmethod(broker_auth)

    @get("/book", responses=error_responses(*BROKER_ERRORS, "validation_error"))
    async def book(
        self,
        request: Request[Any, Any, Any],
        symbol: FromPath[str],
        depth: Annotated[int, QueryParameter(ge=1, le=50)] = 10,
    ) -> BookOut:
        """Aggregated open levels: asks ascending, bids descending, ``depth`` levels per side."""
        sym = normalize_symbol(symbol)
        async with single_statement(request_api(request).pool) as conn:
            return to_wire(await queries.book(conn, sym, depth), BookOut)

    @get("/price", responses=error_responses(*BROKER_ERRORS, "validation_error", "no_trades"))
    async def price(
        self,
        request: Request[Any, Any, Any],
        symbol: FromPath[str],
        trades: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    ) -> PriceOut:
        """Last trade price and the simple average of the last ``trades`` trade prices (integer cents, halves
        rounded up). 404 ``no_trades`` before the first trade."""
        sym = normalize_symbol(symbol)
        async with single_statement(request_api(request).pool) as conn:
            view = await queries.price(conn, sym, trades)
        if view is None:
            raise NoTradesError(f"no trades yet for {sym}", {"symbol": sym})
        return to_wire(view, PriceOut)

    @get("/trades", responses=error_responses(*BROKER_ERRORS, "validation_error"))
    async def trades(
        self,
        request: Request[Any, Any, Any],
        symbol: FromPath[str],
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    ) -> TradesOut:
        """Recent trades of the symbol, newest first (public tape: no broker or order ids)."""
        sym = normalize_symbol(symbol)
        async with single_statement(request_api(request).pool) as conn:
            rows = await queries.recent_trades(conn, sym, limit)
        return TradesOut(symbol=sym, trades=[to_wire(t, PublicTradeOut) for t in rows])

"""Broker order endpoints: ``/orders`` (place, list, cancel all), ``/orders/{id}`` (get, amend, cancel)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, QueryParameter

from exchange.api import services
from exchange.api.auth import broker_auth, current_broker
from exchange.api.bodies import JsonBody
from exchange.api.dependencies import Cursor, PageLimit, request_api
from exchange.api.errors import BODY_ERRORS, BROKER_ERRORS, error_responses
from exchange.api.schemas import (
    AmendOrderRequest,
    CancelAllOut,
    OrderOut,
    OrderPageOut,
    PlaceOrderRequest,
    order_out,
    order_page_out,
)
from exchange.db.engines import single_statement
from exchange.db.tables import OrderStatus
from exchange.engine.types import OrderType, StpMode, TimeInForce
from exchange.observability.metrics import ORDERS_ACCEPTED, LabelCache
from exchange.orders import accept, queries
from exchange.orders.errors import OrderNotFoundError
from exchange.orders.models import NewOrder

IdempotencyKey = Annotated[
    str | None, HeaderParameter(name="Idempotency-Key", min_length=1, max_length=255, required=False)
]
SymbolQuery = Annotated[str, QueryParameter(min_length=1, max_length=10)]
OptionalSymbolQuery = Annotated[str | None, QueryParameter(min_length=1, max_length=10)]

_accepted = LabelCache(ORDERS_ACCEPTED)
PLACE_ORDER_BODY = JsonBody(PlaceOrderRequest)
AMEND_ORDER_BODY = JsonBody(AmendOrderRequest)


def parse_order_id(raw: str) -> uuid.UUID:
    """A malformed id is just an order this broker does not have: 404, like another broker's order."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise OrderNotFoundError() from None


def wants_representation(request: Request[Any, Any, Any]) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().lower() == "return=representation" for p in prefer.split(","))


PLACE_ORDER_DESCRIPTION = (
    "Places an order; 201 with its state after matching (`pending` if the matcher did not answer in time). "
    "`valid_until` (in the future, with a UTC offset; answered in UTC): no order trades at or after it (a retry "
    "of an order accepted before it, by its `client_order_id`/`Idempotency-Key`, returns that order). Without "
    "`time_in_force` it makes a limit order `gtd`; `gtc` refuses it; an `ioc` or `fok` order (limit or market; a "
    "market order is `ioc` by default) keeps it too: it never rests, but if the matcher reaches it at or after its "
    "`valid_until` it closes `expired` without trading."
)


class OrdersController(Controller):
    path = "/orders"
    before_request = staticmethod(broker_auth)  # Litestar reads this class attribute

    @post(
        "/",
        status_code=201,
        description=PLACE_ORDER_DESCRIPTION,
        responses=error_responses(*BROKER_ERRORS, *BODY_ERRORS, "idempotency_key_reused"),
        operation_class=PLACE_ORDER_BODY.operation_class,
    )
    async def place_order(self, request: Request[Any, Any, Any], idempotency_key: IdempotencyKey) -> Response[OrderOut]:
        """Place an order. 201 with its state after matching (``pending`` if the matcher did not answer within
        ``EXCHANGE_ORDER_WAIT_MS``). A repeated ``client_order_id``/``Idempotency-Key`` also answers 201, with
        the original order and the header ``Idempotent-Replayed: true``; nothing new is written. ``valid_until``:
        see :data:`PLACE_ORDER_DESCRIPTION` (the operation's description in the OpenAPI schema)."""
        api, broker = request_api(request), current_broker(request)
        body = await PLACE_ORDER_BODY.read(request)

        def build(now: datetime | None) -> NewOrder:
            return accept.new_order(
                order_id=uuid.uuid4(),
                broker_id=broker.id,
                document_number=body.document_number,
                symbol=body.symbol,
                side=body.side,
                order_type=OrderType(body.order_type),
                price=body.price,
                quantity=body.quantity,
                valid_until=body.valid_until,
                time_in_force=None if body.time_in_force is None else TimeInForce(body.time_in_force),
                stp=StpMode(body.stp),
                client_order_id=body.client_order_id,
                idempotency_key=idempotency_key,
                now=now,
            )

        view, created = await services.place_request(api, build)
        if created:
            _accepted(body.order_type, body.side).inc()
        headers = {} if created else {"Idempotent-Replayed": "true"}
        return Response(order_out(view), status_code=201, headers=headers)

    @get("/", responses=error_responses(*BROKER_ERRORS, "validation_error"))
    async def list_orders(
        self,
        request: Request[Any, Any, Any],
        symbol: OptionalSymbolQuery = None,
        status: Annotated[OrderStatus | None, QueryParameter()] = None,
        cursor: Cursor = None,
        limit: PageLimit = 50,
    ) -> OrderPageOut:
        """The broker's orders, newest first, without trades; pass ``next_cursor`` back as ``cursor``."""
        sym = None if symbol is None else accept.normalize_symbol(symbol)
        async with single_statement(request_api(request).pool) as conn:
            page = await queries.list_orders(
                conn, current_broker(request).id, symbol=sym, status=status, cursor=cursor, limit=limit
            )
        return order_page_out(page)

    @delete("/", status_code=200, responses=error_responses(*BROKER_ERRORS, "validation_error"))
    async def cancel_all(self, request: Request[Any, Any, Any], symbol: SymbolQuery) -> CancelAllOut:
        """Cancel every open or pending order of the broker in ``symbol``; ``cancelled`` counts the cancel
        commands written (orders already closed or already being cancelled are not counted)."""
        result = await services.cancel_all(request_api(request), current_broker(request).id, symbol)
        return CancelAllOut(symbol=result.symbol, cancelled=len(result.order_ids))

    @get("/{order_id:str}", responses=error_responses(*BROKER_ERRORS, "order_not_found"))
    async def get_order(self, request: Request[Any, Any, Any], order_id: FromPath[str]) -> OrderOut:
        api, broker = request_api(request), current_broker(request)
        return order_out(await services.read_order(api, broker.id, parse_order_id(order_id)))

    @patch(
        "/{order_id:str}",
        responses=error_responses(*BROKER_ERRORS, *BODY_ERRORS, "order_not_found", "order_closed", "amend_rejected"),
        operation_class=AMEND_ORDER_BODY.operation_class,
    )
    async def amend_order(self, request: Request[Any, Any, Any], order_id: FromPath[str]) -> OrderOut:
        """Amend quantity (the new total, filled shares included) and/or price; 200 with the order after the
        matcher applied the amend (or as it is when the wait ends, the amend still pending); 409
        ``amend_rejected`` or ``order_closed`` if the matcher refused it (the order unchanged)."""
        api, broker = request_api(request), current_broker(request)
        oid = parse_order_id(order_id)
        body = await AMEND_ORDER_BODY.read(request)
        return order_out(await services.amend(api, broker.id, oid, body.quantity, body.price))

    @post(
        "/{order_id:str}/cancel",
        status_code=200,
        responses={
            204: ResponseSpec(None, description="the cancel is written (without `Prefer: return=representation`)"),
            **error_responses(*BROKER_ERRORS, "order_not_found"),
        },
    )
    async def cancel_order(self, request: Request[Any, Any, Any], order_id: FromPath[str]) -> Response[Any]:
        """204; idempotent (no-op on a closed order or one already being cancelled). With
        ``Prefer: return=representation``: 200 with the order after the matcher applied the cancel."""
        api, broker = request_api(request), current_broker(request)
        wait = wants_representation(request)
        view = await services.cancel(api, broker.id, parse_order_id(order_id), wait=wait)
        if view is None:
            return Response(None, status_code=204)
        return Response(order_out(view), status_code=200, headers={"Preference-Applied": "return=representation"})

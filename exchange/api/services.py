"""The api's side of the order flow: write the command (one transaction), wake the symbol's matcher, wait for
the result (bounded), read the order back.

Order of steps for every command (DESIGN §3): register the waiter BEFORE the transaction (a result published
any time after the commit is seen), commit, wake the partition (coalesced), wait up to
``settings.order_wait_ms``, read. A failed wake-up (Redis down) is logged and ignored: the command is durable and
the sweeper re-nudges symbols with old unprocessed commands.
"""

from __future__ import annotations

import logging
from uuid import UUID

from exchange.api.state import ApiState
from exchange.messaging.wakeups import wake_async
from exchange.orders import accept, queries
from exchange.orders.errors import OrderNotFoundError
from exchange.orders.models import NewOrder, OrderView

log = logging.getLogger("exchange.api")


async def wake(state: ApiState, symbol: str) -> None:
    try:
        await wake_async(state.redis, state.broker, symbol, state.settings.partitions)
    except Exception as exc:
        log.warning("wake-up of %s failed (%s); the sweeper will re-nudge it", symbol, exc)


async def read_order(state: ApiState, broker_id: UUID, order_id: UUID) -> OrderView:
    async with state.engine.connect() as conn:
        view = await queries.get_order(conn, broker_id, order_id)
    if view is None:
        raise OrderNotFoundError()
    return view


def _wait_s(state: ApiState) -> float:
    return state.settings.order_wait_ms / 1000


async def place(state: ApiState, order: NewOrder) -> tuple[OrderView, bool]:
    """Accept ``order``; returns its view (after matching, or ``pending`` on timeout) and whether it is new
    (False: a duplicate ``client_order_id``/``Idempotency-Key`` returned the original order)."""
    future = state.waiter.register(order.order_id)
    try:
        result = await accept.place_order(state.engine, order)
    except BaseException:
        state.waiter.discard(order.order_id, future)
        raise
    if not result.created:
        state.waiter.discard(order.order_id, future)
        return await read_order(state, order.broker_id, result.order_id), False
    await wake(state, order.symbol)
    await state.waiter.wait(order.order_id, future, _wait_s(state))
    return await read_order(state, order.broker_id, order.order_id), True


async def cancel(state: ApiState, broker_id: UUID, order_id: UUID, *, wait: bool) -> OrderView | None:
    """Cancel the broker's own order (no-op when closed or a cancel is already pending). With ``wait``, wait for
    the matcher like :func:`place` and return the order's view."""
    future = state.waiter.register(order_id) if wait else None
    try:
        result = await accept.cancel_order(state.engine, broker_id, order_id)
        if result.written:
            await wake(state, result.symbol)
            if future is not None:
                await state.waiter.wait(order_id, future, _wait_s(state))
    finally:
        if future is not None:
            state.waiter.discard(order_id, future)
    return await read_order(state, broker_id, order_id) if wait else None


async def cancel_all(state: ApiState, broker_id: UUID, symbol: str) -> accept.CancelAllResult:
    result = await accept.cancel_all(state.engine, broker_id, symbol)
    if result.order_ids:
        await wake(state, result.symbol)
    return result


async def amend(state: ApiState, broker_id: UUID, order_id: UUID, quantity: int | None, price: int | None) -> OrderView:
    future = state.waiter.register(order_id)
    try:
        result = await accept.amend_order(state.engine, broker_id, order_id, quantity, price)
        await wake(state, result.symbol)
        await state.waiter.wait(order_id, future, _wait_s(state))
    finally:
        state.waiter.discard(order_id, future)
    return await read_order(state, broker_id, order_id)

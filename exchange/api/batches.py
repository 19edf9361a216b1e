"""The api's group-commit batches (run by :class:`~exchange.api.coalescing.Coalescer`): accepting orders,
cancelling orders and reading orders back, each one transaction or one query for every request that arrived
together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from uuid import UUID

from exchange.db.engines import AsyncPool, single_statement
from exchange.messaging.broker import AsyncEnqueuer
from exchange.messaging.wakeups import wake_async
from exchange.orders import accept, queries
from exchange.orders.errors import OrderNotFoundError
from exchange.orders.models import CommandResult, NewOrder, OrderView, PlaceResult

log = logging.getLogger("exchange.api")

OrderKey = tuple[UUID, UUID]
"""``(broker_id, order_id)``: an order is only ever read for its own broker."""


async def wake(enqueuer: AsyncEnqueuer, symbols: Iterable[str], partitions: int) -> None:
    """Wake the symbols' matchers (coalesced). A failure (Redis down) is logged and ignored: the commands are
    durable and the sweeper re-nudges symbols with old unprocessed commands."""
    try:
        await wake_async(enqueuer, symbols, partitions)
    except Exception as exc:
        log.warning("wake-up failed (%s); the sweeper will re-nudge", exc)


_waking: set[asyncio.Task[None]] = set()
"""Wake-ups in flight (a reference per task, so none is garbage-collected before it ends)."""


def wake_soon(enqueuer: AsyncEnqueuer, symbols: Sequence[str], partitions: int) -> None:
    """:func:`wake` in its own task: a batch's requests get their outcomes (and its group-commit slot is free)
    without waiting for Redis, so a stalled Redis delays matching, never the answers to committed requests."""
    if not symbols:
        return
    task = asyncio.get_running_loop().create_task(wake(enqueuer, symbols, partitions))
    _waking.add(task)
    task.add_done_callback(_waking.discard)


async def accept_orders(
    pool: AsyncPool, enqueuer: AsyncEnqueuer, partitions: int, orders: Sequence[NewOrder]
) -> list[PlaceResult | Exception]:
    """Commit the orders together, then wake each symbol with a new order once."""
    outcomes = await accept.place_orders(pool, orders)
    created = [o.symbol for o, r in zip(orders, outcomes, strict=True) if isinstance(r, PlaceResult) and r.created]
    wake_soon(enqueuer, created, partitions)
    return outcomes


async def cancel_orders(
    pool: AsyncPool, enqueuer: AsyncEnqueuer, partitions: int, keys: Sequence[OrderKey]
) -> list[CommandResult | OrderNotFoundError]:
    """Commit the cancel commands together, then wake each symbol with a new command once."""
    outcomes = await accept.cancel_orders(pool, keys)
    written = [r.symbol for r in outcomes if isinstance(r, CommandResult) and r.written]
    wake_soon(enqueuer, written, partitions)
    return outcomes


async def read_orders(pool: AsyncPool, keys: Sequence[OrderKey]) -> list[OrderView | None]:
    """The orders' views from one query and one snapshot (taken after every key was submitted)."""
    async with single_statement(pool) as conn:
        views = await queries.get_orders(conn, keys)
    return [views.get(key) for key in keys]

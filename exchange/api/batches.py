"""The api's group-commit batches (run by :class:`~exchange.api.coalescing.Coalescer`): accepting orders,
cancelling orders and reading orders back, each one transaction or one query for every request that arrived
together."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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


@dataclass
class _Waking:
    """One enqueuer's wake-ups: the symbols not sent yet, and the one task sending them."""

    symbols: set[str] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


_waking: weakref.WeakKeyDictionary[AsyncEnqueuer, _Waking] = weakref.WeakKeyDictionary()


def wake_soon(enqueuer: AsyncEnqueuer, symbols: Sequence[str], partitions: int) -> None:
    """:func:`wake` in a task of its own: a batch's requests get their outcomes (and its group-commit slot is free)
    without waiting for Redis, so a stalled Redis delays matching, never the answers to committed requests.

    One such task per enqueuer at a time: symbols woken while it sends are merged into its next send. A wake-up is
    a write Redis does not answer, so they rarely meet; but while Redis stalls (each connect attempt waits out its
    timeout) a task per batch piled up without bound, and now only the set of symbols waits (bounded by the
    symbols that exist), sent as one wake-up when Redis is back."""
    if not symbols:
        return
    waking = _waking.get(enqueuer)
    if waking is None:
        waking = _waking[enqueuer] = _Waking()
    waking.symbols.update(symbols)
    if waking.task is None:
        waking.task = asyncio.get_running_loop().create_task(_send_woken(enqueuer, waking, partitions))


async def _send_woken(enqueuer: AsyncEnqueuer, waking: _Waking, partitions: int) -> None:
    try:
        while waking.symbols:
            symbols, waking.symbols = sorted(waking.symbols), set()
            await wake(enqueuer, symbols, partitions)
    finally:
        waking.task = None


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

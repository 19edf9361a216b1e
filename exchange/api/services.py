"""The api's side of the order flow: write the command (one transaction), wake the symbol's matcher, wait for
the result (bounded), answer with the order's state.

Order of steps for every command (DESIGN §3): register the waiter BEFORE the transaction (a result published
any time after the commit is seen), commit, wake the partition (coalesced), wait up to
``settings.order_wait_ms``, then read the order back, unless the result carried the state of the new order it
placed (:class:`~exchange.messaging.results.PlacedState`, the order as committed: no query) or a new order's wait
expired (the order as the api wrote it, ``pending``: no query either). A failed wake-up
(Redis down) is logged and ignored: the command is durable and the sweeper re-nudges symbols with old unprocessed
commands.

New orders and read-backs go through the process's coalescers (:mod:`exchange.api.coalescing`): requests that
arrive together share one transaction / one query; each still gets only its own outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from uuid import UUID

from exchange.api import batches
from exchange.api.state import ApiState
from exchange.db.tables import OrderStatus
from exchange.messaging.results import PlacedState
from exchange.orders import accept
from exchange.orders.errors import InvalidOrderError, OrderNotFoundError, ValidUntilPassedError
from exchange.orders.models import NewOrder, OrderView, TradeView
from exchange.times import from_micros, to_micros


def wake_soon(state: ApiState, symbol: str) -> None:
    """Wake ``symbol``'s matcher without waiting for Redis (:func:`batches.wake_soon`): a stalled Redis delays the
    matching of a committed command, never the answer to it."""
    batches.wake_soon(state.enqueuer, [symbol], state.settings.partitions)


async def read_order(state: ApiState, broker_id: UUID, order_id: UUID) -> OrderView:
    view = await state.reads.submit((broker_id, order_id))
    if view is None:
        raise OrderNotFoundError()
    return view


async def place_request(state: ApiState, build: Callable[[datetime | None], NewOrder]) -> tuple[OrderView, bool]:
    """Place the order ``build(now)`` makes (:func:`place`); returns its view and whether it is new.

    ``build`` validates against ``now`` (None: every rule but "``valid_until`` is in the future"). A request whose
    ``valid_until`` has passed is refused as a new order, but when it repeats the ``client_order_id`` or
    ``Idempotency-Key`` of an order accepted before its deadline (the client's retry of a lost answer), it is
    answered with that order (:func:`exchange.orders.accept.find_original`), as every other retry is: the order may
    have traded, and "valid_until must be in the future" would say it never existed."""
    try:
        order = build(datetime.now(UTC))
    except ValidUntilPassedError as passed:
        try:
            retry = build(None)
        except InvalidOrderError:
            raise passed from None  # another rule broken too: the deadline's error, as for any request
        original = await accept.find_original(state.pool, retry)
        if original is None:
            raise
        return await read_order(state, retry.broker_id, original), False
    return await place(state, order)


def _wait_s(state: ApiState) -> float:
    return state.settings.order_wait_ms / 1000


@contextlib.contextmanager
def _registered(state: ApiState, order_id: UUID) -> Iterator[asyncio.Future[PlacedState | None]]:
    """Register for ``order_id``'s result (before the command's transaction); always deregistered on exit."""
    future = state.waiter.register(order_id)
    try:
        yield future
    finally:
        state.waiter.discard(order_id, future)


async def _commit_and_wait(
    state: ApiState,
    broker_id: UUID,
    order_id: UUID,
    commit: Callable[[], Awaitable[bool]],
    settled: Callable[[], Awaitable[OrderView | None]],
    waited_out: Callable[[], Awaitable[OrderView]] | None = None,
) -> OrderView:
    """Register for ``order_id``'s results, run ``commit`` (writes a cancel/amend command and wakes its symbol;
    False if it wrote none), then answer with ``settled()``: the order once the command took effect (None until
    then), or the order as it is when the wait ends. A result names every order its transaction changed: one may come
    from another command (a crossing order that filled this one) before this command was applied, so each is checked
    and the next one awaited, with a new registration made before the check (a result published after it is not
    missed). Without a command written it is checked at once, and awaited as well if not yet settled (another
    request's cancel is pending). When the wait ends, the answer is ``waited_out()`` (default: the order as it is)."""
    future = state.waiter.register(order_id)
    try:
        written = await commit()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _wait_s(state)  # from the commit: a slow group commit does not shorten the wait
        if not written and (view := await settled()) is not None:
            return view
        while True:
            left = deadline - loop.time()
            if left <= 0 or not await state.waiter.wait(order_id, future, left):
                return await (waited_out() if waited_out else read_order(state, broker_id, order_id))
            future = state.waiter.register(order_id)
            if (view := await settled()) is not None:
                return view
    finally:
        state.waiter.discard(order_id, future)


async def place(state: ApiState, order: NewOrder) -> tuple[OrderView, bool]:
    """Accept ``order``; returns its view (after matching, or ``pending`` on timeout) and whether it is new
    (False: a duplicate ``client_order_id``/``Idempotency-Key`` returned the original order). A new order's view
    comes from the matcher's published state when it arrives with one, from what the api wrote when the wait
    expires (the order as committed: ``pending``), else from a read.

    No read on a timeout: waits expire when the matcher is behind, and a read per late order (thousands in a few
    seconds of an overloaded ``--scale 100`` run) added work to the database just when it had none to spare."""
    with _registered(state, order.order_id) as future:
        result = await state.accepts.submit(order)  # committed when this returns; the wake-up is on its way
        if result.created and result.created_at is not None:
            if not await state.waiter.wait(order.order_id, future, _wait_s(state)):
                return _placed_view(order, result.created_at, _as_written(order, result.created_at)), True
            placed = future.result()
            if placed is not None:
                return _placed_view(order, result.created_at, placed), True
    return await read_order(state, order.broker_id, result.order_id), result.created


def _as_written(order: NewOrder, created_at: datetime) -> PlacedState:
    """The state the api's accept transaction committed a new order in (``pending``, nothing changed yet)."""
    return PlacedState(
        order_id=order.order_id,
        status=OrderStatus.PENDING.value,
        close_reason=None,
        remaining=None,
        price=None,
        quantity=None,
        updated_us=to_micros(created_at),  # orders.updated_at defaults to the same now() as created_at
        trades=[],
    )


def _placed_view(order: NewOrder, created_at: datetime, placed: PlacedState) -> OrderView:
    """The view :func:`exchange.orders.queries.get_orders` would read of a new order right after the matcher's
    transaction that placed it: what the api wrote, with the columns that transaction wrote over it (a ``None``
    kept the written value, as in its ``UPDATE``) and its trades."""
    return OrderView(
        id=order.order_id,
        side=order.side,
        order_type=order.order_type,
        time_in_force=order.time_in_force,
        symbol=order.symbol,
        price=order.price if placed.price is None else placed.price,
        quantity=order.quantity if placed.quantity is None else placed.quantity,
        remaining_quantity=order.quantity if placed.remaining is None else placed.remaining,
        status=placed.status,
        close_reason=placed.close_reason,
        valid_until=order.valid_until,  # in UTC already (accept.resolve_time_in_force)
        created_at=created_at.astimezone(UTC),
        updated_at=from_micros(placed.updated_us),
        client_order_id=order.client_order_id,
        document_number=order.document_number,
        stp=order.stp,
        trades=[
            TradeView(t.trade_id, t.price, t.quantity, t.counterparty_broker, from_micros(t.executed_us))
            for t in placed.trades
        ],
    )


async def cancel(state: ApiState, broker_id: UUID, order_id: UUID, *, wait: bool) -> OrderView | None:
    """Cancel the broker's own order (no-op when closed or a cancel is already pending). With ``wait``, wait for
    the matcher like :func:`place` and return the order's view."""

    async def commit() -> bool:
        return (await state.cancels.submit((broker_id, order_id))).written

    async def closed() -> OrderView | None:
        view = await read_order(state, broker_id, order_id)
        return view if view.status == OrderStatus.CLOSED.value else None  # a processed cancel closes its order

    if wait:
        return await _commit_and_wait(state, broker_id, order_id, commit, closed)
    await commit()
    return None


async def cancel_all(state: ApiState, broker_id: UUID, symbol: str) -> accept.CancelAllResult:
    """Cancel every live order of the broker in ``symbol``, chunk by chunk (:func:`accept.cancel_all`), waking the
    symbol's matcher after each chunk that wrote a cancel: the first chunks' orders close while the rest are
    written, and a cancel-all cut short has woken the matcher for what it committed."""
    return await accept.cancel_all(state.pool, broker_id, symbol, on_written=lambda written: wake_soon(state, written))


async def amend(state: ApiState, broker_id: UUID, order_id: UUID, quantity: int | None, price: int | None) -> OrderView:
    seqs: list[int] = []

    async def commit() -> bool:
        result = await accept.amend_order(state.pool, broker_id, order_id, quantity, price)
        if result.seq is not None:
            seqs.append(result.seq)
        if result.written:
            wake_soon(state, result.symbol)
        return result.written

    async def processed() -> OrderView | None:
        # The command first, the order after: an order read before the amend's commit shows it unamended.
        if seqs:
            outcome = await accept.command_outcome(state.pool, seqs[0])
            if not outcome.processed:
                return None
            if outcome.rejected_reason is not None:  # refused: an error, not the unchanged order as if amended
                raise accept.refused_amend(order_id, outcome.rejected_reason)
        return await read_order(state, broker_id, order_id)

    async def waited_out() -> OrderView:
        # The matcher may have refused the amend without its result reaching this request (published after the
        # wait, or lost): the command says so, and a refusal is answered as one, not as the order left unchanged.
        return await processed() or await read_order(state, broker_id, order_id)

    return await _commit_and_wait(state, broker_id, order_id, commit, processed, waited_out)

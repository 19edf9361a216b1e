"""A new order's 201 is built from the matcher's published state (exchange.api.services._placed_view); it must be
the view a read returns right after the matcher's commit, whatever the batch held.

Random batches on two symbols per transaction: limit and market orders, every time in force and self-trade
prevention mode, several trades per order, orders placed and then traded as makers in the same batch, and amends
and cancels of pending and resting orders riding along. Each round accepts its orders the api's way (one group
commit), writes the amends and cancels, runs one matcher transaction, and compares every placed order's view from
its published state with the read.
"""

from __future__ import annotations

import contextlib
import random
import uuid

import pytest
from sqlalchemy import Engine

from exchange.api.services import _placed_view
from exchange.db.engines import AsyncPool, single_statement
from exchange.matching.service import BookCache, process_symbols
from exchange.orders import accept, queries
from exchange.orders.errors import OrderClosedError
from exchange.orders.models import NewOrder, PlaceResult
from tests.integration.sql_orders import add_broker

STP_MODES = ("none", "cancel_newest", "cancel_oldest", "cancel_both", "decrement")


def random_order(rnd: random.Random, brokers: list[uuid.UUID], symbols: list[str]) -> NewOrder:
    market = rnd.random() < 0.15
    return NewOrder(
        order_id=uuid.uuid4(),
        broker_id=rnd.choice(brokers),
        document_number=rnd.choice(["1", "2"]),
        symbol=rnd.choice(symbols),
        side=rnd.choice(["bid", "ask"]),
        order_type="market" if market else "limit",
        time_in_force=rnd.choice(["ioc", "fok"] if market else ["gtc", "gtc", "gtc", "ioc", "fok"]),
        price=None if market else rnd.randint(97, 103),
        quantity=rnd.randint(1, 10),
        valid_until=None,
        stp=rnd.choice(STP_MODES),
    )


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(3))
async def test_every_placed_orders_published_state_gives_the_view_read_back(
    engine: Engine, api_pool: AsyncPool, seed: int
) -> None:
    rnd = random.Random(seed)
    brokers = [add_broker(engine, f"broker {n}") for n in range(3)]
    symbols = [f"PS{seed}A", f"PS{seed}B"]
    cache = BookCache()
    earlier: list[NewOrder] = []
    compared = traded = 0
    for _ in range(25):
        orders = [random_order(rnd, brokers, symbols) for _ in range(rnd.randint(1, 12))]
        outcomes = await accept.place_orders(api_pool, orders)
        created = {o.order_id: r for o, r in zip(orders, outcomes, strict=True) if isinstance(r, PlaceResult)}
        assert len(created) == len(orders)
        for order in rnd.sample(orders + earlier, k=min(3, len(orders) + len(earlier))):
            if rnd.random() < 0.5:
                price = None if order.price is None else rnd.randint(97, 103)
                with contextlib.suppress(OrderClosedError):  # an order closed by an earlier round
                    await accept.amend_order(api_pool, order.broker_id, order.order_id, rnd.randint(1, 10), price)
            else:
                await accept.cancel_orders(api_pool, [(order.broker_id, order.order_id)])
        earlier += [o for o in orders if o.order_type == "limit"]

        states = {s.order_id: s for result in process_symbols(engine, cache, symbols) for s in result.placed}
        assert states.keys() == {o.order_id for o in orders}  # every placed order gets its state
        async with single_statement(api_pool) as conn:
            read = await queries.get_orders(conn, [(o.broker_id, o.order_id) for o in orders])
        for order in orders:
            created_at = created[order.order_id].created_at
            assert created_at is not None
            view = _placed_view(order, created_at, states[order.order_id])
            assert view == read[(order.broker_id, order.order_id)]
            compared += 1
            traded += bool(view.trades)
    assert compared > 100
    assert traded > 20  # the random book really trades

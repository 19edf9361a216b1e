"""What the api's book and price reads (alembic 0007's ``book_levels`` and ``recent_prices``) return for books and
tapes built by the real matcher: levels aggregated per price, best first, ``depth`` per side, resting orders past
their ``valid_until`` hidden; prices newest first."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from exchange.db.engines import AsyncPool, single_statement
from exchange.matching.service import BookCache, process_symbol
from exchange.orders import queries
from exchange.orders.models import BookLevel
from tests.integration.sql_orders import add_broker, place


@pytest.mark.anyio
async def test_book_levels_are_summed_per_price_best_first_limited_to_depth_and_hide_expired_resting_orders(
    engine: Engine, api_pool: AsyncPool
) -> None:
    b = add_broker(engine, "b")
    for side, quantity, price in (("bid", 3, 99), ("bid", 4, 99), ("bid", 1, 98), ("bid", 2, 97), ("ask", 5, 101)):
        place(engine, b, "BOOK3", side, quantity, price)
    expiring = place(engine, b, "BOOK3", "ask", 7, 102, valid_until=datetime.now(UTC) + timedelta(hours=1))
    process_symbol(engine, BookCache(), "BOOK3")
    with engine.begin() as conn:  # past its valid_until, not yet closed by the sweeper: it never trades
        conn.execute(
            text("UPDATE orders SET valid_until = now() - interval '1 second' WHERE id = :id"), {"id": expiring}
        )

    async with single_statement(api_pool) as conn:
        view = await queries.book(conn, "BOOK3", 2)

    assert view.bids == [BookLevel(99, 7, 2), BookLevel(98, 1, 1)]
    assert view.asks == [BookLevel(101, 5, 1)]


@pytest.mark.anyio
async def test_recent_prices_are_the_newest_trades_first_and_their_rounded_average(
    engine: Engine, api_pool: AsyncPool
) -> None:
    seller, buyer = add_broker(engine, "s"), add_broker(engine, "b")
    for price in (100, 103, 104):  # three trades, oldest first, each in its own matcher transaction
        place(engine, seller, "TAPE3", "ask", 1, price)
        place(engine, buyer, "TAPE3", "bid", 1, price)
        process_symbol(engine, BookCache(), "TAPE3")

    async with single_statement(api_pool) as conn:
        last_two = await queries.price(conn, "TAPE3", 2)
        nothing = await queries.price(conn, "NONE3", 50)

    assert last_two is not None
    assert (last_two.last_price, last_two.average_price, last_two.trades_in_average) == (
        104,
        104,
        2,
    )  # (103 + 104) / 2 = 103.5 → 104
    assert nothing is None

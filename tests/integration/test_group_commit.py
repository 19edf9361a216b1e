"""Group commit on the accept path: a group of concurrent orders is one transaction, yet every order keeps its
own outcome (created, duplicate of an original, or its own error) and its own sequence number."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from sqlalchemy import Engine, text

from exchange.api.app import create_app
from exchange.config import Settings
from exchange.db.engines import AsyncPool, single_statement
from exchange.matching.service import BookCache, process_symbol
from exchange.orders import accept, queries
from exchange.orders.errors import OrderNotFoundError
from exchange.orders.models import CommandResult, NewOrder, PlaceResult
from tests.integration.api_helpers import ADMIN_KEY, new_symbol
from tests.integration.sql_orders import add_broker

pytest_plugins = ["tests.integration.api_fixtures"]


def new_order(broker_id: uuid.UUID, symbol: str, **extra: Any) -> NewOrder:
    fields: dict[str, Any] = {
        "order_id": uuid.uuid4(),
        "broker_id": broker_id,
        "document_number": "1",
        "symbol": symbol,
        "side": "bid",
        "order_type": "limit",
        "time_in_force": "gtc",
        "price": 100,
        "quantity": 5,
        "valid_until": None,
        "stp": "none",
        **extra,
    }
    return NewOrder(**fields)


async def placed_in_one_symbol(
    engine: Engine, api_pool: AsyncPool, name: str, count: int
) -> tuple[uuid.UUID, str, list[NewOrder]]:
    """A new broker's ``count`` orders in one new symbol, accepted: (broker, symbol, orders)."""
    broker = add_broker(engine, name)
    symbol = new_symbol()
    orders = [new_order(broker, symbol) for _ in range(count)]
    await accept.place_orders(api_pool, orders)
    return broker, symbol, orders


@pytest.mark.anyio
async def test_a_group_writes_every_order_with_its_place_command_in_submission_order(
    engine: Engine, api_pool: AsyncPool
) -> None:
    broker = add_broker(engine, "grouped")
    orders = [new_order(broker, new_symbol()) for _ in range(5)]
    outcomes = await accept.place_orders(api_pool, orders)
    assert [(o.order_id, o.created) for o in outcomes if isinstance(o, PlaceResult)] == [
        (o.order_id, True) for o in orders
    ]
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT o.id, o.seq, o.created_at, c.seq AS command_seq, c.kind FROM orders o"
                " JOIN commands c ON c.order_id = o.id WHERE o.broker_id = :b ORDER BY o.seq"
            ),
            {"b": broker},
        ).all()
    assert [r.id for r in rows] == [o.order_id for o in orders]
    assert all(r.seq == r.command_seq and r.kind == "place" for r in rows)
    assert [o.created_at for o in outcomes if isinstance(o, PlaceResult)] == [r.created_at for r in rows]


@pytest.mark.anyio
async def test_a_repeated_client_order_id_inside_one_group_resolves_to_the_first_order(
    engine: Engine, api_pool: AsyncPool
) -> None:
    broker = add_broker(engine, "twice")
    symbol = new_symbol()
    first, second = (new_order(broker, symbol, client_order_id="same") for _ in range(2))
    outcomes = await accept.place_orders(api_pool, [first, second])
    assert [(o.order_id, o.created) for o in outcomes if isinstance(o, PlaceResult)] == [
        (first.order_id, True),
        (first.order_id, False),
    ]
    assert isinstance(outcomes[1], PlaceResult)
    assert outcomes[1].created_at is None
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM commands WHERE symbol = :s"), {"s": symbol}).scalar() == 1


@pytest.mark.anyio
async def test_an_order_that_violates_a_constraint_fails_alone_and_the_rest_of_its_group_commits(
    engine: Engine, api_pool: AsyncPool
) -> None:
    broker = add_broker(engine, "good")
    symbol = new_symbol()
    good_before, good_after = new_order(broker, symbol), new_order(broker, symbol)
    unknown_broker = new_order(uuid.uuid4(), symbol)  # foreign key violation
    outcomes = await accept.place_orders(api_pool, [good_before, unknown_broker, good_after])
    assert isinstance(outcomes[0], PlaceResult)
    assert (outcomes[0].order_id, outcomes[0].created) == (good_before.order_id, True)
    assert isinstance(outcomes[1], psycopg.IntegrityError)
    assert isinstance(outcomes[2], PlaceResult)
    assert (outcomes[2].order_id, outcomes[2].created) == (good_after.order_id, True)
    with engine.connect() as conn:
        ids = set(conn.execute(text("SELECT order_id FROM commands WHERE symbol = :s"), {"s": symbol}).scalars())
    assert ids == {good_before.order_id, good_after.order_id}


@pytest.mark.anyio
async def test_an_order_reusing_an_accepted_orders_id_fails_alone_and_the_rest_of_its_group_commits(
    engine: Engine, api_pool: AsyncPool
) -> None:
    # A uuid4 collision, the only conflict an order without a client order id or idempotency key can meet. Skipped
    # by ON CONFLICT DO NOTHING, it failed the whole group after its other orders had committed (alembic 0025).
    broker = add_broker(engine, "collides")
    symbol = new_symbol()
    accepted = new_order(broker, symbol)
    await accept.place_orders(api_pool, [accepted])
    good_before, good_after = new_order(broker, symbol), new_order(broker, symbol)
    same_id = new_order(broker, symbol, order_id=accepted.order_id, quantity=7)
    outcomes = await accept.place_orders(api_pool, [good_before, same_id, good_after])
    assert isinstance(outcomes[0], PlaceResult)
    assert (outcomes[0].order_id, outcomes[0].created) == (good_before.order_id, True)
    assert isinstance(outcomes[1], psycopg.errors.UniqueViolation)
    assert isinstance(outcomes[2], PlaceResult)
    assert (outcomes[2].order_id, outcomes[2].created) == (good_after.order_id, True)
    with engine.connect() as conn:
        placed = conn.execute(text("SELECT order_id FROM commands WHERE symbol = :s"), {"s": symbol}).scalars().all()
        quantity = conn.execute(text("SELECT quantity FROM orders WHERE id = :i"), {"i": accepted.order_id}).scalar()
    assert sorted(map(str, placed)) == sorted(str(o.order_id) for o in (accepted, good_before, good_after))
    assert quantity == accepted.quantity


@pytest.mark.anyio
async def test_reading_orders_together_never_shows_an_order_to_another_broker(
    engine: Engine, api_pool: AsyncPool
) -> None:
    owner, other = add_broker(engine, "owner"), add_broker(engine, "other")
    order = new_order(owner, new_symbol())
    await accept.place_orders(api_pool, [order])
    async with single_statement(api_pool) as conn:
        views = await queries.get_orders(conn, [(other, order.order_id), (owner, order.order_id)] * 2)
    assert list(views) == [(owner, order.order_id)]
    assert views[(owner, order.order_id)].trades == []


@pytest.mark.anyio
async def test_a_cancel_group_writes_one_command_per_live_order_and_finds_only_own_orders(
    engine: Engine, api_pool: AsyncPool
) -> None:
    owner, other = add_broker(engine, "canceller"), add_broker(engine, "stranger")
    symbol = new_symbol()
    live = new_order(owner, symbol)
    await accept.place_orders(api_pool, [live])
    outcomes = await accept.cancel_orders(
        api_pool, [(owner, live.order_id), (other, live.order_id), (owner, live.order_id), (owner, uuid.uuid4())]
    )
    assert outcomes[0] == outcomes[2] == CommandResult(symbol, written=True)
    assert isinstance(outcomes[1], OrderNotFoundError)
    assert isinstance(outcomes[3], OrderNotFoundError)
    again = await accept.cancel_orders(api_pool, [(owner, live.order_id)])
    assert again == [CommandResult(symbol, written=False)]  # a cancel is already pending
    with engine.connect() as conn:
        kinds = conn.execute(text("SELECT kind FROM commands WHERE order_id = :o ORDER BY seq"), {"o": live.order_id})
        assert list(kinds.scalars()) == ["place", "cancel"]


@pytest.mark.anyio
async def test_a_cancel_group_waits_for_its_orders_advisory_lock_which_the_one_statement_takes_itself(
    engine: Engine, api_pool: AsyncPool
) -> None:
    broker, _, [order] = await placed_in_one_symbol(engine, api_pool, "lock-taker", 1)
    with engine.connect() as other:  # another cancel writer of the same order's bucket (alembic 0014's key)
        bucket_lock = text("SELECT pg_advisory_xact_lock(3084, cancel_bucket(:id))")
        other.execute(bucket_lock, {"id": order.order_id})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(accept.cancel_orders(api_pool, [(broker, order.order_id)]), timeout=1)
        other.rollback()
    outcome = await asyncio.wait_for(accept.cancel_orders(api_pool, [(broker, order.order_id)]), timeout=10)
    assert outcome == [CommandResult(order.symbol, written=True)]


@pytest.mark.anyio
async def test_concurrent_cancel_groups_of_one_order_write_one_command(engine: Engine, api_pool: AsyncPool) -> None:
    broker, _, [order] = await placed_in_one_symbol(engine, api_pool, "racing-cancels", 1)
    outcomes = await asyncio.gather(*(accept.cancel_orders(api_pool, [(broker, order.order_id)]) for _ in range(8)))
    assert sorted(o[0].written for o in outcomes if isinstance(o[0], CommandResult)) == [False] * 7 + [True]
    with engine.connect() as conn:
        kinds = conn.execute(text("SELECT kind FROM commands WHERE order_id = :o"), {"o": order.order_id})
        assert sorted(kinds.scalars()) == ["cancel", "place"]


@pytest.mark.anyio
async def test_cancel_all_racing_single_cancels_of_its_orders_writes_one_cancel_per_order(
    engine: Engine, api_pool: AsyncPool
) -> None:
    broker, symbol, orders = await placed_in_one_symbol(engine, api_pool, "racing-cancel-all", 4)
    everything, *singles = await asyncio.gather(
        accept.cancel_all(api_pool, broker, symbol),
        *(accept.cancel_orders(api_pool, [(broker, o.order_id)]) for o in orders * 2),
    )
    assert isinstance(everything, accept.CancelAllResult)
    written_by_singles = [o.order_id for o, [r] in zip(orders * 2, singles, strict=True) if r.written]
    # every order's cancel was written once, by cancel-all or by one of the single cancels
    assert sorted(everything.order_ids + written_by_singles) == sorted(o.order_id for o in orders)
    with engine.connect() as conn:
        counts = conn.execute(
            text("SELECT order_id, count(*) FROM commands WHERE kind = 'cancel' AND order_id = ANY(:ids) GROUP BY 1"),
            {"ids": [o.order_id for o in orders]},
        )
        assert dict(counts.all()) == {o.order_id: 1 for o in orders}


async def _orders_in_every_state(engine: Engine, api_pool: AsyncPool) -> tuple[uuid.UUID, str, dict[str, uuid.UUID]]:
    """A broker's orders in one symbol, one in each state a cancel tells apart (``open``, ``pending``, ``closed``,
    ``cancelling``: a cancel already pending), its order in another symbol (``elsewhere``) and another broker's in
    the same symbol (``foreign``): (broker, symbol, order ids by name)."""
    broker, stranger = add_broker(engine, "every-state"), add_broker(engine, "every-state-stranger")
    symbol = new_symbol()
    names = ("open", "pending", "closed", "cancelling")
    orders = {name: new_order(broker, symbol) for name in names}
    orders["elsewhere"] = new_order(broker, new_symbol())
    orders["foreign"] = new_order(stranger, symbol)
    await accept.place_orders(api_pool, list(orders.values()))
    ids = {name: order.order_id for name, order in orders.items()}
    with engine.begin() as conn:  # what the matcher writes for a resting order and for a closed one
        conn.execute(text("UPDATE orders SET status = 'open', priority = seq WHERE id = :id"), {"id": ids["open"]})
        conn.execute(
            text("UPDATE orders SET status = 'closed', close_reason = 'cancelled' WHERE id = :id"),
            {"id": ids["closed"]},
        )
    assert await accept.cancel_orders(api_pool, [(broker, ids["cancelling"])]) == [CommandResult(symbol, written=True)]
    return broker, symbol, ids


def _cancels(engine: Engine, ids: dict[str, uuid.UUID]) -> dict[str, int]:
    """The number of cancel commands of each named order."""
    with engine.connect() as conn:
        counts = dict(
            conn.execute(
                text(
                    "SELECT order_id, count(*) FROM commands WHERE kind = 'cancel' AND order_id = ANY(:ids) GROUP BY 1"
                ),
                {"ids": list(ids.values())},
            ).all()
        )
    return {name: counts.get(order_id, 0) for name, order_id in ids.items()}


@pytest.mark.anyio
async def test_cancel_all_writes_and_returns_one_cancel_for_each_live_order_of_the_broker_in_the_symbol(
    engine: Engine, api_pool: AsyncPool
) -> None:
    # The broker's open and pending orders of the symbol: not a closed one, not one already being cancelled, not
    # its orders elsewhere, not another broker's.
    broker, symbol, ids = await _orders_in_every_state(engine, api_pool)

    everything = await accept.cancel_all(api_pool, broker, symbol.lower())

    assert everything.symbol == symbol
    assert sorted(everything.order_ids) == sorted([ids["open"], ids["pending"]])
    expected = {"open": 1, "pending": 1, "closed": 0, "cancelling": 1, "elsewhere": 0, "foreign": 0}
    assert _cancels(engine, ids) == expected
    again = await accept.cancel_all(api_pool, broker, symbol)
    assert again.order_ids == []
    assert _cancels(engine, ids) == expected


@pytest.mark.anyio
async def test_a_cancel_group_answers_whether_it_wrote_a_command_for_each_order_in_the_groups_order(
    engine: Engine, api_pool: AsyncPool
) -> None:
    broker, symbol, ids = await _orders_in_every_state(engine, api_pool)
    names = ("closed", "open", "cancelling", "foreign", "pending", "elsewhere")

    outcomes = await accept.cancel_orders(api_pool, [(broker, ids[name]) for name in names])

    elsewhere = outcomes[5]
    assert isinstance(elsewhere, CommandResult)
    assert outcomes[:3] == [
        CommandResult(symbol, written=False),
        CommandResult(symbol, written=True),
        CommandResult(symbol, written=False),
    ]
    assert isinstance(outcomes[3], OrderNotFoundError)
    assert (outcomes[4], elsewhere.written) == (CommandResult(symbol, written=True), True)
    expected = {"open": 1, "pending": 1, "closed": 0, "cancelling": 1, "elsewhere": 1, "foreign": 0}
    assert _cancels(engine, ids) == expected
    with engine.connect() as conn:  # written in the group's order
        written = conn.execute(
            text("SELECT order_id FROM commands WHERE kind = 'cancel' AND order_id = ANY(:ids) ORDER BY seq"),
            {"ids": [ids["open"], ids["pending"], ids["elsewhere"]]},
        )
        assert list(written.scalars()) == [ids["open"], ids["pending"], ids["elsewhere"]]


@pytest.mark.anyio
async def test_cancels_never_wait_for_row_locks_a_matcher_holds(engine: Engine, api_pool: AsyncPool) -> None:
    # The matcher updates order rows (FOR NO KEY UPDATE level) in its own order; cancels taking row locks could
    # deadlock with it. Cancels must only need their advisory locks and the foreign key's KEY SHARE lock.
    broker, symbol, orders = await placed_in_one_symbol(engine, api_pool, "no-wait", 3)
    with engine.connect() as matcher:
        matcher.execute(
            text("SELECT id FROM orders WHERE id = ANY(:ids) FOR NO KEY UPDATE"), {"ids": [o.order_id for o in orders]}
        )
        one = await asyncio.wait_for(accept.cancel_orders(api_pool, [(broker, orders[0].order_id)]), timeout=10)
        everything = await asyncio.wait_for(accept.cancel_all(api_pool, broker, symbol), timeout=10)
        matcher.rollback()
    assert one == [CommandResult(symbol, written=True)]
    assert set(everything.order_ids) == {orders[1].order_id, orders[2].order_id}


@pytest.mark.anyio
async def test_concurrent_requests_to_one_api_process_share_transactions(
    api_settings_factory: Callable[..., Settings], api_engine: Engine
) -> None:
    # One accept transaction at a time: every request arriving while it runs joins the next group. Orders of one
    # transaction share its start time, ``created_at`` (``now()``), so fewer distinct values = fewer commits.
    # A real server (uvicorn on a loopback port): the test client would run the requests one after the other.
    app = create_app(api_settings_factory(group_commit_concurrency="1"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            response = await client.post("/register", json={"name": "burst"}, headers=admin)
            broker_id, key = response.json()["broker_id"], response.json()["api_key"]
            headers = {"Authorization": f"Bearer {key}"}
            body = {"document_number": "1", "side": "bid", "symbol": new_symbol(), "price": 100, "quantity": 5}
            responses = await asyncio.gather(*(client.post("/orders", json=body, headers=headers) for _ in range(20)))
    finally:
        server.should_exit = True
        await serving
    assert {r.status_code for r in responses} == {201}
    with api_engine.connect() as conn:
        stamps = conn.execute(
            text("SELECT count(*), count(DISTINCT created_at) FROM orders WHERE broker_id = :b"), {"b": broker_id}
        ).one()
    assert stamps[0] == 20
    assert stamps[1] <= 10, f"20 concurrent orders took {stamps[1]} transactions"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _is_heap_only(engine: Engine, order_id: uuid.UUID) -> bool:
    """Whether the order's current row version was written by a HOT update (pageinspect's HEAP_ONLY_TUPLE bit):
    such a version got no index entry of its own."""
    with engine.begin() as conn:
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS pageinspect"))
        return bool(
            conn.execute(
                text(
                    "SELECT (i.t_infomask2 & 32768) <> 0 FROM orders o,"
                    " heap_page_items(get_raw_page('orders', (o.ctid::text::point)[0]::int)) AS i"
                    " WHERE o.id = :id AND i.lp = (o.ctid::text::point)[1]::int"
                ),
                {"id": order_id},
            ).scalar_one()
        )


@pytest.mark.anyio
async def test_a_new_order_that_rests_is_opened_by_the_matcher_with_a_hot_update(
    engine: Engine, api_pool: AsyncPool
) -> None:
    # The pending -> open update is the matcher's most frequent write (three orders in four rest): it must not
    # write new entries into the six indexes of orders (alembic 0009). It is HOT only if the api wrote the
    # priority the matcher gives a resting order (its seq) and no index names status.
    broker = add_broker(engine, "resting")
    symbol = new_symbol()
    order = new_order(broker, symbol, client_order_id="rests")
    [outcome] = await accept.place_orders(api_pool, [order])
    assert isinstance(outcome, PlaceResult)
    with engine.connect() as conn:
        seq, priority = conn.execute(
            text("SELECT seq, priority FROM orders WHERE id = :id"), {"id": order.order_id}
        ).one()
    assert priority == seq

    process_symbol(engine, BookCache(), symbol)

    with engine.connect() as conn:
        row = conn.execute(text("SELECT status, priority FROM orders WHERE id = :id"), {"id": order.order_id}).one()
    assert (row.status, row.priority) == ("open", seq)
    assert _is_heap_only(engine, order.order_id)

"""A cancel-all writes its cancels in chunks, each its own transaction taking only its orders' cancel-bucket locks
(alembic 0014's ``(3084, bucket)`` keys): a large one no longer holds every bucket while it runs, a chunk that waits
holds up only the cancels of its own buckets, and one cut off half-way leaves whole chunks, which a retry completes.

The tests hold one bucket's lock themselves, so that the cancel-all stops on the chunk that needs it, and read
``pg_locks`` to see who waits for what: nothing here depends on how long anything takes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from sqlalchemy import Connection, Engine, text

from exchange.db.engines import AsyncPool
from exchange.orders import accept
from exchange.orders.models import CommandResult, NewOrder
from tests.integration.api_helpers import new_symbol
from tests.integration.sql_orders import add_broker

ORDERS = 40
CHUNK = 5

_BUCKET = "cancel_bucket(CAST(:id AS uuid))"

# Requests for cancel-bucket locks of this test's database that wait: (pid, bucket).
_WAITERS = """
    SELECT pid, objid FROM pg_locks
    WHERE locktype = 'advisory' AND classid = 3084 AND objsubid = 2 AND NOT granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    """

# A fresh order id whose cancel bucket is :bucket.
_ID_IN_BUCKET = """
    SELECT id FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 20000)) AS g
    WHERE cancel_bucket(id) = :bucket LIMIT 1
    """


def _order(broker_id: uuid.UUID, symbol: str, order_id: uuid.UUID | None = None) -> NewOrder:
    return NewOrder(
        order_id=order_id or uuid.uuid4(),
        broker_id=broker_id,
        document_number="1",
        symbol=symbol,
        side="bid",
        order_type="limit",
        time_in_force="gtc",
        price=100,
        quantity=5,
        valid_until=None,
        stp="none",
    )


async def _placed(engine: Engine, api_pool: AsyncPool, name: str, count: int) -> tuple[uuid.UUID, str, list[uuid.UUID]]:
    """A new broker's ``count`` accepted orders in a new symbol: (broker, symbol, order ids)."""
    broker, symbol = add_broker(engine, name), new_symbol()
    orders = [_order(broker, symbol) for _ in range(count)]
    await accept.place_orders(api_pool, orders)
    return broker, symbol, [o.order_id for o in orders]


def _buckets(engine: Engine, ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    with engine.connect() as conn:
        return {i: conn.execute(text(f"SELECT {_BUCKET}"), {"id": i}).scalar_one() for i in ids}


def _id_in_bucket(engine: Engine, bucket: int) -> uuid.UUID:
    with engine.connect() as conn:
        found: uuid.UUID = conn.execute(text(_ID_IN_BUCKET), {"bucket": bucket}).scalar_one()
    return found


def _cancels(engine: Engine, ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    """The number of cancel commands of each order."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT order_id, count(*) FROM commands WHERE kind = 'cancel' AND order_id = ANY(:ids) GROUP BY 1"),
            {"ids": ids},
        )
        counts: dict[uuid.UUID, int] = dict(rows.all())
    return {i: counts.get(i, 0) for i in ids}


def _waiters(engine: Engine) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        return [(row.pid, row.objid) for row in conn.execute(text(_WAITERS))]


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(2000):  # a bound for a broken test, not a measurement: each step is a sleep of 10 ms
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


@contextmanager
def _bucket_held(engine: Engine, bucket: int) -> Iterator[Connection]:
    """Another cancel writer holding ``bucket``'s lock (in its open transaction) until the block ends."""
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_xact_lock(3084, :b)"), {"b": bucket})
        try:
            yield holder
        finally:
            holder.rollback()


@pytest.mark.anyio
async def test_a_chunked_cancel_all_writes_one_cancel_per_live_order_in_one_transaction_per_chunk(
    engine: Engine, api_pool: AsyncPool
) -> None:
    broker, symbol, ids = await _placed(engine, api_pool, "chunked-all", ORDERS)

    everything = await accept.cancel_all(api_pool, broker, symbol, chunk=CHUNK)

    assert sorted(everything.order_ids) == sorted(ids)
    assert _cancels(engine, ids) == dict.fromkeys(ids, 1)
    with engine.connect() as conn:  # each chunk committed on its own: one transaction id per chunk
        transactions = conn.execute(
            text(
                "SELECT count(DISTINCT CAST(xmin AS text)) FROM commands WHERE kind = 'cancel' AND order_id = ANY(:i)"
            ),
            {"i": ids},
        ).scalar_one()
    assert transactions == ORDERS // CHUNK
    assert (await accept.cancel_all(api_pool, broker, symbol, chunk=CHUNK)).order_ids == []  # nothing left to write


@pytest.mark.anyio
async def test_another_brokers_cancel_is_not_held_up_while_a_cancel_all_waits_on_a_later_chunk(
    engine: Engine, api_pool: AsyncPool
) -> None:
    # The one-statement cancel-all took every bucket of its orders in ascending order before writing anything: stopped
    # on its last bucket, it held all the others, and a cancel of any order in them waited for the whole cancel-all.
    broker, symbol, ids = await _placed(engine, api_pool, "chunked-holder", ORDERS)
    buckets = _buckets(engine, ids)
    first, last = min(buckets.values()), max(buckets.values())
    bystander = add_broker(engine, "chunked-bystander")
    theirs = _order(bystander, new_symbol(), _id_in_bucket(engine, first))  # in the cancel-all's first bucket
    await accept.place_orders(api_pool, [theirs])

    with _bucket_held(engine, last):
        everything = asyncio.create_task(accept.cancel_all(api_pool, broker, symbol, chunk=CHUNK))
        await _until(lambda: [b for _, b in _waiters(engine)] == [last], "the cancel-all waits for its last bucket")
        single = asyncio.create_task(accept.cancel_orders(api_pool, [(bystander, theirs.order_id)]))
        while not single.done():
            assert [b for _, b in _waiters(engine)] == [last], "the single cancel waits behind the cancel-all"
            await asyncio.sleep(0.005)
        assert single.result() == [CommandResult(theirs.symbol, written=True)]
        assert not everything.done()
        written = {i for i, n in _cancels(engine, ids).items() if n}  # the chunks before the waiting one
        assert 0 < len(written) < ORDERS
        assert max(buckets[i] for i in written) <= min(buckets[i] for i in ids if i not in written)
    assert sorted((await asyncio.wait_for(everything, timeout=30)).order_ids) == sorted(ids)


@pytest.mark.anyio
async def test_a_cancel_all_cut_off_between_chunks_leaves_whole_chunks_and_a_retry_writes_the_rest(
    engine: Engine, api_pool: AsyncPool
) -> None:
    broker, symbol, ids = await _placed(engine, api_pool, "chunked-cut", ORDERS)
    last = max(_buckets(engine, ids).values())

    with _bucket_held(engine, last) as holder:
        cut = asyncio.create_task(accept.cancel_all(api_pool, broker, symbol, chunk=CHUNK))
        await _until(lambda: len(_waiters(engine)) == 1, "the cancel-all waits for its last bucket")
        [(pid, _)] = _waiters(engine)
        holder.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})  # its connection dies mid-chunk
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(cut, timeout=30)

    before = _cancels(engine, ids)
    assert set(before.values()) == {0, 1}  # every order has its cancel command, or nothing
    untouched = sorted(i for i, n in before.items() if n == 0)
    retry = await accept.cancel_all(api_pool, broker, symbol, chunk=CHUNK)
    assert sorted(retry.order_ids) == untouched
    assert _cancels(engine, ids) == dict.fromkeys(ids, 1)


@pytest.mark.anyio
async def test_an_order_accepted_after_a_cancel_all_began_is_left_alone_by_its_later_chunks(
    engine: Engine, api_pool: AsyncPool
) -> None:
    # As in one statement: a cancel-all cancels the orders accepted before it began, read once. A chunk that looked
    # for the broker's live orders again would cancel this one, accepted in the bucket of the chunk still to come.
    broker, symbol, ids = await _placed(engine, api_pool, "chunked-later", ORDERS)
    last = max(_buckets(engine, ids).values())
    later = _order(broker, symbol, _id_in_bucket(engine, last))

    with _bucket_held(engine, last):
        everything = asyncio.create_task(accept.cancel_all(api_pool, broker, symbol, chunk=CHUNK))
        await _until(lambda: len(_waiters(engine)) == 1, "the cancel-all waits for its last bucket")
        await accept.place_orders(api_pool, [later])
    assert sorted((await asyncio.wait_for(everything, timeout=30)).order_ids) == sorted(ids)
    assert _cancels(engine, [*ids, later.order_id]) == {**dict.fromkeys(ids, 1), later.order_id: 0}

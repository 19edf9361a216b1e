"""``ResultWaiter.wait``: a bounded wait on a request's own registered future, which the wait never cancels and
always unregisters, however it ends (result, timeout, the request cancelled)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio

from exchange.messaging.names import fixed
from exchange.messaging.results import PlacedState, ResultWaiter

pytestmark = pytest.mark.anyio


def _waiter() -> ResultWaiter:
    # Never started: these tests resolve futures themselves, as the subscriber would; nothing connects.
    return ResultWaiter(redis.asyncio.Redis(), fixed("exchange-test"))


async def test_a_wait_returns_true_once_the_result_arrives_and_unregisters_the_future() -> None:
    waiter, order_id = _waiter(), uuid.uuid4()
    future = waiter.register(order_id)
    state = PlacedState(order_id, "open", None, None, None, None, 0, [])
    asyncio.get_running_loop().call_later(0.01, future.set_result, state)
    assert await waiter.wait(order_id, future, 5.0)
    assert future.result() == state
    assert order_id not in waiter._waiting


async def test_a_wait_that_times_out_returns_false_without_cancelling_the_future() -> None:
    waiter, order_id = _waiter(), uuid.uuid4()
    future = waiter.register(order_id)
    started = asyncio.get_running_loop().time()
    assert not await waiter.wait(order_id, future, 0.05)
    assert asyncio.get_running_loop().time() - started >= 0.05
    assert not future.done()
    assert order_id not in waiter._waiting


async def test_a_wait_with_no_time_left_answers_at_once_whether_the_result_is_there() -> None:
    waiter, order_id = _waiter(), uuid.uuid4()
    future = waiter.register(order_id)
    assert not await waiter.wait(order_id, future, 0.0)
    future = waiter.register(order_id)
    future.set_result(None)
    assert await waiter.wait(order_id, future, 0.0)
    assert order_id not in waiter._waiting


async def test_a_cancelled_wait_leaves_its_future_uncancelled_and_unregistered() -> None:
    waiter, order_id = _waiter(), uuid.uuid4()
    future = waiter.register(order_id)
    task = asyncio.create_task(waiter.wait(order_id, future, 5.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not future.done()
    assert order_id not in waiter._waiting


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the api's loop (uvloop is asyncio's)

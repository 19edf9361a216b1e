"""The api process's result subscriber (:func:`exchange.api.state.results_subscriber` under a
:class:`~exchange.messaging.results.ResultWaiter`) receives a matcher's published result, on both kinds of Redis URL
the exchange runs with: TCP (a Redis server) and a unix socket (``exchange dev``'s embedded Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from exchange.api.state import SUBSCRIBER_KEEPALIVE, results_subscriber
from exchange.embedded import EmbeddedRedis
from exchange.messaging.names import fixed
from exchange.messaging.results import PlacedState, ResultWaiter, publish_results
from tests.integration.redis_support import redis_test_url

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["tcp", "unix-socket"])
def redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "tcp":
        if not redis_test_url().startswith("redis://"):
            pytest.skip("no Redis over TCP here (the session runs an embedded one on a unix socket)")
        yield redis_test_url()  # pub/sub ignores the database: nothing to claim
        return
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


async def test_a_published_result_reaches_the_waiting_request(redis_url: str) -> None:
    subscriber = results_subscriber(redis_url)
    namespace = f"exchange-test-{uuid.uuid4().hex[:8]}"
    waiter = ResultWaiter(subscriber, fixed(namespace))
    await waiter.start()
    publisher = redis.Redis.from_url(redis_url)
    try:
        order_id = uuid.uuid4()
        future = waiter.register(order_id)
        state = PlacedState(order_id, "open", None, None, None, None, 0, [])
        publish_results(publisher, namespace, [order_id], [state])
        assert await waiter.wait(order_id, future, timeout_s=5.0)
        assert future.result() == state
    finally:
        publisher.close()
        await waiter.stop()
        await subscriber.aclose()


def test_the_subscriber_probes_a_tcp_redis_and_asks_nothing_of_a_unix_socket() -> None:
    tcp = results_subscriber("redis://127.0.0.1:6379/0").connection_pool.connection_kwargs
    assert tcp["socket_keepalive"] is True
    assert tcp["socket_keepalive_options"] == SUBSCRIBER_KEEPALIVE
    unix = results_subscriber("unix:///tmp/redis.sock?db=0").connection_pool.connection_kwargs
    assert "socket_keepalive" not in unix


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_the_subscriber_reports_a_restarted_redis_and_hears_results_again_once_it_is_back(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    subscriber = results_subscriber(url)
    waiter = ResultWaiter(subscriber, fixed("exchange-test-restart"))
    await waiter.start()
    try:
        assert waiter.subscribed
        server.stop()
        await _until(lambda: not waiter.subscribed)  # readiness drops 'results' while Redis is gone
        server.start()
        await _until(lambda: waiter.subscribed)
        order_id = uuid.uuid4()
        future = waiter.register(order_id)
        publisher = redis.Redis.from_url(url)
        try:
            publish_results(publisher, "exchange-test-restart", [order_id])
        finally:
            publisher.close()
        assert await waiter.wait(order_id, future, timeout_s=5.0)
    finally:
        await waiter.stop()
        await subscriber.aclose()
        server.stop()

"""Coalesced wake-ups from the api: one message per partition naming every symbol of it whose key was free, and a
symbol left without its message (enqueue failed half-way) gets its key back so the next command wakes it at once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import dramatiq
import pytest
import redis.asyncio

from exchange.messaging.partitions import matching_actor, matching_queue, partition_of
from exchange.messaging.wakeups import wake_async, wake_key
from tests.integration.redis_support import redis_test_url

pytestmark = pytest.mark.anyio


class FailingAfter:
    """A broker whose Redis goes away after ``ok`` messages (the only way to fail an enqueue half-way here)."""

    def __init__(self, ok: int) -> None:
        self.ok = ok
        self.messages: list[dramatiq.Message[Any]] = []

    @property
    def sent(self) -> list[str]:
        return [symbol for message in self.messages for symbol in message.args]

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> object:
        if len(self.messages) >= self.ok:
            raise ConnectionError("redis went away")
        self.messages.append(message)
        return message


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_test_url())
    yield client
    await client.aclose()


def symbols(n: int, *, partitions: int = 8, distinct: bool = False) -> list[str]:
    """``n`` fresh symbols; with ``distinct``, in ``n`` different partitions."""
    tag = uuid.uuid4().hex[:6].upper()
    chosen: dict[int, str] = {}
    found: list[str] = []
    i = 0
    while len(found) < n:
        symbol = f"W{tag}{i}"
        i += 1
        if distinct and chosen.setdefault(partition_of(symbol, partitions), symbol) != symbol:
            continue
        found.append(symbol)
    return found


async def test_a_burst_on_one_symbol_sends_one_message(client: redis.asyncio.Redis) -> None:
    broker = FailingAfter(ok=100)
    [symbol] = symbols(1)
    assert await wake_async(client, broker, [symbol, symbol], 8) == 1
    assert await wake_async(client, broker, [symbol], 8) == 0
    assert broker.sent == [symbol]
    await client.delete(wake_key(symbol))


async def test_one_message_per_partition_names_all_its_woken_symbols(client: redis.asyncio.Redis) -> None:
    broker = FailingAfter(ok=100)
    woken = symbols(40)
    already = woken[5]
    await client.set(wake_key(already), b"1", px=5000)  # a wake-up of it is pending: not named again

    assert await wake_async(client, broker, [*woken, woken[0]], 8) == 39

    partitions = {partition_of(symbol, 8) for symbol in woken if symbol != already}
    assert len(broker.messages) == len(partitions)
    for message in broker.messages:
        [n] = {partition_of(symbol, 8) for symbol in message.args}
        assert (message.queue_name, message.actor_name) == (matching_queue(n), matching_actor(n))
        assert list(message.args) == [s for s in woken if s != already and partition_of(s, 8) == n]
    assert sorted(broker.sent) == sorted(s for s in woken if s != already)
    await client.delete(*(wake_key(symbol) for symbol in woken))


async def test_symbols_left_without_a_message_get_their_wake_key_back(client: redis.asyncio.Redis) -> None:
    broker = FailingAfter(ok=1)
    first, second, third = symbols(3, distinct=True)
    with pytest.raises(ConnectionError):
        await wake_async(client, broker, [first, second, third], 8)
    assert broker.sent == [first]
    assert await client.exists(wake_key(first)) == 1
    assert await client.exists(wake_key(second), wake_key(third)) == 0
    await client.delete(wake_key(first))

"""Coalesced wake-ups (real Redis): one message per partition while it is free, none while a matcher holds it (the
symbols accumulate for the holder), the holder takes them and releases the partition only when nothing is left, and
a failure never leaves a partition held without a message."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import dramatiq
import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from exchange.api import batches
from exchange.messaging import wakeups
from exchange.messaging.broker import AsyncEnqueuer, DoorbellRedisBroker
from exchange.messaging.partitions import matching_actor, matching_queue, partition_of
from exchange.messaging.wakeups import PartitionWakeups, RetryWakeups, hold_partition, wake_async
from tests.integration.redis_support import claimed_database

pytestmark = pytest.mark.anyio

PARTITIONS = 8
NS = "exchange-test-wakeups"
"""The namespace of this module's broker and matcher side (each test has a Redis database of its own)."""


def woken_key(partition: int) -> str:
    return wakeups.woken_key(NS, partition)


def busy_key(partition: int) -> str:
    return wakeups.busy_key(NS, partition)


def ring_key(partition: int) -> str:
    return wakeups.ring_key(NS, partition)


@pytest.fixture(autouse=True)
def flags_outlive_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """No flag expires by itself during a test (0.5 s is short on a loaded machine): only the code under test
    sets and clears them, so a test that expects a flag freed fails when it is not."""
    monkeypatch.setattr(wakeups, "WAKE_TTL_MS", 60_000)


@pytest.fixture
def redis_url() -> Iterator[str]:
    with claimed_database() as url:  # the keys are per partition: no other test may share them
        yield url


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def broker(redis_url: str) -> Iterator[DoorbellRedisBroker]:
    broker = DoorbellRedisBroker(url=redis_url, namespace=NS)  # type: ignore[no-untyped-call]  # dramatiq leaves __init__ untyped
    yield broker
    broker.close()


@pytest.fixture
async def enqueuer(broker: DoorbellRedisBroker, client: redis.asyncio.Redis) -> AsyncIterator[AsyncEnqueuer]:
    enqueuer = AsyncEnqueuer(broker, client)
    yield enqueuer
    await enqueuer.close()


def queued(broker: DoorbellRedisBroker, partition: int) -> list[dramatiq.Message[Any]]:
    """The messages waiting in ``partition``'s queue, oldest first (as dramatiq stores them)."""
    queue = f"{broker.namespace}:{matching_queue(partition)}"
    client: redis.Redis = broker.client
    return [dramatiq.Message.decode(cast(bytes, client.hget(f"{queue}.msgs", i))) for i in client.lrange(queue, 0, -1)]


def sent(broker: DoorbellRedisBroker) -> list[str]:
    """Every symbol named by a queued message, over all partitions."""
    return [symbol for n in range(PARTITIONS) for message in queued(broker, n) for symbol in message.args]


@pytest.fixture
def matcher_side(redis_url: str) -> Iterator[PartitionWakeups]:
    client = redis.Redis.from_url(redis_url)
    yield PartitionWakeups(client, NS)
    client.close()


def symbols(n: int, *, partition: int | None = None, distinct: bool = False) -> list[str]:
    """``n`` fresh symbols: all in ``partition`` if given; with ``distinct``, in ``n`` different partitions."""
    tag = uuid.uuid4().hex[:6].upper()
    chosen: dict[int, str] = {}
    found: list[str] = []
    i = 0
    while len(found) < n:
        symbol = f"W{tag}{i}"
        i += 1
        p = partition_of(symbol, PARTITIONS)
        if partition is not None and p != partition:
            continue
        if distinct and chosen.setdefault(p, symbol) != symbol:
            continue
        found.append(symbol)
    return found


def messages_queued(broker: DoorbellRedisBroker) -> int:
    return sum(len(queued(broker, n)) for n in range(PARTITIONS))


async def wake(enqueuer: AsyncEnqueuer, client: redis.asyncio.Redis, names: list[str]) -> int:
    """The api's wake-up of ``names``, once Redis has run it (Redis does not answer it: a key set after it on the
    same connection is the fence); returns the number of messages it queued."""
    broker = cast(DoorbellRedisBroker, enqueuer._broker)
    before = messages_queued(broker)
    await wake_async(enqueuer, names, PARTITIONS)
    fence = f"test:fence:{uuid.uuid4().hex}"
    await enqueuer._quiet.send([("SET", fence, b"1", "PX", 60_000)])
    for _ in range(1000):
        if await client.exists(fence):
            return messages_queued(broker) - before
        await asyncio.sleep(0.01)
    raise AssertionError("the wake-up's connection never reached Redis")


def wake_elsewhere(redis_url: str, broker: DoorbellRedisBroker, symbols: list[str]) -> int:
    """The api's wake-up of ``symbols`` from another thread with its own event loop and client (an api worker is
    another process): what a holder sees while it processes."""

    async def wake_there() -> int:
        client = redis.asyncio.Redis.from_url(redis_url)
        enqueuer = AsyncEnqueuer(broker, client)
        try:
            return await wake(enqueuer, client, symbols)
        finally:
            await enqueuer.close()
            await client.aclose()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wake_there()).result()


def take_after_commit(side: PartitionWakeups, broker: DoorbellRedisBroker, partition: int) -> list[str]:
    """What the matcher sends after its last commit: its results and the take, in one pipeline; what was taken."""
    with broker.client.pipeline(transaction=False) as pipe:
        pipe.publish("exchange:test-results", b"[]")
        side.add_take_or_release(pipe, partition)
        replies = pipe.execute(raise_on_error=False)
    assert len(replies) == 2  # the take is one command of the pipeline: no round trip of its own
    return PartitionWakeups.taken(replies[-1])


async def members(client: redis.asyncio.Redis, partition: int) -> list[str]:
    return sorted(m.decode() if isinstance(m, bytes) else m for m in await client.smembers(woken_key(partition)))


async def test_a_held_partition_gets_no_second_message_and_its_symbols_accumulate(
    client: redis.asyncio.Redis, enqueuer: AsyncEnqueuer, broker: DoorbellRedisBroker
) -> None:
    first, second = symbols(2, partition=3)
    assert await wake(enqueuer, client, [first, first]) == 1
    assert await wake(enqueuer, client, [second]) == 0
    assert sent(broker) == [first]
    assert await members(client, 3) == sorted([first, second])
    assert 0 < await client.pttl(busy_key(3)) <= wakeups.WAKE_TTL_MS


async def test_one_message_per_free_partition_names_the_symbols_woken_on_it(
    client: redis.asyncio.Redis, enqueuer: AsyncEnqueuer, broker: DoorbellRedisBroker
) -> None:
    woken = symbols(40)
    held = partition_of(woken[5], PARTITIONS)
    await client.set(busy_key(held), b"1", px=5000)  # a matcher holds this partition: it gets no message

    messages = await wake(enqueuer, client, [*woken, woken[0]])

    free = {partition_of(symbol, PARTITIONS) for symbol in woken} - {held}
    assert messages == len(free)
    for n in range(PARTITIONS):
        if n not in free:
            assert queued(broker, n) == []
            continue
        [message] = queued(broker, n)
        assert (message.queue_name, message.actor_name) == (matching_queue(n), matching_actor(n))
        assert list(message.args) == [s for s in woken if partition_of(s, PARTITIONS) == n]
    assert sorted(sent(broker)) == sorted(s for s in woken if partition_of(s, PARTITIONS) != held)
    assert await members(client, held) == sorted(s for s in woken if partition_of(s, PARTITIONS) == held)


async def test_a_wake_up_that_cannot_reach_redis_takes_no_flag_and_sends_nothing(
    client: redis.asyncio.Redis, broker: DoorbellRedisBroker, tmp_path: Path
) -> None:
    # Each partition's set, flag and message are written by one script, whole or not at all: a flag is never left
    # held without its message (that would silence the partition's wake-ups until the flag's TTL).
    first, second = symbols(2, distinct=True)
    p1, p2 = (partition_of(s, PARTITIONS) for s in (first, second))
    unreachable = redis.asyncio.Redis(unix_socket_path=str(tmp_path / "gone.sock"), retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        await wake_async(AsyncEnqueuer(broker, unreachable), [first, second], PARTITIONS)
    await unreachable.aclose()
    assert sent(broker) == []
    assert await client.exists(busy_key(p1), busy_key(p2), woken_key(p1), woken_key(p2)) == 0


async def test_a_free_partitions_flag_is_set_together_with_its_message_and_a_held_ones_without_one(
    client: redis.asyncio.Redis, enqueuer: AsyncEnqueuer, broker: DoorbellRedisBroker
) -> None:
    held, free = symbols(2, distinct=True)
    p_held, p_free = (partition_of(s, PARTITIONS) for s in (held, free))
    await client.set(busy_key(p_held), b"1", px=5000)  # held by a matcher
    assert await wake(enqueuer, client, [held, free]) == 1
    assert [m.args for m in queued(broker, p_free)] == [(free,)]
    assert 0 < await client.pttl(busy_key(p_free)) <= wakeups.WAKE_TTL_MS
    assert queued(broker, p_held) == []
    assert await members(client, p_held) == [held]  # for the holder's next take


async def test_the_holder_takes_what_was_woken_meanwhile_and_releases_only_when_nothing_was(
    client: redis.asyncio.Redis, matcher_side: PartitionWakeups, enqueuer: AsyncEnqueuer, broker: DoorbellRedisBroker
) -> None:
    first, second, third = symbols(3, partition=6)
    assert await wake(enqueuer, client, [first]) == 1
    assert matcher_side.take(6) == [first]  # the message's own symbol is in the set too: taking it is harmless

    assert await wake(enqueuer, client, [second, third]) == 0  # held: no message
    assert matcher_side.take_or_release(6) == sorted([second, third])
    assert await client.exists(busy_key(6)) == 1  # still held: the holder goes on with them

    assert matcher_side.take_or_release(6) == []
    assert await client.exists(busy_key(6), woken_key(6)) == 0
    assert await wake(enqueuer, client, [first]) == 1  # released: the next wake-up sends a message
    assert len(queued(broker, 6)) == 2


async def test_a_take_sent_in_a_pipeline_takes_and_releases_exactly_like_take_or_release(
    client: redis.asyncio.Redis, matcher_side: PartitionWakeups, enqueuer: AsyncEnqueuer, broker: DoorbellRedisBroker
) -> None:
    first, second, third = symbols(3, partition=3)
    await wake(enqueuer, client, [first])
    matcher_side.take(3)
    await wake(enqueuer, client, [second, third])

    assert take_after_commit(matcher_side, broker, 3) == sorted([second, third])
    assert await client.exists(busy_key(3)) == 1  # still held: the holder goes on with them
    assert take_after_commit(matcher_side, broker, 3) == []
    assert await client.exists(busy_key(3), woken_key(3)) == 0
    assert await wake(enqueuer, client, [first]) == 1  # released: the next wake-up sends a message


async def test_a_holder_goes_on_with_what_its_process_took_and_takes_nothing_itself(
    client: redis.asyncio.Redis, matcher_side: PartitionWakeups, redis_url: str, broker: DoorbellRedisBroker
) -> None:
    first, second = symbols(2, partition=7)
    rounds: list[list[str]] = []

    def process(todo: list[str], deadline: float) -> list[str]:
        rounds.append(todo)
        if len(rounds) == 1:
            wake_elsewhere(redis_url, broker, [second])
        return take_after_commit(matcher_side, broker, 7)

    def take_or_release(partition: int) -> list[str]:
        raise AssertionError("the holder took again after its process had taken")

    matcher_side.take_or_release = take_or_release  # type: ignore[method-assign]
    hold_partition(matcher_side, 7, [first], process=process, hand_off=lambda *_: None, hold_s=60)

    assert rounds == [[first], [second]]
    assert await client.exists(busy_key(7), woken_key(7)) == 0  # released by the process's last take


async def test_a_failed_holder_gives_its_symbols_back_and_frees_the_partition(
    client: redis.asyncio.Redis, matcher_side: PartitionWakeups, enqueuer: AsyncEnqueuer
) -> None:
    first, second = symbols(2, partition=1)
    await wake(enqueuer, client, [first, second])
    in_hand = matcher_side.take(1)
    matcher_side.give_back(1, in_hand)
    assert await client.exists(busy_key(1)) == 0
    assert await members(client, 1) == sorted([first, second])
    assert await wake(enqueuer, client, [first]) == 1


async def test_a_holder_processes_what_was_woken_during_its_transaction_in_the_next_round_and_then_releases(
    client: redis.asyncio.Redis, matcher_side: PartitionWakeups, redis_url: str, broker: DoorbellRedisBroker
) -> None:
    first, second, third = symbols(3, partition=4)
    rounds: list[list[str]] = []
    messages_during: list[int] = []

    def process(todo: list[str], deadline: float) -> None:
        rounds.append(todo)
        if len(rounds) == 1:  # commands committed while the first transaction runs
            messages_during.append(wake_elsewhere(redis_url, broker, [second, third]))

    hold_partition(matcher_side, 4, [first], process=process, hand_off=lambda *_: None, hold_s=60)

    assert rounds == [[first], sorted([second, third])]
    assert messages_during == [0]  # held: their wake-up sent no message
    assert await client.exists(busy_key(4), woken_key(4)) == 0  # released once a take found nothing


async def test_a_partition_held_past_hold_s_is_handed_back_to_its_queue_still_held(
    client: redis.asyncio.Redis, matcher_side: PartitionWakeups, redis_url: str, broker: DoorbellRedisBroker
) -> None:
    first, second = symbols(2, partition=5)
    handed: list[tuple[int, list[str]]] = []

    def process(todo: list[str], deadline: float) -> None:
        wake_elsewhere(redis_url, broker, [second])

    hold_partition(
        matcher_side, 5, [first], process=process, hand_off=lambda p, todo: handed.append((p, todo)), hold_s=0
    )

    assert handed == [(5, [second])]
    assert await client.exists(busy_key(5)) == 1  # the handed-off message holds it: no second message meanwhile


async def test_a_failing_holder_gives_back_the_symbols_in_hand_and_releases_the_partition(
    client: redis.asyncio.Redis, matcher_side: PartitionWakeups
) -> None:
    first, second = symbols(2, partition=2)
    await client.sadd(woken_key(2), second)

    def process(todo: list[str], deadline: float) -> None:
        raise ConnectionError("postgres went away")

    with pytest.raises(ConnectionError):
        hold_partition(matcher_side, 2, [first], process=process, hand_off=lambda *_: None, hold_s=60)

    assert await client.exists(busy_key(2)) == 0
    assert await members(client, 2) == sorted([first, second])


@pytest.fixture
def lingering(redis_url: str) -> Iterator[PartitionWakeups]:
    """The matcher's side with a linger long enough that only a ring can end it early."""
    client = redis.Redis.from_url(redis_url)
    yield PartitionWakeups(client, NS, linger_s=5.0)
    client.close()


async def test_a_wake_up_rings_a_held_partition_once_and_a_free_one_not_at_all(
    client: redis.asyncio.Redis, enqueuer: AsyncEnqueuer, matcher_side: PartitionWakeups
) -> None:
    first, second, third = symbols(3, partition=0)
    assert await wake(enqueuer, client, [first]) == 1  # free: a message, no ring
    assert await client.exists(ring_key(0)) == 0

    matcher_side.take(0)
    assert await wake(enqueuer, client, [second]) == 0
    assert await wake(enqueuer, client, [third]) == 0
    assert await client.lrange(ring_key(0), 0, -1) == [b"1"]  # held: rung, one element however many wake-ups

    assert matcher_side.take(0) == sorted([second, third])
    assert await client.exists(ring_key(0)) == 0  # the take clears the ring it answers


async def test_a_lingering_holder_takes_what_is_woken_meanwhile_at_once_and_without_a_message(
    client: redis.asyncio.Redis, lingering: PartitionWakeups, redis_url: str, broker: DoorbellRedisBroker
) -> None:
    [woken] = symbols(1, partition=1)
    lingering.take(1)
    messages: list[int] = []
    waker = threading.Timer(0.2, lambda: messages.append(wake_elsewhere(redis_url, broker, [woken])))
    started = time.monotonic()
    waker.start()

    taken = lingering.linger(1)

    waker.join()
    assert taken == [woken]
    assert time.monotonic() - started < 2.5  # the ring ended the 5 s linger
    assert messages == [0]  # held while lingering: the wake-up sent no message
    assert await client.exists(busy_key(1)) == 1  # still held: the holder goes on with it


async def test_a_lingering_holder_that_gets_nothing_releases_the_partition_after_its_linger(
    client: redis.asyncio.Redis, redis_url: str
) -> None:
    sync_client = redis.Redis.from_url(redis_url)
    wakeups_ = PartitionWakeups(sync_client, NS, linger_s=0.1)
    wakeups_.take(5)
    started = time.monotonic()

    assert wakeups_.take_or_release(5) == []

    assert time.monotonic() - started >= 0.09  # it waited its linger first
    assert await client.exists(busy_key(5), woken_key(5), ring_key(5)) == 0
    sync_client.close()


async def test_a_holder_lingers_after_a_drain_that_took_nothing_and_goes_on_with_what_came(
    client: redis.asyncio.Redis, lingering: PartitionWakeups, redis_url: str, broker: DoorbellRedisBroker
) -> None:
    first, second = symbols(2, partition=6)
    rounds: list[list[str]] = []

    def process(todo: list[str], deadline: float) -> list[str]:
        rounds.append(todo)
        # Lingering, this take keeps the partition when it finds nothing.
        taken = take_after_commit(lingering, broker, 6)
        if len(rounds) == 1:
            threading.Timer(0.2, wake_elsewhere, (redis_url, broker, [second])).start()  # during the linger
        return taken

    lingering.linger_s = 1.0  # the second linger gets nothing: released after it
    hold_partition(lingering, 6, [first], process=process, hand_off=lambda *_: None, hold_s=60)

    assert rounds == [[first], [second]]
    assert await client.exists(busy_key(6), woken_key(6), ring_key(6)) == 0


@pytest.fixture
async def named(redis_url: str, broker: DoorbellRedisBroker) -> AsyncIterator[tuple[str, AsyncEnqueuer]]:
    """An enqueuer whose wake-up connection Redis lists under a name of its own (to find it, or count it)."""
    name = f"quiet-{uuid.uuid4().hex[:8]}"
    client = redis.asyncio.Redis.from_url(redis_url, client_name=name)
    enqueuer = AsyncEnqueuer(broker, client)
    yield name, enqueuer
    await enqueuer.close()
    await client.aclose()


async def unanswered(enqueuer: AsyncEnqueuer) -> asyncio.StreamReader:
    """The reader of ``enqueuer``'s wake-up connection, once anything Redis might have sent on it has arrived."""
    await asyncio.sleep(0.05)
    reader = enqueuer._quiet._connection._reader
    assert reader is not None
    return reader


async def test_redis_answers_nothing_on_the_wake_up_connection(
    client: redis.asyncio.Redis, enqueuer: AsyncEnqueuer
) -> None:
    woken = symbols(20)
    for name in woken:
        await wake(enqueuer, client, [name])
    assert sorted(sent(cast(DoorbellRedisBroker, enqueuer._broker))) == sorted(
        {partition_of(s, PARTITIONS): s for s in reversed(woken)}.values()
    )  # the first wake-up of each partition queued a message, the rest found it held
    reader = await unanswered(enqueuer)
    assert not reader.at_eof()
    assert len(reader._buffer) == 0  # twenty scripts and their fences, not one byte of answer


async def test_a_wake_up_after_redis_closed_its_connection_connects_again_and_is_not_lost(
    client: redis.asyncio.Redis, broker: DoorbellRedisBroker, named: tuple[str, AsyncEnqueuer]
) -> None:
    name, enqueuer = named
    first, second = symbols(2, distinct=True)
    assert await wake(enqueuer, client, [first]) == 1
    for connection in await client.client_list():
        if connection["name"] == name:  # what a restart of Redis does to it
            await client.client_kill_filter(_id=connection["id"])
    await asyncio.sleep(0.05)

    assert await wake(enqueuer, client, [second]) == 1
    assert sorted(sent(broker)) == sorted([first, second])
    assert len((await unanswered(enqueuer))._buffer) == 0  # the new connection answers nothing either


async def test_concurrent_first_wake_ups_share_one_connection_and_all_arrive(
    client: redis.asyncio.Redis, broker: DoorbellRedisBroker, named: tuple[str, AsyncEnqueuer]
) -> None:
    name, enqueuer = named
    woken = symbols(8, distinct=True)
    await asyncio.gather(*(wake_async(enqueuer, [s], PARTITIONS) for s in woken))  # none connected yet
    assert await wake(enqueuer, client, []) == 0  # the fence: everything before it has run
    assert sorted(sent(broker)) == sorted(woken)
    assert [c["name"] for c in await client.client_list()].count(name) == 1


async def test_wake_ups_while_redis_stalls_wait_as_one_set_of_symbols_not_a_task_each(
    broker: DoorbellRedisBroker, client: redis.asyncio.Redis
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel does), never answers
        stalled = redis.asyncio.Redis(
            host="127.0.0.1", port=silent.getsockname()[1], socket_timeout=0.5, socket_connect_timeout=0.5
        )
        enqueuer = AsyncEnqueuer(broker, stalled)
        woken = symbols(50)
        for symbol in woken:  # one group commit's wake-up each, as they come while the first send stalls
            batches.wake_soon(enqueuer, [symbol], PARTITIONS)
            await asyncio.sleep(0)

        waking = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_send_woken"]  # type: ignore[union-attr]
        assert len(waking) == 1
        assert len(batches._waking[enqueuer].symbols) == 49  # the first is being sent
        waking[0].cancel()
        await asyncio.gather(*waking, return_exceptions=True)
        await stalled.aclose()


async def test_wake_ups_merged_while_one_is_sent_all_reach_their_partitions(
    enqueuer: AsyncEnqueuer, broker: DoorbellRedisBroker
) -> None:
    woken = symbols(20)
    for symbol in woken:
        batches.wake_soon(enqueuer, [symbol], PARTITIONS)
    while batches._waking[enqueuer].task is not None:
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + 5
    while sorted(sent(broker)) != sorted(woken) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)

    assert sorted(sent(broker)) == sorted(woken)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        await asyncio.sleep(0.01)


async def test_a_symbol_scheduled_again_and_again_is_woken_once_when_due_with_the_symbols_due_with_it(
    broker: DoorbellRedisBroker,
) -> None:
    first, second = symbols(2, partition=2)
    [other] = symbols(1, partition=5)
    retries = RetryWakeups(lambda names: wakeups.wake(broker, names, PARTITIONS))
    at = time.monotonic() + 0.3
    for _ in range(5):  # a flapping symbol: its result says when its backoff ends after every failure
        for symbol in (first, second, other):
            retries.schedule(symbol, at)

    await asyncio.sleep(0.15)
    assert messages_queued(broker) == 0  # not before its backoff ends
    await until(lambda: messages_queued(broker) == 2)
    assert time.monotonic() >= at  # queued when the backoff ended, not before (until() returns once they are)
    await asyncio.sleep(0.2)  # a second message, were there one, would be queued by now
    assert [sorted(m.args) for m in queued(broker, 2)] == [sorted([first, second])]  # one wake-up per partition
    assert [m.args for m in queued(broker, 5)] == [(other,)]
    assert retries.scheduled() == {}


async def test_a_symbol_scheduled_later_is_woken_only_then(broker: DoorbellRedisBroker) -> None:
    [symbol] = symbols(1)
    retries = RetryWakeups(lambda names: wakeups.wake(broker, names, PARTITIONS))
    retries.schedule(symbol, time.monotonic() + 0.1)
    later = time.monotonic() + 0.5
    retries.schedule(symbol, later)  # it failed again: a longer backoff

    await until(lambda: messages_queued(broker) == 1)
    assert time.monotonic() >= later
    assert sent(broker) == [symbol]


async def test_the_matchers_wake_up_of_a_held_partition_adds_the_symbol_to_its_set_and_rings_without_a_message(
    client: redis.asyncio.Redis, broker: DoorbellRedisBroker
) -> None:
    [symbol] = symbols(1, partition=4)
    await client.set(busy_key(4), b"1", px=5000)  # a matcher holds the partition

    wakeups.wake(broker, [symbol], PARTITIONS)

    assert sent(broker) == []
    assert await members(client, 4) == [symbol]  # for the holder's next take
    assert await client.llen(ring_key(4)) == 1  # and its linger, if it waits


async def test_a_wake_up_after_a_backoff_that_fails_is_dropped_and_the_next_one_still_sent(
    broker: DoorbellRedisBroker, tmp_path: Path
) -> None:
    lost, next_one = symbols(2)
    unreachable = DoorbellRedisBroker(  # type: ignore[no-untyped-call]
        client=redis.Redis(unix_socket_path=str(tmp_path / "gone.sock")), namespace=NS
    )
    reaching = [unreachable]  # Redis unreachable for the first wake-up, back for the next
    retries = RetryWakeups(lambda names: wakeups.wake(reaching[0], names, PARTITIONS))
    retries.schedule(lost, time.monotonic())
    await until(lambda: retries.scheduled() == {})
    await asyncio.sleep(0.1)  # the failed wake-up has run by now (or the next one would find it due)

    reaching[0] = broker
    retries.schedule(next_one, time.monotonic())

    await until(lambda: messages_queued(broker) == 1)
    assert sent(broker) == [next_one]  # the lost symbol is the sweeper's (its commands are in Postgres)

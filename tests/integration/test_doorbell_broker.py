"""The doorbell broker: an idle dramatiq consumer wakes when a message is enqueued instead of sleeping out its
idle timeout, and nothing dramatiq does (fetch, ack, delayed messages) changes."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
import redis.asyncio

from exchange.embedded import EmbeddedRedis
from exchange.messaging import broker as messaging_broker
from exchange.messaging.broker import (
    AsyncEnqueuer,
    DoorbellRedisBroker,
    Guard,
    doorbell_key,
    make_broker,
    queue_ring,
)
from exchange.observability.context import request_id_var
from exchange.observability.propagation import REQUEST_ID_OPTION, RequestIdMiddleware
from tests.integration.redis_support import namespaced_broker, redis_test_url

IDLE_TIMEOUT_MS = 30_000
"""Far longer than any wake-up may take: a consumer that returns well before it was woken, not timed out."""


@pytest.fixture
def broker() -> Iterator[DoorbellRedisBroker]:
    with namespaced_broker(DoorbellRedisBroker) as broker:
        yield broker


def message(queue: str) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=queue, actor_name="noop", args=(1,), kwargs={}, options={})


def next_message(consumer: Any, deadline_s: float) -> Any:
    """Call the consumer like dramatiq's consumer thread does (``None`` = nothing yet, call again)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        got = next(consumer)
        if got is not None:
            return got
    return None


def ring_an_idle_consumer(
    broker: DoorbellRedisBroker,
    consumer: Any,
    queue: str,
    *,
    idle_s: float,
    while_idle: Callable[[], None],
    send: Callable[[dramatiq.Message[Any]], dramatiq.Message[Any]] | None = None,
) -> Any:
    """Let ``consumer`` go idle (it must still be waiting for the doorbell after ``idle_s``; ``while_idle`` checks
    more), enqueue a message (``send``, default the broker's enqueue), and return it as the woken consumer receives
    it."""
    idle_wait = threading.Thread(target=lambda: next(consumer))
    idle_wait.start()
    idle_wait.join(timeout=idle_s)
    assert idle_wait.is_alive(), "an idle consumer returned to poll again instead of waiting for the doorbell"
    while_idle()
    sent = (send or broker.enqueue)(message(queue))
    idle_wait.join(timeout=IDLE_TIMEOUT_MS / 1000 / 2)
    assert not idle_wait.is_alive(), "the consumer slept through the ring"
    received = next_message(consumer, 10)
    assert received.message_id == sent.message_id
    return received


def test_an_idle_consumer_blocks_until_a_message_is_enqueued_instead_of_polling(broker: DoorbellRedisBroker) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    consumer = broker.consume(queue, prefetch=4, timeout=IDLE_TIMEOUT_MS)
    # One empty fetch, then the wait.
    received = ring_an_idle_consumer(broker, consumer, queue, idle_s=1.0, while_idle=lambda: None)
    consumer.ack(received)
    consumer.close()


def test_a_ring_nobody_heard_makes_the_next_idle_wait_return_at_once_and_is_used_up(
    broker: DoorbellRedisBroker,
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    for _ in range(2):  # rings do not pile up: one is kept
        with broker.client.pipeline(transaction=False) as pipe:
            queue_ring(pipe, broker.namespace, queue)
            pipe.execute()
    assert broker.client.llen(doorbell_key(broker.namespace, queue)) == 1
    consumer = broker.consume(queue, prefetch=4, timeout=IDLE_TIMEOUT_MS)
    started = time.monotonic()
    assert next(consumer) is None  # nothing queued; the kept ring ends the wait
    assert time.monotonic() - started < IDLE_TIMEOUT_MS / 1000 / 2
    assert broker.client.llen(doorbell_key(broker.namespace, queue)) == 0
    consumer.close()


def test_a_delayed_message_rings_nobody_and_still_arrives_through_the_delay_queue(
    broker: DoorbellRedisBroker,
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    sent = broker.enqueue(message(queue), delay=10)
    assert broker.client.llen(doorbell_key(broker.namespace, queue)) == 0
    delayed = broker.consume(sent.queue_name, prefetch=4, timeout=100)
    got = next_message(delayed, 10)
    assert got is not None
    assert got.message_id == sent.message_id
    delayed.ack(got)
    delayed.close()


def test_a_consumer_whose_fetch_drained_the_queue_waits_for_a_ring_before_fetching_again(
    broker: DoorbellRedisBroker,
) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    fetches: list[int] = []
    real_fetch = broker.do_fetch

    def counting_fetch(queue_name: str, count: int) -> Any:
        fetches.append(count)
        return real_fetch(queue_name, count)

    broker.do_fetch = counting_fetch  # the real fetch still runs; only the calls are counted
    consumer = broker.consume(queue, prefetch=4, timeout=IDLE_TIMEOUT_MS)
    received = []
    for n in range(2):

        def fetched_once_per_message(expected: int = 1 if n == 0 else 2) -> None:
            assert len(fetches) == expected, "a drained consumer fetched again before any ring"

        received.append(ring_an_idle_consumer(broker, consumer, queue, idle_s=0.5, while_idle=fetched_once_per_message))
    assert len(fetches) == 3  # one empty look at the start, then one fetch per message: no empty fetch after each
    for got in received:
        consumer.ack(got)
    consumer.close()


def enqueue_from_an_event_loop(
    broker: DoorbellRedisBroker, messages: list[dramatiq.Message[Any]], *, redis_url: str | None = None
) -> list[dramatiq.Message[Any]]:
    """What the api does: :meth:`AsyncEnqueuer.ring_all` on an asyncio client of its own, in a running event loop,
    each message behind a guard whose flag is free (so each is enqueued). Returns ``messages`` (the enqueued copies
    keep their ``message_id``) once Redis has run the scripts, which it does not answer."""

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_url or redis_test_url())
        enqueuer = AsyncEnqueuer(broker, client)
        flags = [f"{broker.namespace}:free-flag:{uuid.uuid4().hex}" for _ in messages]
        try:
            request_id_var.set("req-from-the-loop")
            await enqueuer.ring_all(messages, [Guard(None, (), flag, 60_000) for flag in flags])
            deadline = time.monotonic() + 10
            while await client.exists(*flags) < len(flags) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the scripts were written on a connection Redis does not answer
            assert await client.exists(*flags) == len(flags), "the guarded enqueues did not run"
        finally:
            await enqueuer.close()
            await client.aclose()

    asyncio.run(run())
    return messages


@pytest.mark.parametrize("from_event_loop", [False, True], ids=["broker.enqueue", "AsyncEnqueuer"])
def test_an_enqueued_message_wakes_an_idle_consumer_and_went_through_the_enqueue_hooks(
    broker: DoorbellRedisBroker, from_event_loop: bool
) -> None:
    broker.add_middleware(RequestIdMiddleware())
    queue = f"q-{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    consumer = broker.consume(queue, prefetch=4, timeout=IDLE_TIMEOUT_MS)

    def send(sent: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
        if from_event_loop:
            return enqueue_from_an_event_loop(broker, [sent])[0]
        token = request_id_var.set("req-from-the-loop")
        try:
            return broker.enqueue(sent)
        finally:
            request_id_var.reset(token)

    received = ring_an_idle_consumer(broker, consumer, queue, idle_s=0.5, while_idle=lambda: None, send=send)
    assert received.args == (1,)
    assert received.options[REQUEST_ID_OPTION] == "req-from-the-loop"
    assert broker.client.llen(doorbell_key(broker.namespace, queue)) == 0  # the one ring was heard, none was left over
    consumer.ack(received)
    consumer.close()


def test_one_call_enqueues_every_message_on_its_own_queue_in_order_and_rings_each_queue(
    broker: DoorbellRedisBroker,
) -> None:
    first, second = (f"q-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for queue in (first, second):
        broker.declare_queue(queue)
    messages = [message(first), message(second), message(first)]
    enqueued = enqueue_from_an_event_loop(broker, messages)
    assert [broker.client.llen(doorbell_key(broker.namespace, queue)) for queue in (first, second)] == [1, 1]
    received = []
    for queue, expected in ((first, [enqueued[0], enqueued[2]]), (second, [enqueued[1]])):
        consumer = broker.consume(queue, prefetch=4, timeout=100)
        got = [next_message(consumer, 10) for _ in expected]
        assert [m.message_id for m in got] == [m.message_id for m in expected]
        received += got
        for m in got:
            consumer.ack(m)
        assert broker.do_qsize(queue) == 0
        consumer.close()
    assert len({m.options["redis_message_id"] for m in received}) == 3  # each enqueue its own id, as dramatiq's


@pytest.mark.parametrize("from_event_loop", [False, True], ids=["broker.enqueue", "AsyncEnqueuer"])
def test_a_redis_that_never_saw_dramatiqs_script_is_sent_it_and_the_message_is_enqueued(
    tmp_path: Path, from_event_loop: bool
) -> None:
    server = EmbeddedRedis(tmp_path)  # a fresh server: no script loaded yet, and nothing shared with other tests
    url = server.start()
    try:
        broker = DoorbellRedisBroker(url=url)  # type: ignore[no-untyped-call]  # dramatiq leaves __init__ untyped
        assert broker.client.script_exists(broker.scripts["dispatch"].sha) == [False]
        if from_event_loop:
            [sent] = enqueue_from_an_event_loop(broker, [message("fresh")], redis_url=url)
        else:
            sent = broker.enqueue(message("fresh"))
        consumer = broker.consume("fresh", prefetch=1, timeout=100)
        got = next_message(consumer, 10)
        assert got is not None
        assert got.message_id == sent.message_id
        consumer.ack(got)
        consumer.close()
        broker.close()
    finally:
        server.stop()


def test_a_stalled_redis_fails_the_brokers_calls_after_the_socket_timeout_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker the processes use (:func:`~exchange.messaging.broker.make_broker`) gives up on a Redis that stopped
    answering (dramatiq, given a URL, would build its own client without the timeout and wait forever), and a
    consumer's ack that meets the stall raises dramatiq's ``ConnectionClosed``, on which the worker retries it
    (not an error dramatiq reports as its own bug)."""
    monkeypatch.setattr(messaging_broker, "SOCKET_TIMEOUT_S", 0.5)
    server = EmbeddedRedis(tmp_path)  # a server of its own, to stop
    broker = make_broker(server.start(), partitions=1, namespace="exchange-test")
    broker.declare_queue("stall")
    broker.enqueue(message("stall"))
    consumer = broker.consume("stall", prefetch=1, timeout=100)
    taken = next_message(consumer, 10)
    assert taken is not None

    def outcome_of(call: Callable[[], object]) -> BaseException | None:
        """What ``call`` raised (None: it returned), or a failure if it still waits after 5 s."""
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                call()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        caller = threading.Thread(target=run, daemon=True)
        caller.start()
        caller.join(5)
        assert outcome, "the call still waits on the stalled Redis"
        return outcome[0]

    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        assert isinstance(outcome_of(broker.client.ping), redis.TimeoutError)
        assert isinstance(outcome_of(lambda: consumer.ack(taken)), dramatiq.ConnectionClosed)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        consumer.close()
        broker.close()
        server.stop()

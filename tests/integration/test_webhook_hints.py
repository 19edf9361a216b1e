"""A webhook worker process holds the hint key while events keep coming: hints ring it instead of sending dramatiq
messages (exchange.webhooks.queue.HintHolder; real Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from exchange.messaging.broker import DoorbellRedisBroker
from exchange.messaging.partitions import WEBHOOK_QUEUE
from exchange.webhooks.queue import (
    _RELEASE_SCRIPT,
    HINT_TTL_MS,
    HintHolder,
    enqueue_deliveries,
    hint_key,
    ring_key,
    send_fan_out,
)
from tests.integration.redis_support import namespaced_broker

IDLE_S = 0.3


@pytest.fixture
def broker() -> Iterator[DoorbellRedisBroker]:
    with namespaced_broker(DoorbellRedisBroker) as broker:
        broker.declare_queue(WEBHOOK_QUEUE)
        yield broker


class Wakes:
    """The holder's ``wake``: counts calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.count = 0
        self._woken = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self._woken.set()

    def wait(self, timeout_s: float = 2.0) -> bool:
        woken = self._woken.wait(timeout_s)
        self._woken.clear()
        return woken


@pytest.fixture
def holder(broker: DoorbellRedisBroker) -> Iterator[tuple[HintHolder, Wakes]]:
    wakes = Wakes()
    holder = HintHolder(broker, wakes, idle_s=IDLE_S)
    holder.start()
    yield holder, wakes
    holder.stop()


def queued(broker: DoorbellRedisBroker) -> int:
    return int(broker.client.llen(f"{broker.namespace}:{WEBHOOK_QUEUE}"))


def take_the_hint(broker: DoorbellRedisBroker, holder: HintHolder) -> None:
    """What the ``deliver`` actor does with the message a first hint sent."""
    assert enqueue_deliveries(broker, ["a"]) == 1
    broker.client.delete(f"{broker.namespace}:{WEBHOOK_QUEUE}")  # taken off the queue by dramatiq's consumer
    holder.hold()


def test_a_hint_while_a_worker_holds_the_key_wakes_its_pump_without_a_message(
    broker: DoorbellRedisBroker, holder: tuple[HintHolder, Wakes]
) -> None:
    hints, wakes = holder
    take_the_hint(broker, hints)
    for event in ("b", "c", "d"):
        assert enqueue_deliveries(broker, [event]) == 0
        assert wakes.wait(), "a ring did not wake the pump"
    assert queued(broker) == 0
    assert hints.holding


def test_a_holder_keeps_the_key_armed_while_hints_keep_coming(
    broker: DoorbellRedisBroker, holder: tuple[HintHolder, Wakes]
) -> None:
    hints, wakes = holder
    take_the_hint(broker, hints)
    deadline = time.monotonic() + 2.5 * HINT_TTL_MS / 1000  # well past the key's TTL
    while time.monotonic() < deadline:
        assert enqueue_deliveries(broker, ["e"]) == 0, "the key expired under a live holder"
        time.sleep(IDLE_S / 3)
    assert queued(broker) == 0
    assert wakes.count > 0


def test_a_holder_releases_the_key_after_its_idle_time_and_the_next_hint_sends_a_message(
    broker: DoorbellRedisBroker, holder: tuple[HintHolder, Wakes]
) -> None:
    hints, _ = holder
    take_the_hint(broker, hints)
    deadline = time.monotonic() + 5
    while hints.holding and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not hints.holding
    assert not broker.client.exists(hint_key(broker))
    assert enqueue_deliveries(broker, ["f"]) == 1
    assert queued(broker) == 1


def test_the_release_keeps_the_key_when_a_ring_came_before_it(broker: DoorbellRedisBroker) -> None:
    release = broker.client.register_script(_RELEASE_SCRIPT)
    keys = [hint_key(broker), ring_key(broker)]
    broker.client.set(keys[0], "1", px=100)
    broker.client.lpush(keys[1], "1")

    assert release(keys=keys, args=[HINT_TTL_MS]) == 0  # kept, re-armed, the ring taken
    assert broker.client.pttl(keys[0]) > 100
    assert not broker.client.exists(keys[1])
    assert release(keys=keys, args=[HINT_TTL_MS]) == 1  # nothing rang since: released
    assert not broker.client.exists(keys[0])


def test_a_fan_out_hint_is_sent_while_the_key_is_held(broker: DoorbellRedisBroker) -> None:
    assert enqueue_deliveries(broker, ["a"]) == 1
    send_fan_out(broker)
    assert queued(broker) == 2


def test_a_stopped_holder_releases_the_key(broker: DoorbellRedisBroker) -> None:
    hints = HintHolder(broker, Wakes(), idle_s=60.0)
    hints.start()
    take_the_hint(broker, hints)
    hints.stop(timeout_s=0.1)
    assert not broker.client.exists(hint_key(broker))
    assert enqueue_deliveries(broker, ["g"]) == 1  # the next hint goes to a live worker at once

"""Hints on the ``webhooks`` queue: a ``deliver`` message only says "webhook events are due".

The worker that takes one claims due events from Postgres in batches until none is left (see
:mod:`exchange.webhooks.pump`), so duplicates, losses and reordering of hints change when events are delivered,
never whether; the sweeper hints about events left overdue.

Hints are coalesced like matcher wake-ups (:mod:`exchange.messaging.wakeups`): one is sent only when
``SET <due key> NX PX <ttl>`` succeeds, so a burst of commits costs one message; the ``SET`` and the enqueue are one
script (:class:`~exchange.messaging.broker.Guard`), so a hint costs one round trip, or none of its own in the
matcher's pipeline (:func:`add_hint`), and the key is never set without its message. A hint that finds the key held
rings ``<due key>:ring`` instead (a one-element list).

The worker process that takes a hint *holds* the key (:class:`HintHolder`): it wakes its pump, and until it releases
the key it waits on the ring and wakes its pump again for every ring, re-arming the key, so that while events keep
coming they cost no dramatiq message at all (the enqueue, the consumer's fetch script, the hand-over to a worker
thread, the ack). It releases the key after ``HOLD_IDLE_S`` without a ring, in one script that releases only if the
ring is still empty. Why no committed event is left without a hint: an event is committed before its hint runs; the
hint either sends a message (key free) or rings (key held); a ring is popped by the holder, which then wakes its pump,
whose next claim starts after the wake and so sees the event; a holder releases only with the ring empty, and a hint
after the release finds the key free. A holder that dies leaves the key to expire (``HINT_TTL_MS``; a live one
re-arms it at least every ``HOLD_IDLE_S``); hints that rang it meanwhile are covered by the next hint's claim, which
takes every due event, or by the sweeper.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from uuid import UUID

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from exchange.messaging.broker import DoorbellRedisBroker, Guard
from exchange.messaging.partitions import WEBHOOK_QUEUE
from exchange.messaging.wakeups import BrokerLike

log = logging.getLogger("exchange.webhooks")

DELIVER_ACTOR = "deliver"
HINT_TTL_MS = 1000
HOLD_IDLE_S = 0.25
"""A holder releases the key after this long without a ring (and re-arms it at least this often while it holds)."""
REDIS_ERROR_PAUSE_S = 1.0


def hint_key(broker: RedisBroker) -> str:
    """The coalescing key of ``broker``'s queues (in its namespace, so separate exchanges never share it)."""
    namespace: str = broker.namespace
    return f"{namespace}:webhooks-due"


def overdue_hint_key(broker: RedisBroker) -> str:
    """When the sweeper last hinted about overdue events (the database's time, ISO 8601; expires after a period):
    see :func:`exchange.sweeper.hint_overdue`."""
    return f"{broker.namespace}:webhooks-overdue-hinted"


def ring_key(broker: RedisBroker) -> str:
    """Rung by a hint that found the key held: the holder wakes its pump for it."""
    return f"{hint_key(broker)}:ring"


def deliver_message() -> dramatiq.Message[object]:
    return dramatiq.Message(queue_name=WEBHOOK_QUEUE, actor_name=DELIVER_ACTOR, args=(), kwargs={}, options={})


def enqueue_deliveries(broker: BrokerLike, event_ids: Iterable[UUID | str], *, delay_ms: int | None = None) -> int:
    """After the transaction that made ``event_ids`` due committed: send at most ONE hint (none when there are
    no events, or a coalesced hint is already pending). ``delay_ms``: send it that much later, uncoalesced.
    Returns the number of messages sent (0 or 1)."""
    if next(iter(event_ids), None) is None:
        return 0
    if delay_ms is None and isinstance(broker, DoorbellRedisBroker):
        return send_hint(broker)
    broker.enqueue(deliver_message(), delay=delay_ms)
    return 1


def send_hint(broker: DoorbellRedisBroker) -> int:
    """Enqueue a ``deliver`` hint unless one is already pending (see the module docstring), in one round trip.
    Returns 0 or 1."""
    with broker.client.pipeline(transaction=False) as pipe:
        hint = add_hint(pipe, broker)
        (reply,) = pipe.execute(raise_on_error=False)
    return int(broker.guarded_sent(hint, reply))


def add_hint(pipe: redis.client.Pipeline, broker: DoorbellRedisBroker) -> dramatiq.Message[object]:
    """Add the coalesced hint to ``pipe`` (the matcher's: one round trip with the results it publishes after its
    commit). Pass what this returns and the script's reply to ``broker.guarded_sent``: whether it was sent (False:
    one was pending)."""
    guard = Guard(set_key=None, members=(), flag=hint_key(broker), ttl_ms=HINT_TTL_MS, ring=ring_key(broker))
    return broker.add_guarded(pipe, deliver_message(), guard)


def send_fan_out(broker: BrokerLike) -> None:
    """A hint for the other worker processes, sent whether or not the key is held: a pump with no room left asks,
    and the key is most likely its own process's (a guarded hint would only ring its own holder)."""
    broker.enqueue(deliver_message())


# Release the key unless a ring arrived since the holder last looked (then keep it, re-armed): 1 released, 0 kept.
_RELEASE_SCRIPT = """
if redis.call('LPOP', KEYS[2]) then
    redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
    return 0
end
redis.call('DEL', KEYS[1])
return 1
"""


class HintHolder:
    """A worker process's hold on the hint key (see the module docstring): :meth:`hold` when a ``deliver`` message
    is taken; a thread of its own then waits on the ring and calls ``wake`` for every ring, until the key is
    released after :data:`HOLD_IDLE_S` without one. Several processes may hold at once (a fan-out hint, a key that
    expired): they share the rings, and the first to release lets the next hint send a message."""

    def __init__(self, broker: RedisBroker, wake: Callable[[], None], *, idle_s: float = HOLD_IDLE_S) -> None:
        self._client: redis.Redis = broker.client
        self._keys = [hint_key(broker), ring_key(broker)]
        self._release = self._client.register_script(_RELEASE_SCRIPT)
        self._wake = wake
        self.idle_s = idle_s
        self._changed = threading.Condition()
        self._holding = False
        self._stopped = False
        self._thread = threading.Thread(target=self._listen, name="webhook-hints", daemon=True)

    @property
    def holding(self) -> bool:
        return self._holding

    def start(self) -> None:
        self._thread.start()

    def hold(self) -> None:
        """A hint was taken: hold the key (its sender set it) and listen to the ring."""
        with self._changed:
            self._holding = True
            self._changed.notify()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop listening and release the key if held, so that the next hint goes to a live worker at once."""
        with self._changed:
            self._stopped = True
            held, self._holding = self._holding, False
            self._changed.notify()
        if held:
            with contextlib.suppress(redis.RedisError):
                self._client.delete(self._keys[0])
        if self._thread.ident is not None:  # started (a worker stopping before its boot never started it)
            self._thread.join(self.idle_s + 1.0 if timeout_s is None else timeout_s)

    def _listen(self) -> None:
        flag, ring = self._keys
        rearmed = 0.0
        while True:
            with self._changed:
                while not (self._holding or self._stopped):
                    self._changed.wait()
                if self._stopped:
                    return
            try:
                if self._client.blpop([ring], timeout=self.idle_s) is not None:
                    self._wake()
                    if time.monotonic() - rearmed >= self.idle_s:
                        self._client.set(flag, "1", px=HINT_TTL_MS)
                        rearmed = time.monotonic()
                    continue
                with self._changed:  # one decision at a time with hold(): a hint taken now is not lost
                    if self._stopped:
                        return
                    released = self._release(keys=self._keys, args=[HINT_TTL_MS]) == 1
                    if released:
                        self._holding = False
                rearmed = time.monotonic()
                if not released:
                    self._wake()  # a ring came between the wait and the release
            except redis.RedisError:  # Redis down: a restarted one has no key; hints then send messages again
                log.warning("webhook hint listener: Redis failed; retrying in %g s", REDIS_ERROR_PAUSE_S, exc_info=True)
                time.sleep(REDIS_ERROR_PAUSE_S)

"""Coalesced wake-ups: tell a partition's matcher "these symbols have work", with at most one message per partition
in flight, so that work arriving while a partition is busy accumulates into its next transaction.

Two Redis keys per partition (under the exchange's namespace, :mod:`exchange.messaging.names`):
``<namespace>:wake:<n>:symbols``, the set of symbols woken since the partition's matcher
last took it, and ``<namespace>:wake:<n>:busy``, a flag (with a TTL) saying a matcher holds the partition. After its
commit the api adds the symbols to the set, sets the flag ``NX`` and, only when the flag was free, enqueues a
message ``match_<n>(*symbols)``, all in ONE script (one round trip; a flag is never held without its message). The
matcher takes the set (and re-arms the flag) before it reads the command log, drains those symbols, and then
atomically either takes what was added meanwhile and goes on, or, if nothing was, clears the flag and stops. A
matcher may linger before it stops: a wake-up that finds the flag held also rings ``<namespace>:wake:<n>:ring`` (a
one-element list), on which the holder waits a few milliseconds (``EXCHANGE_MATCHER_LINGER_MS``) for work that
then costs no message; the take clears the ring with the set it rang for.

Why no command is left without a wake-up: a command is committed before its symbol is added. If the api's ``SET NX``
succeeded, its message names the symbol. If it failed, a matcher held the flag and the symbol is in the set, and the
holder takes the set again before it may clear the flag (the take and the clear are one script), so it processes the
symbol after the command was committed. A holder that dies leaves its flag to expire (``WAKE_TTL_MS``); the symbols
it had taken are re-nudged by the sweeper, which wakes symbols with old pending commands with a plain message.

The matcher wakes symbols itself in one case: one it left pending for a backoff after its processing failed
(:attr:`exchange.matching.service.BookCache.failing`) is woken when the backoff ends (:class:`RetryWakeups`, with
:func:`wake`: the api's wake-up, coalesced the same way), not when the sweeper next finds its commands old.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import dramatiq
import redis

from exchange.messaging.broker import AsyncEnqueuer, DoorbellRedisBroker, Guard
from exchange.messaging.partitions import matching_actor, matching_queue, partition_of

log = logging.getLogger("exchange.messaging")

WAKE_TTL_MS = 500
"""How long a partition's flag outlives its last renewal: a matcher renews it every time it takes the set, so only
a matcher that died (or stalled this long in one transaction) lets it expire. It bounds how long wake-ups of a
partition stay suppressed after its matcher was killed."""


def wake_key_pattern(namespace: str) -> str:
    """A ``SCAN`` pattern matching every wake-up key of ``namespace`` (and no other exchange's)."""
    return f"{namespace}:wake:*"


def woken_key(namespace: str, partition: int) -> str:
    """The set of symbols of ``partition`` woken since its matcher last took them."""
    return f"{namespace}:wake:{partition}:symbols"


def busy_key(namespace: str, partition: int) -> str:
    """Set while a matcher holds ``partition`` (its message is queued or being processed)."""
    return f"{namespace}:wake:{partition}:busy"


def ring_key(namespace: str, partition: int) -> str:
    """Rung by a wake-up that found ``partition`` held: its holder, lingering after a drain, takes the set at once."""
    return f"{namespace}:wake:{partition}:ring"


class BrokerLike(Protocol):
    def enqueue(self, message: dramatiq.Message[object], *, delay: int | None = None) -> object: ...


def partition_message(partition: int, symbols: Sequence[str]) -> dramatiq.Message[object]:
    """One message asking ``partition``'s matcher to process ``symbols`` (each must map to ``partition``) and
    whatever else has been woken on the partition by then."""
    return dramatiq.Message(
        queue_name=matching_queue(partition),
        actor_name=matching_actor(partition),
        args=tuple(symbols),
        kwargs={},
        options={},
    )


def group_by_partition(symbols: Iterable[str], partitions: int) -> dict[int, list[str]]:
    """The distinct ``symbols`` by partition, each list in first-seen order."""
    groups: dict[int, list[str]] = {}
    for symbol in dict.fromkeys(symbols):
        groups.setdefault(partition_of(symbol, partitions), []).append(symbol)
    return groups


def send_wakeups(broker: BrokerLike, symbols: Iterable[str], partitions: int) -> None:
    """Unconditionally enqueue ONE match message per partition naming its ``symbols`` (the sweeper): a duplicate
    only finds less to do. One per partition, not per symbol: when a matcher falls behind, every symbol of its
    partition goes stale together, and a message each (dozens a sweep) only split its work into more, smaller
    transactions on its other threads."""
    for partition, names in group_by_partition(symbols, partitions).items():
        broker.enqueue(partition_message(partition, names))


async def wake_async(enqueuer: AsyncEnqueuer, symbols: Iterable[str], partitions: int) -> None:
    """Wake ``symbols`` (their commands are committed) from an async caller (the api), in ONE write that Redis does
    not answer (:meth:`~exchange.messaging.broker.AsyncEnqueuer.ring_all`): for each partition, one script adds its
    symbols to the partition's set, tries its flag and, only when the flag was free, enqueues a message naming them
    (:class:`~exchange.messaging.broker.Guard`). Returns once the scripts are written, not run.

    A partition's flag is thus never set without its message, nor its message sent without its flag: if Redis
    fails, each partition's wake-up happened whole or not at all, and the sweeper re-nudges the symbols of a
    partition it did not reach (their commands are durable)."""
    groups = list(group_by_partition(symbols, partitions).items())
    if not groups:
        return
    messages = [partition_message(partition, names) for partition, names in groups]
    ns = await enqueuer.known_namespace()
    await enqueuer.ring_all(messages, [_wake_guard(ns, partition, names) for partition, names in groups])


def wake(broker: DoorbellRedisBroker, symbols: Iterable[str], partitions: int) -> None:
    """:func:`wake_async` from a synchronous caller (the matcher's :class:`RetryWakeups`): the same script per
    partition, so a held partition gets its symbols added and its ring rung, a free one a message naming them; all in
    ONE round trip, answered. Raises when Redis fails (each partition's wake-up then happened whole or not at all)."""
    groups = group_by_partition(symbols, partitions)
    if not groups:
        return
    ns = broker.namespace
    with broker.client.pipeline(transaction=False) as pipe:
        stamped = [
            broker.add_guarded(pipe, partition_message(partition, names), _wake_guard(ns, partition, names))
            for partition, names in groups.items()
        ]
        replies = pipe.execute(raise_on_error=False)
    for message, reply in zip(stamped, replies, strict=True):
        broker.guarded_sent(message, reply)


def _wake_guard(namespace: str, partition: int, names: Sequence[str]) -> Guard:
    """What a wake-up of ``names`` on ``partition`` goes through (see the module): their set, its flag, its ring."""
    return Guard(
        woken_key(namespace, partition),
        names,
        busy_key(namespace, partition),
        WAKE_TTL_MS,
        ring=ring_key(namespace, partition),
    )


class RetryWakeups:
    """Wake-ups at given times, sent by a thread of their own: the matcher's, for each symbol it left pending for a
    backoff (:attr:`exchange.matching.service.BatchResult.retry_at`), so that the symbol is processed when its
    backoff ends rather than when the sweeper next finds its commands old (up to a sweep interval later) or a new
    command happens to wake it.

    Invariants: a symbol has at most one wake-up scheduled, at the time the latest :meth:`schedule` gave (a backoff
    only moves later); the symbols due together go to ONE call of ``wake`` (the matcher's is :func:`wake`, guarded:
    a partition already held or messaged gets no second message). So a symbol that fails again and again costs one
    wake-up per backoff, never a flood. The thread sleeps until the earliest due time or a new schedule (no polling;
    it exists only once something was scheduled, in the process that scheduled it: a dramatiq worker process, after
    its fork). A wake-up that fails is logged and dropped: its symbols' commands are in Postgres, and the sweeper
    re-nudges them once they are old, as after any lost wake-up. Waking early or twice is harmless: a symbol still
    backing off is left alone (and scheduled again by its result), one with nothing pending costs an empty batch.
    """

    def __init__(self, wake: Callable[[list[str]], None]) -> None:
        self._wake = wake
        self._due: dict[str, float] = {}
        """Symbol -> when to wake it (``time.monotonic()``, as the backoff's end)."""
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def schedule(self, symbol: str, at: float) -> None:
        """Wake ``symbol`` at ``at`` (``time.monotonic()``), instead of whenever it was to be woken before."""
        with self._changed:
            self._due[symbol] = at
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="exchange-retry-wakeups", daemon=True)
                self._thread.start()
            self._changed.notify()

    def scheduled(self) -> dict[str, float]:
        """What is scheduled: symbol -> when."""
        with self._changed:
            return dict(self._due)

    def _take_due(self) -> list[str]:
        """Wait until a symbol is due; unschedule and return every symbol due by then."""
        with self._changed:
            while True:
                now = time.monotonic()
                due = sorted(symbol for symbol, at in self._due.items() if at <= now)
                if due:
                    for symbol in due:
                        del self._due[symbol]
                    return due
                self._changed.wait(min(self._due.values()) - now if self._due else None)

    def _run(self) -> None:
        while True:
            due = self._take_due()
            try:
                self._wake(due)
            except Exception:
                log.warning("could not wake %s after their backoff (the sweeper will)", due, exc_info=True)


# KEYS: the partition's set, flag and ring (the ring is cleared with the set it rang for); ARGV: the flag's TTL in
# ms, and "1" to release the partition when nothing was woken. One script, so no api transaction can fall between
# reading the set and clearing the flag.
_TAKE_SCRIPT = """
local symbols = redis.call('SMEMBERS', KEYS[1])
if #symbols == 0 and ARGV[2] == '1' then
    redis.call('DEL', KEYS[2])
    return symbols
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return symbols
"""


def _take_keys(namespace: str, partition: int) -> list[str]:
    """The take script's KEYS for ``partition``, in its order."""
    return [woken_key(namespace, partition), busy_key(namespace, partition), ring_key(namespace, partition)]


class PartitionWakeups:
    """The matcher's side: take a partition's woken symbols, and release the partition when none are left.

    With ``linger_s`` a holder that finds nothing left keeps the partition up to that long (well below
    ``WAKE_TTL_MS``, which its last take re-armed) waiting on the partition's ring, which every wake-up that finds
    it held rings: work arriving meanwhile is taken at once, without a message (enqueue, fetch, hand-over to a
    worker thread, ack) and without the take that starts one. Only then is it released."""

    def __init__(self, client: redis.Redis, namespace: str, *, linger_s: float = 0.0) -> None:
        self._client = client
        self.namespace = namespace
        self._take = client.register_script(_TAKE_SCRIPT)
        self.linger_s = linger_s

    def take(self, partition: int) -> list[str]:
        """Hold ``partition`` (arm its flag) and take the symbols woken on it. Called before reading the command
        log: a command committed after this finds the flag set and its symbol in the set for the next take."""
        return self._run(partition, release=False)

    def take_or_release(self, partition: int) -> list[str]:
        """Take the symbols woken on ``partition`` since the last take, keeping it held; if there are none,
        release it (the next wake-up sends a message) and return [] (after lingering, see the class)."""
        return self._run(partition, release=not self.linger_s) or self.linger(partition)

    def add_take_or_release(self, pipe: redis.client.Pipeline, partition: int) -> None:
        """Add the take of :meth:`take_or_release` to ``pipe`` (the matcher's after its last commit: one round trip
        with the results it publishes), as ``EVAL`` (Redis caches it by its digest: no forgotten script can fail
        it). Pass the reply to :meth:`taken`; when it is [], :meth:`linger` (lingering, the take kept the
        partition)."""
        keys = _take_keys(self.namespace, partition)
        pipe.eval(_TAKE_SCRIPT, len(keys), *keys, str(WAKE_TTL_MS), "0" if self.linger_s else "1")

    def linger(self, partition: int) -> list[str]:
        """After a take that found nothing: wait up to ``linger_s`` for the partition's ring, then take or release
        (without ``linger_s`` that take released the partition already: [])."""
        if not self.linger_s:
            return []
        self._client.blpop([ring_key(self.namespace, partition)], timeout=self.linger_s)
        return self._run(partition, release=True)

    @staticmethod
    def taken(reply: object) -> list[str]:
        """The symbols a take returned (its script's ``reply``), sorted; raises the script's error if it failed."""
        if isinstance(reply, BaseException):
            raise reply
        if not isinstance(reply, list):
            raise TypeError(f"a take returned {reply!r}")
        return sorted(symbol.decode() if isinstance(symbol, bytes) else str(symbol) for symbol in reply)

    def give_back(self, partition: int, symbols: Sequence[str]) -> None:
        """After a failure: put ``symbols`` back in the set and release the partition, so the next wake-up (or the
        sweeper) has them processed. Best effort: never raises (Redis may be what failed)."""
        with contextlib.suppress(redis.RedisError), self._client.pipeline(transaction=True) as pipe:
            if symbols:
                pipe.sadd(woken_key(self.namespace, partition), *symbols)
            pipe.delete(busy_key(self.namespace, partition))
            pipe.execute()

    def _run(self, partition: int, *, release: bool) -> list[str]:
        keys = _take_keys(self.namespace, partition)
        return self.taken(self._take(keys=keys, args=[WAKE_TTL_MS, "1" if release else "0"]))


def hold_partition(
    wakeups: PartitionWakeups,
    partition: int,
    symbols: Sequence[str],
    *,
    process: Callable[[list[str], float], list[str] | None],
    hand_off: Callable[[int, list[str]], None],
    hold_s: float,
) -> None:
    """What a matcher does with one message of ``partition``: take the partition, ``process`` ``symbols`` and what
    was woken on it, take what was woken meanwhile and go on, until nothing was; then release it. Work that arrives
    while a transaction runs thus joins the next one instead of costing a message and a transaction of its own.

    ``process`` is given the symbols and the hold's end (``time.monotonic()``), past which it should stop after the
    transaction in progress and return what it has left. It returns None, or what its own
    :meth:`PartitionWakeups.add_take_or_release` took after its last commit (sent with what it publishes then, it
    saves a round trip): then that is the next round's, or, when it took nothing, what
    :meth:`PartitionWakeups.linger` takes.

    The partition is taken before the first ``process`` reads the command log and again before every later round,
    so a command committed after any read is in the set of the next take. After ``hold_s`` what is left is handed
    back to the queue as one message (``hand_off``; the partition stays held), so that a busy partition neither
    starves the other partitions of the worker's threads nor runs into dramatiq's time limit. On any failure the
    symbols in hand are given back and the partition released, then the error propagates (dramatiq retries the
    message; the sweeper re-nudges what is left)."""
    todo = list(dict.fromkeys([*symbols, *wakeups.take(partition)]))
    deadline = time.monotonic() + hold_s
    try:
        while todo:
            taken = process(todo, deadline)
            todo = wakeups.take_or_release(partition) if taken is None else taken or wakeups.linger(partition)
            if todo and time.monotonic() >= deadline:
                hand_off(partition, todo)
                return
    except BaseException:
        wakeups.give_back(partition, todo)
        raise

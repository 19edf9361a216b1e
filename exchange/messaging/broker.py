"""The dramatiq broker (Redis) shared by api, matchers, webhook workers, sweeper and the dashboard.

dramatiq's Redis consumer polls: when a queue is empty it sleeps with an exponential back-off of up to
``dramatiq_worker_timeout`` ms and then runs its fetch script again. Every poll is a Lua script per queue, and every
message arriving during a sleep waits for the sleep to end (measured: ~25 ms of the ~32 ms an order took from
POST to fill on an idle exchange). :class:`DoorbellRedisBroker` keeps dramatiq's queues, acks, consumers' scripts
and maintenance exactly as they are and changes the idle wait: it stores each message it enqueues as dramatiq's
``dispatch`` script stores it and rings the queue's *doorbell* (a one-element Redis list) in the same script of its
own, so the ring costs no round trip, and an idle consumer blocks on that doorbell (``BLPOP``) instead of
sleeping. A message is then picked up about one round trip after it
was enqueued, and an idle consumer costs one ``BLPOP`` per ``dramatiq_worker_timeout`` instead of a poll every few
milliseconds.

Invariants: the doorbell only says "look now"; correctness never depends on it. A ring that nobody hears stays in
the list (capped at one element) and makes the next idle wait return at once; a lost ring costs at most one idle
timeout, exactly dramatiq's own polling behaviour. Delayed messages (``delay=…``) ring nobody: their consumer
finds them when they are due by its timeout, as in dramatiq.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
import redis.asyncio
import redis.asyncio.connection
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer

from exchange.heap import settle
from exchange.messaging.partitions import WEBHOOK_QUEUE, matching_queue
from exchange.observability import metrics
from exchange.observability.propagation import RequestIdMiddleware

log = logging.getLogger("exchange.messaging")

SOCKET_TIMEOUT_S = 10.0
"""Every Redis call on the broker's client (:func:`redis_client`; the matcher's after-commit round trip uses it too)
gives up after this long (a stalled Redis must not hang a request's batch or a worker forever; dramatiq's own client
has no timeout)."""


def redis_client(redis_url: str) -> redis.Redis:
    """A synchronous client whose every call gives up after :data:`SOCKET_TIMEOUT_S`, as does its connect.

    Built here, not by dramatiq from the URL: given ``url=``, dramatiq's broker makes its own connection pool from
    the URL alone, and the ``socket_timeout`` passed beside it is silently dropped (the broker had no timeout)."""
    client: redis.Redis = redis.Redis.from_url(
        redis_url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
    )
    return client


MAX_IDLE_WAIT_S = SOCKET_TIMEOUT_S / 2
"""An idle consumer's doorbell wait is capped below the socket timeout, whatever ``dramatiq_worker_timeout`` says."""


def doorbell_key(namespace: str, queue_name: str) -> str:
    """The doorbell of ``queue_name`` in ``namespace`` (the broker's, :mod:`exchange.messaging.names`)."""
    return f"{namespace}:doorbell:{queue_name}"


@contextlib.contextmanager
def _lost_or_stalled_is_closed() -> Iterator[None]:
    """A Redis call that lost its connection or stalled past :data:`SOCKET_TIMEOUT_S` raises dramatiq's
    ``ConnectionClosed``: the worker then restarts its consumer (and retries an ack) instead of reporting a bug."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:  # a timeout is not a ConnectionError in redis-py
        raise dramatiq.ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]


class _DoorbellConsumer(_RedisConsumer):
    """dramatiq's Redis consumer, except that an empty fetch waits on the queue's doorbell instead of sleeping, and
    a consumer whose last fetch found the queue drained waits on the doorbell before fetching again.

    Why skipping that fetch loses nothing: a fetch that returned fewer messages than it asked for saw the queue
    empty, and every message enqueued after it rings the doorbell, whose ring stays until a consumer takes it. So
    the next wait returns at once when anything was enqueued since, and saves one fetch script per message
    otherwise (the second fetch of a message that arrived alone always came back empty). Messages put back without
    a ring (dramatiq requeueing a dead worker's or a closing consumer's unacked messages) are found on the idle
    timeout, as an idle consumer always found them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # dramatiq leaves __init__ untyped
        self.drained = False
        """The last fetch returned fewer messages than it asked for: wait for a ring before fetching again."""

    def ack(self, message: Any) -> None:
        with _lost_or_stalled_is_closed():
            super().ack(message)  # type: ignore[no-untyped-call]

    def nack(self, message: Any) -> None:
        with _lost_or_stalled_is_closed():
            super().nack(message)  # type: ignore[no-untyped-call]

    def requeue(self, messages: Any) -> None:
        with _lost_or_stalled_is_closed():
            super().requeue(messages)  # type: ignore[no-untyped-call]

    def __next__(self) -> Any:
        with _lost_or_stalled_is_closed():
            if self.message_cache or self.outstanding_message_count >= self.prefetch:
                return super().__next__()  # type: ignore[no-untyped-call]  # at hand, or prefetch full: dramatiq's path
            if not self.drained:
                wanted = self.prefetch - self.outstanding_message_count
                self.message_cache = self.broker.do_fetch(self.queue_name, wanted)
                self.drained = len(self.message_cache) < wanted
                if self.message_cache:
                    return super().__next__()  # type: ignore[no-untyped-call]
            # Nothing queued at the last look: wait for a ring (or the idle timeout). The caller loops back here
            # and fetches again.
            wait_s = min(max(self.timeout, 1) / 1000, MAX_IDLE_WAIT_S)
            self.broker.client.blpop([doorbell_key(self.broker.namespace, self.queue_name)], timeout=wait_s)
            self.drained = False
            return None


class NamespaceUnknownError(RuntimeError):
    """The broker was used before its namespace was known (the api's, while its database has not answered yet)."""


class DoorbellRedisBroker(RedisBroker):
    """A :class:`~dramatiq.brokers.redis.RedisBroker` whose consumers wake when a message is enqueued.

    Its ``namespace`` (dramatiq's key prefix, and the exchange's: :mod:`exchange.messaging.names`) may be None
    until known: any use of the broker before then raises :class:`NamespaceUnknownError` instead of writing under a
    guessed name."""

    _namespace: str | None = None

    @property  # dramatiq declares a plain attribute
    def namespace(self) -> str:
        if self._namespace is None:
            raise NamespaceUnknownError("the exchange's Redis namespace is not known yet (no answer from its database)")
        return self._namespace

    @namespace.setter
    def namespace(self, value: str | None) -> None:
        self._namespace = value

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _DoorbellConsumer

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        """dramatiq's ``enqueue`` (the same middleware hooks, the message stored as dramatiq's ``dispatch`` script
        stores it) and the ring of the queue's doorbell in ONE script: one round trip, the one
        :class:`AsyncEnqueuer` sends. A delayed message takes dramatiq's own path and rings nobody. Any error
        raises (the message may then be queued already: enqueuing it again only costs a duplicate, which every
        actor here tolerates)."""
        if delay is not None:
            return super().enqueue(message, delay=delay)
        enqueued = _stamped(self, message)
        try:
            self._send(enqueued)
        except redis.exceptions.NoScriptError:  # a restarted or flushed Redis forgot the script
            self.client.script_load(_ENQUEUE_SCRIPT)
            self._send(enqueued)
        self.emit_after("enqueue", enqueued, None)
        return enqueued

    def _send(self, message: dramatiq.Message[Any]) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            _add_enqueue(pipe, self.namespace, message)
            pipe.execute()

    def add_guarded(
        self, pipe: redis.client.Pipeline, message: dramatiq.Message[Any], guard: Guard
    ) -> dramatiq.Message[Any]:
        """Add to ``pipe`` the enqueue of ``message`` behind ``guard`` (the script :meth:`AsyncEnqueuer.ring_all`
        sends, here answered), so that it shares the round trip of whatever else the caller sends. Sent as ``EVAL``
        (Redis caches it by its digest), so no forgotten script can fail it. Returns the message as stamped: pass
        it, with the script's reply, to :meth:`guarded_sent`."""
        stamped = _stamped(self, message)
        pipe.eval(_ENQUEUE_SCRIPT, *_script_call(self.namespace, stamped, guard))
        return stamped

    def guarded_sent(self, message: dramatiq.Message[Any], reply: object) -> bool:
        """Whether :meth:`add_guarded`'s script enqueued ``message`` (its ``after_enqueue`` hooks then run); raises
        the script's error when ``reply`` is one (``pipe.execute(raise_on_error=False)``)."""
        if isinstance(reply, BaseException):
            raise reply
        if reply != 1:
            return False
        self.emit_after("enqueue", message, None)
        return True


def _stamped(broker: RedisBroker, message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
    """``message`` with an id of its own for this enqueue, as dramatiq gives it (a message may be enqueued again:
    retries, redeliveries), once the broker's ``before_enqueue`` hooks have seen it."""
    stamped = message.copy(options={"redis_message_id": str(uuid.uuid4())})
    broker.emit_before("enqueue", stamped, None)
    return stamped


def queue_ring(pipe: redis.client.Pipeline | redis.asyncio.client.Pipeline, namespace: str, queue_name: str) -> None:
    """Add the ring of ``queue_name``'s doorbell (in ``namespace``) to ``pipe`` (a sync or an asyncio pipeline)."""
    key = doorbell_key(namespace, queue_name)
    pipe.lpush(key, b"1")
    pipe.ltrim(key, 0, 0)


# KEYS: the queue's list of message ids and hash of messages (dramatiq's layout, as its ``dispatch`` script's
# ``enqueue`` writes them), the queue's doorbell, then for a guarded enqueue a set and a flag, and maybe a ring;
# ARGV: the message's ``redis_message_id`` and encoded body, then for a guarded enqueue the flag's TTL in ms and the
# set's members. Guarded: add the members to the set, and enqueue only when the flag was free (it is then set): all
# or nothing; when it was not, ring the ring (a one-element list its holder may be waiting on).
_ENQUEUE_SCRIPT = """
if #KEYS >= 5 then
    if #ARGV > 3 then
        redis.call('SADD', KEYS[4], unpack(ARGV, 4))
    end
    if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[3]) then
        if #KEYS == 6 then
            redis.call('LPUSH', KEYS[6], '1')
            redis.call('LTRIM', KEYS[6], 0, 0)
        end
        return 0
    end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[3], '1')
redis.call('LTRIM', KEYS[3], 0, 0)
return 1
"""
_ENQUEUE_SHA = hashlib.sha1(_ENQUEUE_SCRIPT.encode()).hexdigest()  # noqa: S324  # Redis names scripts by SHA-1


@dataclass(frozen=True, slots=True)
class Guard:
    """Enqueue a message only if ``flag`` is free, after adding ``members`` (if any) to ``set_key`` (see
    :meth:`AsyncEnqueuer.ring_all`, :meth:`DoorbellRedisBroker.add_guarded`); the flag is then set with a TTL of
    ``ttl_ms``. With no ``set_key`` there are no members: only the flag decides."""

    set_key: str | None
    members: Sequence[str]
    flag: str
    ttl_ms: int
    ring: str | None = None
    """Rung (a one-element list) when the flag was held: its holder may be waiting for work on it."""


class AsyncEnqueuer:
    """Guarded :meth:`DoorbellRedisBroker.enqueue` (no delay) for an event loop: the ``before_enqueue`` hooks, the
    message stored as dramatiq's ``dispatch`` script stores it, and the doorbell rung, all by one script of this
    module per message, every message of a call in one write, so the api neither blocks its loop on Redis nor hands
    each enqueue to a worker thread with blocking round trips (measured against that: api CPU per order -13-17 % at
    ``exchange bench --closed-loop 64``). Each message carries a :class:`Guard`, which makes the enqueue conditional
    in the same script: the api's wake-up of a partition (:func:`exchange.messaging.wakeups.wake_async`) is one write
    instead of a transaction on its flag followed by the enqueue, on a connection Redis does not answer (against one
    pipeline round trip a wake-up, at ``--scale 100``: POST p50 0.90x in five pairs of a fast spell, 0.67x in three
    of a slower one; api CPU per order 0.93-0.96x).

    Unlike dramatiq's ``dispatch``, the script (also :meth:`DoorbellRedisBroker.enqueue`'s) neither records the
    enqueuing process in dramatiq's heartbeats nor runs dramatiq's maintenance: every consumer's fetch still does
    both, and the api consumes nothing. The
    integration tests consume what it enqueues with dramatiq's own consumer, so a dramatiq that changes its Redis
    layout fails there, not in production.
    """

    def __init__(
        self,
        broker: RedisBroker,
        client: redis.asyncio.Redis,
        namespace: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        """``namespace``: awaited before each send, to name ``broker`` when its namespace was not known yet (the
        api's :class:`~exchange.messaging.names.LazyNamespace`; once known it returns at once)."""
        self._broker = broker
        self._quiet = QuietConnection(client)
        self._resolve = namespace

    async def known_namespace(self) -> str:
        """The broker's namespace, read first (see ``namespace`` of ``__init__``) if it was not known yet."""
        if self._resolve is not None:
            return await self._resolve()
        namespace: str = self._broker.namespace
        return namespace

    async def close(self) -> None:
        """Close the connection of :meth:`ring_all` (``client`` is the caller's to close)."""
        await self._quiet.close()

    async def ring_all(self, messages: Sequence[dramatiq.Message[Any]], guards: Sequence[Guard]) -> None:
        """Enqueue each of ``messages`` behind its guard and ring its queue's doorbell, for messages whose outcome
        nobody waits for (the api's wake-ups): the scripts, one per message, all written at once on a connection
        Redis never answers (:class:`QuietConnection`), so the caller's event loop is not woken by a reply. Whether
        each guard let its message through is therefore not known: the messages go through the ``before_enqueue``
        hooks, never through ``after_enqueue``. Raises when the connection is broken (the scripts may then have run
        or not, each whole or not at all); a script that fails in Redis fails silently."""
        if not messages:
            return
        await self.known_namespace()
        stamped = [_stamped(self._broker, message) for message in messages]
        calls = [
            ("EVAL", _ENQUEUE_SCRIPT, *_script_call(self._broker.namespace, message, guard))
            for message, guard in zip(stamped, guards, strict=True)
        ]
        await self._quiet.send(calls)


class QuietConnection:
    """One Redis connection of its own, configured like ``client``'s, in ``CLIENT REPLY OFF`` mode: Redis runs
    what is sent on it and answers nothing, so a sender on an event loop is never woken for the answer (each
    wake-up costs the api's loop ~50-90 µs on the project's machines, ops/MEASURED.md).

    Invariants: the mode is set on every (re)connect, before anything else is sent; a connection Redis has closed
    (a restart: its reader is at EOF) is replaced before the next send instead of swallowing it. Writes on one
    connection reach Redis in the order they were made, as on any connection."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        pool = client.connection_pool
        self._connection = pool.connection_class(**{**pool.connection_kwargs, "redis_connect_func": _replies_off})
        self._lock = asyncio.Lock()
        """One sender at a time: two concurrent (re)connects would each open a socket and one of them would be lost
        with whatever was written on it."""

    async def send(self, commands: Sequence[tuple[Any, ...]]) -> None:
        """Write ``commands`` in one go (connecting first when needed). Raises ``redis.ConnectionError`` when the
        write fails (the connection is dropped: the next send connects again)."""
        connection = self._connection
        async with self._lock:
            reader = getattr(connection, "_reader", None)
            if reader is not None and reader.at_eof():
                await connection.disconnect()
            await connection.send_packed_command(connection.pack_commands(commands), check_health=False)

    async def close(self) -> None:
        await self._connection.disconnect()


async def _replies_off(connection: redis.asyncio.connection.AbstractConnection) -> None:
    await connection.on_connect()  # what any connection of the pool does: authenticate, select the database
    await connection.send_command("CLIENT", "REPLY", "OFF")  # answered by nothing, by definition


def _script_call(namespace: str, message: dramatiq.Message[Any], guard: Guard | None) -> list[Any]:
    """The enqueue script's key count, keys and arguments for ``message`` (which has its ``redis_message_id``)."""
    queue = f"{namespace}:{message.queue_name}"
    keys = [queue, f"{queue}.msgs", doorbell_key(namespace, message.queue_name)]
    args: list[Any] = [message.options["redis_message_id"], message.encode()]
    if guard is not None:
        if guard.set_key is None and guard.members:
            raise ValueError("a guard's members need its set")
        # Without a set the script never touches its slot (no members, no SADD): the flag fills it.
        keys += [guard.set_key or guard.flag, guard.flag, *([guard.ring] if guard.ring else [])]
        args += [guard.ttl_ms, *guard.members]
    return [len(keys), *keys, *args]


def _add_enqueue(
    pipe: redis.client.Pipeline | redis.asyncio.client.Pipeline, namespace: str, message: dramatiq.Message[Any]
) -> None:
    """Add to ``pipe`` the enqueue script's (unguarded) call for ``message`` (which has its ``redis_message_id``)."""
    pipe.evalsha(_ENQUEUE_SHA, *_script_call(namespace, message, None))


class SettledHeap(dramatiq.Middleware):
    """Settles a worker process's heap (:func:`exchange.heap.settle`) once dramatiq has booted it: the actors'
    modules, the broker, the pools and the worker's threads exist by then. Collections are timed from then on
    (``exchange_gc_pause_seconds`` on the worker's metrics port)."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        settle(metrics.observe_gc_pause)


def make_broker(redis_url: str, partitions: int, namespace: str | None) -> DoorbellRedisBroker:
    """Create the Redis broker in ``namespace`` (:mod:`exchange.messaging.names`; None: named later, unusable until
    then), make it dramatiq's global broker, and declare every queue.

    Declaring all ``matching.<n>`` queues and ``webhooks`` up front lets the dashboard list them before the
    first message. Default middleware plus :class:`RequestIdMiddleware` (request ids in the workers' logs);
    retries of matching messages are pointless (the sweeper re-nudges) but harmless, so they are left to each
    actor's options.
    """
    broker = DoorbellRedisBroker(client=redis_client(redis_url), namespace=namespace)  # type: ignore[no-untyped-call]
    broker.add_middleware(RequestIdMiddleware())
    for n in range(partitions):
        broker.declare_queue(matching_queue(n))
    broker.declare_queue(WEBHOOK_QUEUE)
    dramatiq.set_broker(broker)
    return broker

"""Per-process resources of an api worker, created at startup and released at shutdown.

One :class:`ApiState` per process (stored as ``app.state.api``): a psycopg connection pool (pgbouncer-safe), a
Redis client for commands (short timeouts), a separate Redis client for the result subscriber (its pub/sub
connection idles for long periods, so it must not carry a read timeout), the dramatiq broker, exactly one
:class:`~exchange.messaging.results.ResultWaiter`, the group-commit coalescers of order accepts, cancels and reads, and
the ops views' shared reads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from dramatiq.brokers.redis import RedisBroker
from litestar import Litestar
from redis.asyncio import Redis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url

from exchange.api.batches import OrderKey, accept_orders, cancel_orders, read_orders
from exchange.api.coalescing import Coalescer
from exchange.config import Settings
from exchange.db.engines import DEAD_PEER_OPTIONS, AsyncPool, single_statement
from exchange.messaging.broker import AsyncEnqueuer, make_broker
from exchange.messaging.names import IDENTITY_QUERY, LazyNamespace, derive
from exchange.messaging.results import ResultWaiter
from exchange.ops.cache import SharedResult
from exchange.ops.data import GAUGES_TTL_S
from exchange.ops.page import REFRESH_S
from exchange.orders.models import BrokerIdentity, CommandResult, NewOrder, OrderView, PlaceResult

log = logging.getLogger("exchange.api")

REDIS_TIMEOUT_S = 2.0


SUBSCRIBER_KEEPALIVE: dict[int, int] = {
    getattr(socket, name): DEAD_PEER_OPTIONS[option]
    for name, option in (
        ("TCP_KEEPIDLE", "keepalives_idle"),
        ("TCP_KEEPINTVL", "keepalives_interval"),
        ("TCP_KEEPCNT", "keepalives_count"),
        ("TCP_USER_TIMEOUT", "tcp_user_timeout"),
    )
    if hasattr(socket, name)
}
"""TCP keepalive of the result subscriber: a Redis that vanished without closing the connection (a host gone, a
network cut) is given up as the database is (:data:`~exchange.db.engines.DEAD_PEER_S`; 12-14 s after the silence
began), not after Linux's two hours. (Linux's option names; a platform without one keeps its own.)"""


def results_subscriber(redis_url: str) -> Redis:
    """The api process's pub/sub connection for :class:`~exchange.messaging.results.ResultWaiter`: idle between
    messages, with no read timeout, so over TCP it sends keepalive probes (:data:`SUBSCRIBER_KEEPALIVE`) to notice a
    peer that vanished. A unix socket (``exchange dev``'s embedded Redis) needs none (a dead server closes it), and
    redis-py's unix connection refuses the option: passed there, the subscriber never connected and every new order
    waited out ``EXCHANGE_ORDER_WAIT_MS`` to answer ``pending``."""
    unix = parse_url(redis_url).get("connection_class") is UnixDomainSocketConnection
    keepalive: dict[str, Any] = (
        {} if unix else {"socket_keepalive": True, "socket_keepalive_options": SUBSCRIBER_KEEPALIVE}
    )
    client: Redis = Redis.from_url(redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, **keepalive)
    return client


@dataclass(slots=True)
class KeyCache:
    """Positive cache of API-key hash → broker, so most requests skip the lookup query.

    Entries live ``ttl_s`` seconds; the table is cleared when it reaches ``max_entries``. A deleted broker whose
    key is still cached is caught by the orders' foreign key (→ 401) and disappears after ``ttl_s``.
    """

    ttl_s: float = 10.0
    max_entries: int = 10_000
    _entries: dict[str, tuple[BrokerIdentity, float]] = field(default_factory=dict)

    def get(self, key_hash: str) -> BrokerIdentity | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            self._entries.pop(key_hash, None)
            return None
        return entry[0]

    def put(self, key_hash: str, broker: BrokerIdentity) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key_hash] = (broker, time.monotonic() + self.ttl_s)

    def clear(self) -> None:
        self._entries.clear()


async def read_namespace(pool: AsyncPool) -> str:
    """The exchange's Redis namespace derived from the database behind ``pool`` (:mod:`exchange.messaging.names`)."""
    async with single_statement(pool) as conn:
        row = await (await conn.execute(IDENTITY_QUERY)).fetchone()
    assert row is not None
    return derive(int(row[0]), str(row[1]))


@dataclass(slots=True)
class ApiState:
    settings: Settings
    pool: AsyncPool
    redis: Redis
    subscriber_redis: Redis
    names: LazyNamespace
    """The exchange's Redis namespace: ``broker``'s, read from the database once (at start, or on first need when
    the database was down then)."""
    broker: RedisBroker
    enqueuer: AsyncEnqueuer
    """The broker's enqueue on ``redis`` (the order path's wake-ups)."""
    waiter: ResultWaiter
    accepts: Coalescer[NewOrder, PlaceResult]
    """Group commit of new orders (one transaction per group of concurrent requests)."""
    cancels: Coalescer[OrderKey, CommandResult]
    """Group commit of cancels."""
    reads: Coalescer[OrderKey, OrderView | None]
    """Batched read-back of orders (one query per group of concurrent requests)."""
    keys: KeyCache = field(default_factory=KeyCache)
    ops_snapshot: SharedResult[dict[str, Any]] = field(default_factory=lambda: SharedResult(REFRESH_S))
    """The ops page's snapshot, read at most once per page refresh interval, however many tabs reload it."""
    pending_gauges: SharedResult[list[dict[str, Any]]] = field(default_factory=lambda: SharedResult(GAUGES_TTL_S))
    """``/metrics``' pending-command gauges, read at most once per :data:`~exchange.ops.data.GAUGES_TTL_S`."""


def api_state(app: Litestar) -> ApiState:
    return cast(ApiState, app.state.api)


def lifespan(settings: Settings) -> Callable[[Litestar], contextlib.AbstractAsyncContextManager[None]]:
    """Build the lifespan context manager factory for :class:`~litestar.Litestar` (``lifespan=[...]``)."""

    @contextlib.asynccontextmanager
    async def run(app: Litestar) -> AsyncIterator[None]:
        pool = AsyncPool(settings.pooled_database_url)
        client = Redis.from_url(
            settings.redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        subscriber = results_subscriber(settings.redis_url)
        broker = make_broker(settings.redis_url, settings.partitions, None)
        names = LazyNamespace(
            settings.redis_namespace,
            functools.partial(read_namespace, pool),
            lambda value: setattr(broker, "namespace", value),
        )
        enqueuer = AsyncEnqueuer(broker, client, names.get)
        waiter = ResultWaiter(subscriber, names.get)
        await waiter.start()  # reads the namespace first (the database may be down: it then goes on trying)
        group = {"max_concurrent": settings.group_commit_concurrency, "max_batch": settings.group_commit_max}
        accepts: Coalescer[NewOrder, PlaceResult] = Coalescer(
            functools.partial(accept_orders, pool, enqueuer, settings.partitions), **group
        )
        cancels: Coalescer[OrderKey, CommandResult] = Coalescer(
            functools.partial(cancel_orders, pool, enqueuer, settings.partitions), **group
        )
        reads: Coalescer[OrderKey, OrderView | None] = Coalescer(functools.partial(read_orders, pool), **group)
        app.state.api = ApiState(
            settings, pool, client, subscriber, names, broker, enqueuer, waiter, accepts, cancels, reads
        )
        try:
            yield
        finally:
            await waiter.stop()
            with contextlib.suppress(Exception):
                await enqueuer.close()
            for c in (client, subscriber):
                with contextlib.suppress(Exception):
                    await c.aclose()
            with contextlib.suppress(Exception):
                broker.close()
            await pool.close()

    return run

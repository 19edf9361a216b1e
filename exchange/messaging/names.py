"""The exchange's Redis namespace: the prefix of every Redis key and channel one exchange uses.

Two exchanges (two PostgreSQL databases) configured with the same Redis database must never take each other's
work: a matcher of one that takes the other's partition message (and its set of woken symbols) finds nothing in
its own database, and the other's orders wait for the sweeper (measured before this module: 26 of 30 orders
answered ``pending``, max 22.8 s, against 0 of 30 alone). So dramatiq's queues (its ``namespace``), the doorbells,
the wake-up keys, the results channel and the webhook hint keys are all named under one namespace per exchange.

The namespace is ``EXCHANGE_REDIS_NAMESPACE`` when set, else derived from the identity of the PostgreSQL database
the process works on: the cluster's ``system_identifier`` (``pg_control_system()``, the same through pgbouncer as
direct, however a process names the host) and ``current_database()`` (the real name, not a pgbouncer alias). Every
process of one exchange (api, matchers, webhooks, sweeper, the dashboard inside the api) thus derives the same
value with no configuration, and two databases get two namespaces. Read once per process at start (the api: on
first need when its database was down at start), never on a hot path.

Limits: two databases with the same name in clusters cloned from one another (``pg_basebackup``, a promoted
replica) share the system identifier and so the namespace: set ``EXCHANGE_REDIS_NAMESPACE`` on one of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import psycopg

from exchange.db.urls import libpq_url

log = logging.getLogger("exchange.messaging")

IDENTITY_QUERY = "SELECT (SELECT system_identifier FROM pg_control_system()), current_database()"
DERIVED_PREFIX = "exchange-"
RETRY_S = 1.0
CONNECT_TIMEOUT_S = 5


def derive(system_identifier: int, database: str) -> str:
    """The namespace of ``database`` in the cluster ``system_identifier``: ``exchange-`` and 12 hex digits."""
    digest = hashlib.blake2b(f"{system_identifier}/{database}".encode(), digest_size=6).hexdigest()
    return f"{DERIVED_PREFIX}{digest}"


def read_namespace(database_url: str) -> str:
    """The namespace derived from the database at ``database_url`` (one connection, one query; pgbouncer-safe).
    Raises psycopg's error when the database does not answer."""
    with psycopg.connect(
        libpq_url(database_url), autocommit=True, prepare_threshold=None, connect_timeout=CONNECT_TIMEOUT_S
    ) as conn:
        row = conn.execute(IDENTITY_QUERY).fetchone()
    assert row is not None
    return derive(int(row[0]), str(row[1]))


def process_namespace(configured: str | None, database_url: str, *, retry_s: float = RETRY_S) -> str:
    """A worker's namespace at start: ``configured`` (``EXCHANGE_REDIS_NAMESPACE``), else read from the database,
    retried until it answers (a worker can do nothing without its database; it must not guess its names)."""
    if configured:
        return configured
    while True:
        try:
            return read_namespace(database_url)
        except psycopg.OperationalError as exc:
            log.warning("waiting for the database to derive the Redis namespace: %s", exc)
            time.sleep(retry_s)


class LazyNamespace:
    """The api's namespace: known at once when configured, else read from the database at start, or, when the
    database was down then, on first need (:meth:`get`: a request that reached the database, the result
    subscriber's retries). ``on_known`` is called once with the value (it names the api's broker)."""

    def __init__(
        self, configured: str | None, read: Callable[[], Awaitable[str]], on_known: Callable[[str], None]
    ) -> None:
        self._read = read
        self._on_known = on_known
        self._lock = asyncio.Lock()
        self.value: str | None = None
        if configured:
            self._set(configured)

    def _set(self, value: str) -> None:
        self._on_known(value)
        self.value = value

    async def get(self) -> str:
        """The namespace; reads it when not known yet (raises the database's error when that fails)."""
        if self.value is not None:
            return self.value
        async with self._lock:
            if self.value is None:
                self._set(await self._read())
            assert self.value is not None
            return self.value


def fixed(value: str) -> Callable[[], Awaitable[str]]:
    """A namespace source that is ``value`` (for a :class:`~exchange.messaging.results.ResultWaiter` whose
    namespace is known from the start)."""

    async def get() -> str:
        return value

    return get

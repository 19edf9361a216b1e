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
import contextlib
import hashlib
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType
from typing import Any

import psycopg

from exchange.db.engines import DEAD_PEER_OPTIONS
from exchange.db.urls import libpq_url

log = logging.getLogger("exchange.messaging")

IDENTITY_QUERY = "SELECT (SELECT system_identifier FROM pg_control_system()), current_database()"
DERIVED_PREFIX = "exchange-"
RETRY_S = 1.0
START_WAIT_S = 5.0
"""How long a process waits at start for its database to name its Redis namespace (:func:`process_namespace`)."""
CONNECT_TIMEOUT_S = 5


def derive(system_identifier: int, database: str) -> str:
    """The namespace of ``database`` in the cluster ``system_identifier``: ``exchange-`` and 12 hex digits."""
    digest = hashlib.blake2b(f"{system_identifier}/{database}".encode(), digest_size=6).hexdigest()
    return f"{DERIVED_PREFIX}{digest}"


def read_namespace(database_url: str) -> str:
    """The namespace derived from the database at ``database_url`` (one connection, one query; pgbouncer-safe).
    Raises psycopg's error when the database does not answer."""
    # Bounded like the pools' connections: a peer that accepted and then went silent must not hang the start. (No
    # ``options`` startup parameter: pgbouncer refuses it unless told to ignore it, as its images are not.)
    bounds: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, **DEAD_PEER_OPTIONS}
    with psycopg.connect(libpq_url(database_url), autocommit=True, prepare_threshold=None, **bounds) as conn:
        row = conn.execute(IDENTITY_QUERY).fetchone()
    assert row is not None
    return derive(int(row[0]), str(row[1]))


def process_namespace(
    configured: str | None, database_url: str, *, wait_s: float = START_WAIT_S, retry_s: float = RETRY_S
) -> str:
    """A worker's namespace at start: ``configured`` (``EXCHANGE_REDIS_NAMESPACE``), else read from the database,
    retried for up to ``wait_s`` (a worker can do nothing without its database; it must not guess its names), then
    ``SystemExit``: the process ends, and its supervisor starts it again (``exchange dev``, the container runtime).
    Logged once known, so that processes of one exchange that disagree (the variable set for some, not others; a
    database moved to another cluster under running processes) can be told apart in their logs.

    Why bounded, and why a SIGTERM or SIGINT during the wait ends the process at once (``SystemExit``): a dramatiq
    worker process reads it while importing its module, and dramatiq's master holds every signal until its workers
    have imported theirs (up to ``--worker-fork-timeout``, 30 s), while the handler a worker process has then only
    notes the stop; the sweeper's sets an event it has not begun to wait on. Waiting for the database without bound
    made every stop during a database outage end in a SIGKILL after the supervisor's grace."""
    if configured:
        namespace = configured
    else:
        deadline = time.monotonic() + wait_s
        with _stoppable():
            while True:
                try:
                    namespace = read_namespace(database_url)
                    break
                except psycopg.OperationalError as exc:
                    if time.monotonic() + retry_s > deadline:
                        raise SystemExit(
                            f"the database could not be reached within {wait_s:g} s to derive the Redis namespace "
                            f"({exc}); exiting, to be started again"
                        ) from exc
                    log.warning("waiting for the database to derive the Redis namespace: %s", exc)
                    time.sleep(retry_s)
    log.info("Redis namespace %s (%s)", namespace, "EXCHANGE_REDIS_NAMESPACE" if configured else "derived")
    return namespace


@contextlib.contextmanager
def _stoppable() -> Iterator[None]:
    """SIGTERM and SIGINT raise ``SystemExit`` inside the block (main thread only: elsewhere signals cannot be
    handled, and the block runs as it would have); the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
        log.info("Redis namespace %s", value)  # as every worker logs its own (process_namespace)

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

"""The sweeper: makes a lost message cost a delay, never an order (DESIGN §2-§3).

Every ``interval`` seconds it
* re-nudges symbols whose oldest unprocessed command is older than ``stale_after`` (a lost or stuck wake-up, or a
  matcher killed with the message in hand), sending one match message per partition unconditionally;
* logs an ``expire`` command for every symbol with open GTD orders past ``valid_until`` (at most one pending
  per symbol), so expiry goes through the command log in sequence like everything else, and wakes the symbol; a
  backlog bigger than one matcher transaction closes, the matcher works through a share at a time;
* hints the webhook workers once (one message at most) when webhook events are still pending and not in flight
  more than ``webhook_requeue_after`` seconds after they became due (lost hint, crashed delivery worker, long
  retry): when one became so since its last such hint, or that hint is a period old (:func:`hint_overdue`). Their
  due times stay as they are, so a backlog is claimed oldest due first;
* deletes webhook delivery attempts older than ``EXCHANGE_WEBHOOK_ATTEMPTS_RETENTION_HOURS``, at most one batch
  per sweep (:class:`AttemptsRetention`), so a backlog is caught up over several sweeps.

Any number of sweepers may run: every action is idempotent, their expiry logging takes turns, and one at a time
deletes attempts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import Connection, Engine, text

from exchange.db.engines import BOUNDED_BEGIN_STATEMENTS
from exchange.messaging.wakeups import send_wakeups
from exchange.observability.metrics import SWEEPER_ATTEMPTS_DELETED, SWEEPER_EXPIRIES, SWEEPER_RENUDGES
from exchange.webhooks.queue import enqueue_deliveries, overdue_hint_key
from exchange.webhooks.store import overdue

log = logging.getLogger("exchange.sweeper")

_STALE = text(
    """
    SELECT symbol FROM commands
    WHERE processed_at IS NULL AND created_at < clock_timestamp() - make_interval(secs => :stale)
    GROUP BY symbol
    """
)

# statement_timestamp(), not clock_timestamp(): a stable bound the planner can put into the index condition of
# ix_orders_open_valid_until, so a sweep reads only the orders that are due. With a volatile one it filtered every
# open GTD order, every second. It is this statement's start; the matcher expires with its own clock, read once
# it holds the book's lock, almost always later. Not always: a matcher whose lock statement read the clock just
# before this insert committed can still read the command in its next statement; the orders due between the two
# instants then stay for the next sweep's expire (they never trade meanwhile: every match compares with the clock).
# A backlog bigger than a transaction closes (MAX_EXPIRIES_PER_TRANSACTION) the matcher works through on its own.
#
# The pending-expire check reads ix_commands_pending_expire (alembic 0018: the unprocessed expires alone, at most
# one per symbol): through the unprocessed commands' (symbol, seq) index it read a symbol's whole backlog per due
# symbol while the matcher was behind, under the expiry lock.
_LOG_EXPIRIES = text(
    """
    INSERT INTO commands (symbol, kind)
    SELECT due.symbol, 'expire'
    FROM (SELECT DISTINCT symbol FROM orders
          WHERE close_reason IS NULL AND status = 'open' AND valid_until IS NOT NULL
            AND valid_until <= statement_timestamp()) AS due
    WHERE NOT EXISTS (SELECT 1 FROM commands c
                      WHERE c.symbol = due.symbol AND c.kind = 'expire' AND c.processed_at IS NULL)
    RETURNING symbol
    """
)


EXPIRY_LOCK = (3085, 0)
"""The advisory lock the sweepers' expiry logging takes turns on: a two-integer key, apart from the books'
one-bigint keys and the cancels' ``(3084, bucket)``."""

ATTEMPTS_RETENTION_LOCK = (3085, 1)
"""The advisory lock of the sweeper deleting old webhook attempts (:class:`AttemptsRetention`): tried, never waited
for, so a sweeper finding it held leaves the batch to the one holding it."""


@contextmanager
def _bounded_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction bounded by :data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS` (its ``SET LOCAL`` first): a
    sweeper frozen inside it holds its locks for 2 s at most. Committed at the end of the block."""
    with engine.begin() as conn:
        conn.exec_driver_sql(BOUNDED_BEGIN_STATEMENTS[1])  # the bound: SET LOCAL, first in the transaction
        yield conn


def log_expiries(engine: Engine) -> list[str]:
    """Log an ``expire`` command for every symbol with due GTD orders and none pending; returns those symbols.

    Sweepers take turns (:data:`EXPIRY_LOCK`, held to the commit), and each one's insert, a statement after the lock,
    sees what the one before it committed: without the turn, two sweepers' inserts, each not seeing the other's
    uncommitted row, logged two commands per symbol (harmless to orders, but counted twice and processed twice).
    A bounded transaction: a sweeper frozen inside it holds the turn for 2 s at most."""
    with _bounded_transaction(engine) as conn:
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": EXPIRY_LOCK[0], "key": EXPIRY_LOCK[1]}
        )
        return [row.symbol for row in conn.execute(_LOG_EXPIRIES)]


def hint_overdue(engine: Engine, broker: RedisBroker, *, older_than_s: float) -> int:
    """Hint the webhook workers (one coalesced hint: a worker claims every due event, oldest due first) if events
    are overdue by more than ``older_than_s`` and one became so since the last such hint, or that hint is
    ``older_than_s`` old (:func:`exchange.webhooks.store.overdue`); returns how many are overdue then (counted up
    to 1,000), else 0.

    The last hint's time (the database's) is kept in Redis (:func:`~exchange.webhooks.queue.overdue_hint_key`),
    set only once the hint is sent, for a period: lost (Redis restarted), it costs one hint more. Sweepers running
    side by side may each hint once for the same events (a hint is coalesced, and a duplicate only finds less due).
    """
    key = overdue_hint_key(broker)
    stored = broker.client.get(key)
    hinted_at = None
    if isinstance(stored, bytes):
        try:
            hinted_at = datetime.fromisoformat(stored.decode())
        except ValueError:  # not ours: as if no hint was sent
            log.warning("ignoring %s = %r (not a timestamp)", key, stored)
    found = overdue(engine, older_than_s=older_than_s, hinted_at=hinted_at)
    if found.at is None:
        return 0
    enqueue_deliveries(broker, found.ids)
    broker.client.set(key, found.at.isoformat(), px=max(1, round(older_than_s * 1000)))
    return len(found.ids)


# Oldest first, through ix_webhook_attempts_attempted_at (alembic 0028), from where this sweeper's last batch ended
# (``after``): the entries of the attempts deleted before stay in that index until a vacuum, and a scan from its
# start steps over all of them again on every sweep (500,000 deleted: 1,117 buffers read a batch instead of 400, and
# autovacuum waits for a fifth of the table by default). The bound is statement_timestamp(), stable, so that it is
# the index condition's (see _LOG_EXPIRIES). The attempts go by primary key (id = ANY of an array: an index probe
# each, never a join the planner could turn into a scan of the table).
_DELETE_OLD_ATTEMPTS = text(
    """
    WITH gone AS (
        DELETE FROM webhook_attempts
        WHERE id = ANY(ARRAY(
            SELECT id FROM webhook_attempts
            WHERE attempted_at >= :after
              AND attempted_at < statement_timestamp() - make_interval(hours => :hours)
            ORDER BY attempted_at
            LIMIT :batch))
        RETURNING attempted_at
    )
    SELECT count(*) AS deleted, max(attempted_at) AS newest FROM gone
    """
)

ATTEMPTS_RETENTION_BATCH = 5_000
"""The most webhook attempts one sweep deletes (one statement). Out of 5 million attempts a batch took 17-21 ms
(60 ms with a cold cache) and wrote 0.86 MB of WAL; its locks are the deleted rows', which nothing else writes. One
batch a second is about ten times the tens of millions of attempts a day of a B3-sized load."""

_BEGINNING = datetime.min.replace(tzinfo=UTC)


class AttemptsRetention:
    """Deletes webhook delivery attempts older than ``hours`` (0: none, ever), oldest first, at most ``batch`` per
    :meth:`prune`: each call is one short transaction, so a backlog (a sweeper stopped for days, a retention
    shortened) is caught up over several sweeps, never by one long statement.

    Safe to delete whenever they are old: ``webhook_attempts`` is a log, written by ``webhook_record`` and read only
    by the delivery log (``GET /webhooks/deliveries``) and the ops page's latest failed attempts. An event's state
    (status, attempts, generation, last error) is on ``webhook_events`` and an endpoint's failures in a row on
    ``brokers``; nothing derives either from the attempts, and no key references them.

    Each instance remembers where its last batch ended (``after``) and starts the next one there. An attempt
    recorded later with an older ``attempted_at`` (its worker's clock behind by more than ``hours``) is only
    deleted by a sweeper started after it. Sweepers take turns (:data:`ATTEMPTS_RETENTION_LOCK`, tried)."""

    def __init__(self, hours: int, *, batch: int = ATTEMPTS_RETENTION_BATCH) -> None:
        if hours < 0 or batch < 1:
            raise ValueError(f"retention of {hours} h in batches of {batch}")
        self.hours = hours
        self.batch = batch
        self.after = _BEGINNING
        self._backlog = 0
        """Attempts deleted since the batches began to come full (0: caught up), for the log."""

    def prune(self, engine: Engine) -> int:
        """Delete one batch of attempts older than the retention; returns how many (0 when another sweeper has the
        turn, or the retention is 0). A bounded transaction (``SET LOCAL``, as :func:`log_expiries`)."""
        if self.hours == 0:
            return 0
        with _bounded_transaction(engine) as conn:
            turn = {"space": ATTEMPTS_RETENTION_LOCK[0], "key": ATTEMPTS_RETENTION_LOCK[1]}
            if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:space, :key)"), turn).scalar_one():
                return 0
            params = {"after": self.after, "hours": self.hours, "batch": self.batch}
            deleted, newest = conn.execute(_DELETE_OLD_ATTEMPTS, params).one()
        if newest is not None:
            self.after = newest
        self._log(deleted)
        return int(deleted)

    def _log(self, deleted: int) -> None:
        # Deleting is routine (a batch a sweep once the retention is reached): logged when a backlog begins and ends.
        if deleted >= self.batch:
            if not self._backlog:
                log.info("deleting webhook attempts older than %d h, %d per sweep: a backlog", self.hours, self.batch)
            self._backlog += deleted
        elif self._backlog:
            log.info("deleted the backlog of webhook attempts older than %d h: %d", self.hours, self._backlog + deleted)
            self._backlog = 0


@dataclass(frozen=True, slots=True)
class SweepResult:
    renudged: list[str]
    expiring: list[str]
    webhooks_overdue: int = 0
    """Overdue webhook events the sweep hinted the workers about (up to 1,000; 0: no hint)."""
    webhook_attempts_deleted: int = 0
    """Webhook attempts past their retention the sweep deleted (at most a batch)."""


def sweep_once(
    engine: Engine,
    broker: RedisBroker,
    partitions: int,
    *,
    stale_after_s: float = 0.5,
    webhook_requeue_after_s: float = 10.0,
    attempts_retention: AttemptsRetention | None = None,
) -> SweepResult:
    expiring = log_expiries(engine)
    # In autocommit, its own transaction: it needs no other's.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        stale = [row.symbol for row in conn.execute(_STALE, {"stale": stale_after_s})]
    send_wakeups(broker, sorted(set(stale) | set(expiring)), partitions)
    hinted = hint_overdue(engine, broker, older_than_s=webhook_requeue_after_s)
    # Last: the wake-ups and hints are what orders and deliveries wait for.
    deleted = 0 if attempts_retention is None else attempts_retention.prune(engine)
    return SweepResult(renudged=stale, expiring=expiring, webhooks_overdue=hinted, webhook_attempts_deleted=deleted)


def run_forever(
    engine: Engine,
    broker: RedisBroker,
    partitions: int,
    *,
    interval_s: float = 1.0,
    stale_after_s: float = 0.5,
    webhook_requeue_after_s: float = 10.0,
    attempts_retention_hours: int = 0,
    stop: threading.Event | None = None,
) -> None:
    """Sweep every ``interval_s`` until ``stop`` is set; ``attempts_retention_hours``: see :class:`AttemptsRetention`
    (0: keep every webhook attempt)."""
    stop = stop or threading.Event()
    retention = AttemptsRetention(attempts_retention_hours)
    while not stop.is_set():
        started = time.monotonic()
        try:
            result = sweep_once(
                engine,
                broker,
                partitions,
                stale_after_s=stale_after_s,
                webhook_requeue_after_s=webhook_requeue_after_s,
                attempts_retention=retention,
            )
            SWEEPER_RENUDGES.inc(len(result.renudged))
            SWEEPER_ATTEMPTS_DELETED.inc(result.webhook_attempts_deleted)
            SWEEPER_EXPIRIES.inc(len(result.expiring))
            if result.renudged or result.expiring:
                log.info("sweep renudged=%s expiring=%s", result.renudged, result.expiring)
            if result.webhooks_overdue:
                log.info("sweep hinted the webhook workers about %d overdue events", result.webhooks_overdue)
        except Exception:
            # Postgres or Redis down: keep trying; the sweeper must outlive any outage.
            log.warning("sweep failed", exc_info=True)
        stop.wait(max(0.0, interval_s - (time.monotonic() - started)))

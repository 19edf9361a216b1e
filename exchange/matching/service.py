"""Process a symbol's pending commands: the one function the matcher actor calls.

Order of operations in ONE transaction (DESIGN §3): take the symbol's advisory lock; if the cached book's
version differs from ``symbols.book_version``, rebuild it from the open orders; read the unprocessed commands in
sequence order (bounded batch); apply them to the pure engine; write order states, trades, balances, positions,
outbox events, the new book version and the processed markers; commit. Only after the commit are results
published and webhook deliveries enqueued, so nothing outside Postgres ever sees uncommitted state.

Invariant: the cached book always equals what Postgres says at the cached version. While a batch is applied
the entry's version is invalid, and it becomes ``book_version + 1`` only together with the writes of the same
transaction; a failed transaction also drops the entry, because the engine already mutated the book in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from exchange.engine import OrderBook
from exchange.engine.types import Amend, Cancel, Command, Event, Place
from exchange.matching import store
from exchange.matching.commands import MalformedCommandError, to_engine_command
from exchange.matching.effects import plan_batch
from exchange.times import to_micros

log = logging.getLogger(__name__)

DEFAULT_BATCH_LIMIT = 500
_INVALID_VERSION = -1
"""Never a real ``book_version`` (those start at 0): a cached book with it is always rebuilt."""
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure
_DETERMINISTIC_SQLSTATE_CLASSES = frozenset({"22", "23"})  # data exception, integrity constraint violation


@dataclass(slots=True)
class CachedBook:
    version: int
    book: OrderBook


@dataclass(slots=True)
class BookCache:
    """Books kept in memory by one matcher process, keyed by symbol."""

    books: dict[str, CachedBook] = field(default_factory=dict)
    suspects: set[str] = field(default_factory=set)
    """Symbols whose last batch failed deterministically: processed one command at a time until the failing
    command is quarantined or nothing is pending."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    symbol: str
    commands: int
    trades: int
    order_ids: list[UUID]
    """Orders whose state changed, for the api workers waiting on them."""
    event_ids: list[UUID]
    """Outbox events written, to hand to the webhook queue."""
    more: bool
    """The batch was full: more commands may be waiting."""
    rebuilt: bool


def process_symbol(
    engine: Engine,
    cache: BookCache,
    symbol: str,
    *,
    batch_limit: int = DEFAULT_BATCH_LIMIT,
    before_read: Callable[[], None] | None = None,
) -> BatchResult:
    """Apply one batch of ``symbol``'s pending commands. Retries deadlocks/serialization failures a few times.

    ``before_read`` runs after the lock is held and before the command log is read (the wake-up key is cleared
    there: see :mod:`exchange.messaging.wakeups`).

    A command that fails the same way on every attempt (bad data: SQLSTATE class 22 or 23, e.g. a balance leaving
    the 64-bit range; or a malformed command row) must not wedge its symbol, because every retry would read the
    same batch in the same order and fail again. The batch is retried one command at a time to find it, and that
    command alone is quarantined: marked processed, its pending order closed ``rejected``, and logged.
    """
    if symbol in cache.suspects:
        batch_limit = 1
    for attempt in range(4):
        try:
            result = _process_once(engine, cache, symbol, batch_limit, before_read)
            if result.commands == 0:
                cache.suspects.discard(symbol)
            return result
        except DBAPIError as exc:
            cache.books.pop(symbol, None)
            sqlstate = getattr(exc.orig, "sqlstate", None) or ""
            if sqlstate in _RETRYABLE_SQLSTATES and attempt < 3:
                log.warning("retrying %s after %s", symbol, sqlstate)
                time.sleep(0.01 * (attempt + 1))
                continue
            if sqlstate[:2] not in _DETERMINISTIC_SQLSTATE_CLASSES:
                raise  # connection lost, server shutting down, ...: dramatiq and the sweeper try again later
            return _isolate_poison(engine, cache, symbol, batch_limit, before_read, exc)
        except MalformedCommandError as exc:
            cache.books.pop(symbol, None)
            return _isolate_poison(engine, cache, symbol, batch_limit, before_read, exc)
        except BaseException:
            cache.books.pop(symbol, None)
            raise
    raise AssertionError("unreachable")


def _isolate_poison(
    engine: Engine,
    cache: BookCache,
    symbol: str,
    batch_limit: int,
    before_read: Callable[[], None] | None,
    error: Exception,
) -> BatchResult:
    if batch_limit > 1:
        # The failing command may be anywhere in the batch: apply the commands one at a time from the first.
        cache.suspects.add(symbol)
        return process_symbol(engine, cache, symbol, batch_limit=1, before_read=before_read)
    with engine.begin() as conn:
        _, now = store.lock_book(conn, symbol)
        quarantined = store.quarantine_first_pending(conn, symbol, now)
    cache.suspects.discard(symbol)
    if quarantined is None:
        raise error  # nothing pending any more: the failure was not the command's
    log.error(
        "quarantined command seq=%s kind=%s order_id=%s of %s: %s",
        quarantined.seq,
        quarantined.kind,
        quarantined.order_id,
        symbol,
        error,
    )
    order_ids = [] if quarantined.order_id is None else [quarantined.order_id]
    return BatchResult(symbol, 1, 0, order_ids, [], more=True, rebuilt=False)


def _process_once(
    engine: Engine,
    cache: BookCache,
    symbol: str,
    batch_limit: int,
    before_read: Callable[[], None] | None,
) -> BatchResult:
    with engine.begin() as conn:
        version, now = store.lock_book(conn, symbol)
        if before_read is not None:
            before_read()
        rows = store.pending_commands(conn, symbol, batch_limit)
        if not rows:
            return BatchResult(symbol, 0, 0, [], [], more=False, rebuilt=False)
        cached = cache.books.get(symbol)
        rebuilt = cached is None or cached.version != version
        if cached is None or rebuilt:
            cached = CachedBook(version, OrderBook.rebuild(symbol, store.open_orders(conn, symbol)))
            cache.books[symbol] = cached
        book = cached.book
        # From here the in-memory book runs ahead of Postgres. Mark it invalid first, so if anything fails before
        # the commit (even in a way that skips our exception handler, or while another thread of this process
        # already holds the lock we just released) the next holder rebuilds it instead of trusting it.
        cached.version = _INVALID_VERSION
        now_us = to_micros(now)
        applied: list[tuple[Command, list[Event]]] = []
        for row in rows:
            command = to_engine_command(row, symbol)
            applied.append((command, book.apply(command, now_us)))
        touched = _touched_orders(applied)
        meta = store.order_meta(conn, touched)
        resting_after = {oid: r for oid in touched if (r := book.get(oid)) is not None}
        owners = {oid: (m.broker_id, m.side) for oid, m in meta.items()}
        plan = plan_batch(applied, resting_after, owners)
        written = store.write_batch(conn, symbol, now, plan, meta, [row.seq for row in rows])
        cached.version = version + 1
    return BatchResult(
        symbol=symbol,
        commands=len(rows),
        trades=len(plan.trades),
        order_ids=touched,
        event_ids=written,
        more=len(rows) >= batch_limit,
        rebuilt=rebuilt,
    )


def _touched_orders(applied: list[tuple[Command, list[Event]]]) -> list[UUID]:
    """Every order a command named or an event mentions, in first-seen order. It includes orders whose command
    changed nothing (a rejected cancel or amend): their waiters must hear the command was processed instead of
    waiting out their timeout."""
    seen: dict[UUID, None] = {}
    for command, events in applied:
        if isinstance(command, Place):
            seen[command.order.order_id] = None
        elif isinstance(command, Cancel | Amend):
            seen[command.order_id] = None
        for event in events:
            for attr in ("order_id", "maker_order_id", "taker_order_id"):
                value = getattr(event, attr, None)
                if isinstance(value, UUID):
                    seen[value] = None
    return list(seen)

"""Process a symbol's pending commands: the one function the matcher actor calls.

Order of operations in ONE transaction (DESIGN §3): take the symbol's advisory lock; read ``symbols.book_version``
and the unprocessed commands in sequence order (bounded batch); if the cached book's version differs, rebuild it
from the open orders; apply the commands to the pure engine; write order states, trades, balances, positions,
outbox events, the new book version and the processed markers; commit. That is two round trips to Postgres per
batch (see :mod:`exchange.matching.store`), plus one when the book is rebuilt. Only after the commit are results
published and webhook deliveries enqueued, so nothing outside Postgres ever sees uncommitted state.

Invariant: the cached book always equals what Postgres says at the cached version. While a batch is applied
the entry's version is invalid, and it becomes ``book_version + 1`` only once the COMMIT carrying the batch's
writes has succeeded; a failed transaction also drops the entry, because the engine already mutated the book in
memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from uuid import UUID

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from exchange.db.errors import is_deterministic, is_retryable, sqlstate
from exchange.engine import OrderBook
from exchange.engine.types import Amend, Cancel, Command, Event, Place, Side
from exchange.matching import store
from exchange.matching.commands import MalformedCommandError, to_engine_command
from exchange.matching.effects import plan_batch
from exchange.times import to_micros

log = logging.getLogger(__name__)

DEFAULT_BATCH_LIMIT = 500
_INVALID_VERSION = -1
"""Never a real ``book_version`` (those start at 0): a cached book with it is always rebuilt."""


@dataclass(slots=True)
class CachedBook:
    version: int
    book: OrderBook
    owners: dict[UUID, tuple[UUID, Side]]
    """(broker, side) of every order resting in ``book``: a ``Closed`` event names only its order, and the outbox
    event it produces needs the owner. Kept next to the book (filled on rebuild and from each batch's places,
    emptied of orders that leave the book) so that a batch needs no query for it."""


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
    engine: Engine, cache: BookCache, symbol: str, *, batch_limit: int = DEFAULT_BATCH_LIMIT
) -> BatchResult:
    """Apply one batch of ``symbol``'s pending commands. Retries deadlocks/serialization failures a few times.

    A command that fails the same way on every attempt (bad data: SQLSTATE class 22 or 23, e.g. a balance leaving
    the 64-bit range; or a malformed command row) must not wedge its symbol, because every retry would read the
    same batch in the same order and fail again. The batch is retried one command at a time to find it, and that
    command alone is quarantined: marked processed, its pending order closed ``rejected``, and logged.
    """
    if symbol in cache.suspects:
        batch_limit = 1
    for attempt in range(4):
        try:
            result = _process_once(engine, cache, symbol, batch_limit)
            if result.commands == 0:
                cache.suspects.discard(symbol)
            return result
        except (DBAPIError, psycopg.Error) as exc:
            cache.books.pop(symbol, None)
            if is_retryable(exc) and attempt < 3:
                log.warning("retrying %s after %s", symbol, sqlstate(exc))
                time.sleep(0.01 * (attempt + 1))
                continue
            if not is_deterministic(exc):
                raise  # connection lost, server shutting down, ...: dramatiq and the sweeper try again later
            return _isolate_poison(engine, cache, symbol, batch_limit, exc)
        except MalformedCommandError as exc:
            cache.books.pop(symbol, None)
            return _isolate_poison(engine, cache, symbol, batch_limit, exc)
        except BaseException:
            cache.books.pop(symbol, None)
            raise
    raise AssertionError("unreachable")


def _isolate_poison(engine: Engine, cache: BookCache, symbol: str, batch_limit: int, error: Exception) -> BatchResult:
    if batch_limit > 1:
        # The failing command may be anywhere in the batch: apply the commands one at a time from the first.
        cache.suspects.add(symbol)
        return process_symbol(engine, cache, symbol, batch_limit=1)
    with store.connect(engine) as conn:
        quarantined = store.quarantine_first_pending(conn, symbol)
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


def _process_once(engine: Engine, cache: BookCache, symbol: str, batch_limit: int) -> BatchResult:
    with store.connect(engine) as conn:
        start = store.begin_batch(conn, symbol, batch_limit)
        if not start.commands:
            return BatchResult(symbol, 0, 0, [], [], more=False, rebuilt=False)  # store.connect rolls back
        cached = cache.books.get(symbol)
        rebuilt = cached is None or cached.version != start.version
        if cached is None or rebuilt:
            resting = store.open_orders(conn, symbol)
            owners = {o.order_id: (o.broker_id, o.side) for o in resting}
            cached = CachedBook(start.version, OrderBook.rebuild(symbol, resting), owners)
            cache.books[symbol] = cached
        book, owners = cached.book, cached.owners
        # From here the in-memory book runs ahead of Postgres. Mark it invalid first, so if anything fails before
        # the commit (even in a way that skips our exception handler, or while another thread of this process
        # already holds the lock we just released) the next holder rebuilds it instead of trusting it.
        cached.version = _INVALID_VERSION
        now_us = to_micros(start.now)
        applied: list[tuple[Command, list[Event]]] = []
        for row in start.commands:
            command = to_engine_command(row, symbol)
            if isinstance(command, Place):
                owners[command.order.order_id] = (command.order.broker_id, command.order.side)
            applied.append((command, book.apply(command, now_us)))
        touched = _touched_orders(applied)
        resting_after = {oid: r for oid in touched if (r := book.get(oid)) is not None}
        plan = plan_batch(applied, resting_after, owners)
        event_ids = store.write_batch(conn, symbol, start.now, plan, [row.seq for row in start.commands])
        cached.version = start.version + 1
        for order_id in touched:
            if order_id not in resting_after:
                owners.pop(order_id, None)  # closed or never rested: keep the map as small as the book
    return BatchResult(
        symbol=symbol,
        commands=len(start.commands),
        trades=len(plan.trades),
        order_ids=touched,
        event_ids=event_ids,
        more=len(start.commands) >= batch_limit,
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

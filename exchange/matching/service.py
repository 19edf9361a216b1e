"""Process symbols' pending commands: what the matcher actor calls (:func:`drain`, built on
:func:`process_symbols` and :func:`process_symbol`).

Order of operations in ONE transaction (DESIGN §3), for one symbol or a group of up to :data:`MAX_SYMBOLS_PER_BATCH`
symbols (one dramatiq message names all the symbols of its partition woken together): take the symbols' advisory locks
in ascending key order; read each ``symbols.book_version`` and its unprocessed commands in sequence order (bounded batch
per symbol); rebuild every cached book whose version differs from the open orders; apply each symbol's commands to its
book with the pure engine (as many as surely fit :data:`MAX_EVENTS_PER_TRANSACTION`, which bounds the work done between
the two round trips); write all the books' order states, trades, balances, positions, outbox events, new book versions
and processed markers; commit. That is two round trips to Postgres per transaction whatever the number of symbols (see
:mod:`exchange.matching.store`), plus one when books are rebuilt (one for all of them, plus one per further
:data:`~exchange.matching.store.REBUILD_CHUNK` open orders: a big book is read a chunk at a time, so the transaction
never sits idle long) and one when a symbol row is new. Only after the commit are results published and webhook
deliveries enqueued, so nothing outside Postgres ever sees uncommitted state.

Invariants:

* The cached book always equals what Postgres says at the cached version. While a batch is applied the entry's
  version is invalid, and it becomes ``book_version + 1`` only once the COMMIT carrying the batch's writes has
  succeeded; a failed transaction also drops the entries of all its symbols, because the engine already mutated
  the books in memory.
* A group's transaction commits all of its books or none. When it fails, each symbol goes through the one-symbol
  path (:func:`process_symbol`: deadlock retries, then isolation and quarantine of a poison command), so a bad
  command costs its own book a few single-command transactions and the other books nothing. Any other failure of a
  symbol's own (a book that cannot be rebuilt, a bug, a database error that the database does not repeat for a new
  connection) costs that symbol a backoff and the others nothing; the database's failures are raised.
* Commands are applied per book in sequence order, each exactly once: it is marked processed in the transaction
  that applies it, under its book's lock, and a later batch reads only unprocessed ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from uuid import UUID

import psycopg
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from exchange.db.errors import is_deterministic, is_retryable, sqlstate
from exchange.engine import MAX_COMMAND_EVENTS, OrderBook
from exchange.engine.types import Amend, Cancel, Command, Event, ExpireDue, Place, RestingOrder, Side
from exchange.heap import collector_paused
from exchange.matching import store
from exchange.matching.commands import MalformedCommandError, to_engine_command
from exchange.matching.effects import BatchEffects, plan_batch
from exchange.messaging.results import PlacedState, PlacedTrade
from exchange.observability import metrics
from exchange.times import to_micros

log = logging.getLogger(__name__)

DEFAULT_BATCH_LIMIT = 500
"""Commands per transaction: all of one symbol's, or shared out among the symbols of a multi-symbol batch."""
MAX_SYMBOLS_PER_BATCH = 32
"""Symbols per transaction: bounds the locks held, the statement sizes and the work lost to one failure."""
FAILURE_BACKOFF_S = 1.0
"""How long the matcher leaves a book alone after its processing failed on its own (see :class:`BookCache`); doubled
by each further failure in a row, up to :data:`MAX_FAILURE_BACKOFF_S`."""
MAX_FAILURE_BACKOFF_S = 60.0
MAX_DATABASE_ERROR_BACKOFF_S = 8.0
"""The longest backoff after database errors that the database did not repeat for a new connection: most are this
process's own and pass (frozen past the idle limit, a lock or statement timeout, a deadlock after
:func:`process_symbol`'s retries), so a healthy book must not wait a minute for one."""
DATABASE_WIDE_CLASSES = ("08", "53", "58")
"""SQLSTATE classes every book would meet: the connection (pgbouncer's ``query_wait_timeout`` while PostgreSQL is
down included), insufficient resources (a full disk, out of memory, too many connections), system errors (I/O)."""
DATABASE_WIDE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "57P04", "XX001", "XX002"})
"""Besides :data:`DATABASE_WIDE_CLASSES`: the server shutting down or starting, the database dropped, corrupted
data or index."""
MAX_EXPIRIES_PER_TRANSACTION = 5000
"""Due orders one transaction closes, shared out equally among its books. Closing N orders costs the matcher some
15-40 µs each on the project's machines between its two round trips, while the transaction may sit idle only
:data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS`: unbounded, a book with 100,000 due orders (a sweeper down for
hours, a whole book's end-of-day deadline) failed that way on every attempt, whether an ``expire`` command or an
order crossing them closed them, and was wedged with every command after. So a book with more due orders than its
share when its batch starts closes a share of them, earliest deadlines first, *instead of* applying its commands
(they stay pending; its drain goes on with it), until it has no more: no command of it then meets more than a
share of expired orders, an ``expire`` included."""
MAX_EVENTS_PER_TRANSACTION = 6000
"""Engine events the commands of one transaction may make, all its books together: a command is applied only while
the events made so far plus :data:`~exchange.engine.types.MAX_COMMAND_EVENTS` (the most one command makes, 2,002,
by the engine's match cap :data:`~exchange.engine.types.MAX_TAKER_MATCHES`) fit in it; the other commands stay
pending for the next transaction (the book's result says ``more``), and the books of a group that got none of their
commands in are the drain's next transaction, before any other book (:attr:`BatchResult.deferred`): its first book's
first command always fits.

Why: each event costs the matcher CPU between its two round trips (applying it, planning its rows and encoding
them for ``matcher_write``: some 40-50 us an event, 80-100 us a fill with its maker's close, measured on the
project's 2-core machine), while the transaction may sit idle only :data:`~exchange.db.engines.IDLE_HOLDER_LIMIT_MS`
(2 s). The match cap alone bounds one command; a batch of ``DEFAULT_BATCH_LIMIT`` (500) deep sweeps would still
make a million events, and fail that way on every attempt, wedging its books.

The bound: the commands of one transaction make at most ``MAX_EVENTS_PER_TRANSACTION`` events besides the expired
orders they close; each book closes at most its share of :data:`MAX_EXPIRIES_PER_TRANSACTION` expired orders, by
its commands (a book with more due was taken as a backlog) or as a backlog. So at most 6,000 + 5,000 events, some
0.3 s + 0.2 s of matcher work in the worst case: four times under the idle limit. (``DEFAULT_BATCH_LIMIT`` and
``MAX_TAKER_MATCHES`` alone bounded it only by 500 x 2,002 events.)"""
assert MAX_COMMAND_EVENTS <= MAX_EVENTS_PER_TRANSACTION  # a book processed alone always applies its first command
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
    failing: dict[str, Failing] = field(default_factory=dict)
    """Symbols whose processing failed on their own (not the database's failure, nor a command's that is
    quarantined: a book that cannot be rebuilt, a bug, a database error that the next transaction did not meet):
    left alone until ``retry_at`` (a wake-up before then finds nothing done and its commands stay pending), then
    processed alone, outside any group, until a batch of theirs succeeds. So a book that fails every time costs a
    partition one attempt per backoff, not every wake-up. A result that leaves a symbol pending for its backoff says
    when the backoff ends (:attr:`BatchResult.retry_at`): the matcher wakes the symbol then
    (:class:`~exchange.messaging.wakeups.RetryWakeups`), so it waits its backoff, not the sweeper's next pass."""


@dataclass(slots=True)
class Failing:
    failures: int
    """In a row."""
    retry_at: float
    """``time.monotonic()`` before which the symbol is not processed."""


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
    """The batch was full, some of its commands were left for the next transaction (a backlog's expiry took their
    place, or they did not fit :data:`MAX_EVENTS_PER_TRANSACTION`), or its symbol must be taken again at once (see
    :func:`_isolate_poison`): more commands may be waiting."""
    rebuilt: bool
    placed: list[PlacedState] = field(default_factory=list)
    """The committed state of each order placed by this batch, published with ``order_ids``."""
    retry_at: float | None = None
    """Set when the symbol's commands were left pending for a backoff (see :attr:`BookCache.failing`): when it ends
    (``time.monotonic()``), the time to wake the symbol again. None otherwise (a backoff of 0 is ``more``)."""
    deferred: bool = False
    """None of the symbol's commands fitted in its group's transaction (:data:`MAX_EVENTS_PER_TRANSACTION`): it is
    to be processed next, before any other symbol (:func:`drain` does so, once this transaction's results are handed
    on). Never set for a symbol processed alone, nor for the first of a transaction's books."""


def process_symbol(
    engine: Engine, cache: BookCache, symbol: str, *, batch_limit: int = DEFAULT_BATCH_LIMIT
) -> BatchResult:
    """Apply one batch of ``symbol``'s pending commands. Retries deadlocks/serialization failures a few times.

    A command that fails the same way on every attempt (bad data: SQLSTATE class 22 or 23, e.g. a balance leaving
    the 64-bit range; or a malformed command row) must not wedge its symbol, because every retry would read the
    same batch in the same order and fail again. The batch is retried one command at a time to find it, and that
    command alone is quarantined: marked processed, its pending order closed ``rejected`` (its broker told by an
    ``order.rejected`` event), and logged; never another one (a command with a lower sequence number that
    committed after the failed attempt read is applied first).
    """
    if symbol in cache.suspects:
        batch_limit = 1
    for attempt in range(4):
        read: list[int] | None = [] if batch_limit == 1 else None  # only a single command's failure quarantines it
        try:
            [result] = _process_once(engine, cache, [symbol], batch_limit, read)
            if result.commands == 0 and not result.more:  # not a backlog's expiry: nothing was pending
                cache.suspects.discard(symbol)
            return result
        except (DBAPIError, psycopg.Error) as exc:
            if is_retryable(exc) and attempt < 3:
                log.warning("retrying %s after %s", symbol, sqlstate(exc))
                time.sleep(0.01 * (attempt + 1))
                continue
            if not is_deterministic(exc):
                raise  # connection lost, server shutting down, ...: dramatiq and the sweeper try again later
            return _isolate_poison(engine, cache, symbol, batch_limit, read, exc)
        except MalformedCommandError as exc:
            return _isolate_poison(engine, cache, symbol, batch_limit, read, exc)
    raise AssertionError("unreachable")


def _isolate_poison(
    engine: Engine, cache: BookCache, symbol: str, batch_limit: int, read: Sequence[int] | None, error: Exception
) -> BatchResult:
    """After a deterministic failure of a batch of ``symbol`` that read the commands ``read``: retry one command at
    a time, or, if the failed batch was that single command, quarantine exactly it."""
    if batch_limit > 1:
        # The failing command may be anywhere in the batch: apply the commands one at a time from the first.
        cache.suspects.add(symbol)
        return process_symbol(engine, cache, symbol, batch_limit=1)
    if not read:
        cache.suspects.discard(symbol)
        raise error  # it failed before reading a command: the failure was not a command's
    [seq] = read
    with store.connect(engine) as conn:
        quarantined = store.quarantine_command(conn, symbol, seq)
    if quarantined is None:
        # The failed command is no longer the symbol's first pending one: another matcher processed it, or a
        # command with a lower sequence number committed after the attempt read (a late group commit, a cancel).
        # That one must be applied first, so go on one command at a time from the first pending.
        return BatchResult(symbol, 0, 0, [], [], more=True, rebuilt=False)
    cache.suspects.discard(symbol)
    log.error(
        "quarantined command seq=%s kind=%s order_id=%s of %s: %s",
        quarantined.seq,
        quarantined.kind,
        quarantined.order_id,
        symbol,
        error,
    )
    order_ids = [] if quarantined.order_id is None else [quarantined.order_id]
    return BatchResult(symbol, 1, 0, order_ids, quarantined.event_ids, more=True, rebuilt=False)


def _placed_states(
    symbol: str,
    plan: BatchEffects,
    placed_ids: Sequence[UUID],
    trade_ids: dict[tuple[int, int], UUID],
    names: dict[UUID, str],
    now_us: int,
) -> list[PlacedState]:
    """What the api shows of each order this batch placed, exactly as ``store.write_batch`` committed it: the
    columns its ``UPDATE orders`` wrote (``None`` kept the placed value) and every trade of the order, all of them
    in this batch. An order without an update, or with a counterparty whose name is unknown, gets no state (its
    waiter reads it back). Runs after the COMMIT, so it never raises: the committed batch would be retried as
    failed and its results never published; on a bug it returns no states (the waiters read their orders back)."""
    try:
        placed = set(placed_ids)
        trades_of: dict[UUID, list[PlacedTrade | None]] = {order_id: [] for order_id in placed}
        for t in plan.trades:  # in application order: command sequence, then match number
            for order_id, counterparty_id in ((t.buy_order_id, t.sell_broker_id), (t.sell_order_id, t.buy_broker_id)):
                if order_id in placed:
                    name = names.get(counterparty_id)
                    trade_id = trade_ids[(t.seq, t.match_no)]
                    trades_of[order_id].append(
                        None if name is None else PlacedTrade(trade_id, t.price, t.quantity, name, now_us)
                    )
        states: list[PlacedState] = []
        for order_id in placed_ids:
            update = plan.orders.get(order_id)
            trades = trades_of[order_id]
            if update is not None and None not in trades:
                states.append(
                    PlacedState(
                        order_id=order_id,
                        status=update.status,
                        close_reason=update.close_reason,
                        remaining=update.remaining,
                        price=update.price,
                        quantity=update.quantity,
                        updated_us=now_us,
                        trades=[t for t in trades if t is not None],
                    )
                )
        return states
    except Exception:
        log.exception("placed states of %s not published; waiters will read their orders back", symbol)
        return []


def process_symbols(
    engine: Engine, cache: BookCache, symbols: Sequence[str], *, batch_limit: int = DEFAULT_BATCH_LIMIT
) -> list[BatchResult]:
    """Apply one batch of each of ``symbols`` (at most :data:`MAX_SYMBOLS_PER_BATCH` distinct ones) in ONE
    transaction: two round trips in all instead of two per symbol. Returns one result per distinct symbol, in the
    order given.

    Each symbol's batch holds up to ``ceil(batch_limit / n)`` of its commands, so the whole transaction stays near
    ``batch_limit`` commands; a symbol with more reports ``more``, and so does one whose commands did not all fit
    :data:`MAX_EVENTS_PER_TRANSACTION` (one that got none in also reports ``deferred``). A suspect symbol (see
    :class:`BookCache`) is left out of the group and processed alone, one command at a time; a failing one is left alone
    until its backoff is over (a batch of nothing), then processed alone. If the group's transaction fails in any way (a
    deterministic data error, a malformed command, a deadlock, anything unexpected) nothing of it was committed (or, if
    the COMMIT's answer was lost, all of it was: the command log says which): every symbol of the group is then
    processed by :func:`process_symbol` on its own, which retries, isolates and quarantines as usual, so a poison
    command in one book never stops the others and no command is lost or applied twice.
    """
    wanted = list(dict.fromkeys(symbols))
    if len(wanted) > MAX_SYMBOLS_PER_BATCH:
        raise ValueError(f"{len(wanted)} symbols in one batch; at most {MAX_SYMBOLS_PER_BATCH}")
    results: dict[str, BatchResult] = {}
    now = time.monotonic()
    for symbol in wanted:
        failing = cache.failing.get(symbol)
        if failing is not None and now < failing.retry_at:
            # Backing off: nothing done, and when to come back.
            results[symbol] = BatchResult(symbol, 0, 0, [], [], more=False, rebuilt=False, retry_at=failing.retry_at)
    group = [symbol for symbol in wanted if symbol not in cache.suspects and symbol not in cache.failing]
    if len(group) == 1:
        results[group[0]] = _alone(engine, cache, group[0], batch_limit)
    elif group:
        try:
            for result in _process_once(engine, cache, group, -(-batch_limit // len(group))):
                results[result.symbol] = result
        except Exception as exc:
            expected = isinstance(exc, DBAPIError | psycopg.Error | MalformedCommandError)
            log.warning(
                "a batch of %d symbols failed (%s); processing them one by one",
                len(group),
                _describe(exc),
                exc_info=not expected,  # a bug deserves its traceback; data errors are logged when quarantined
            )
            for symbol in group:
                results[symbol] = _alone(engine, cache, symbol, batch_limit)
    for symbol in wanted:
        if symbol not in results:  # a suspect, or a failing symbol whose backoff is over
            results[symbol] = _alone(engine, cache, symbol, batch_limit)
    return [results[symbol] for symbol in wanted]


def _alone(engine: Engine, cache: BookCache, symbol: str, batch_limit: int) -> BatchResult:
    """:func:`process_symbol`, except that a failure of this symbol's own costs this symbol only: logged with its
    traceback, counted (``exchange_match_symbol_failures_total``) and answered as a batch of nothing, its commands
    left pending, the symbol left alone for a backoff (see :class:`BookCache`; the result's ``retry_at`` says until
    when), so that the symbols after it go on.

    The database's failures are raised as they come, as every other symbol would meet them
    (:func:`_database_wide`): dramatiq retries the message, the sweeper re-nudges what is left."""
    try:
        result = process_symbol(engine, cache, symbol, batch_limit=batch_limit)
    except Exception as exc:
        if _database_wide(engine, exc):
            raise
        failing = cache.failing.get(symbol)
        failures = 1 if failing is None else failing.failures + 1
        backoff = _backoff_s(exc, failures)
        retry_at = time.monotonic() + backoff
        cache.failing[symbol] = Failing(failures, retry_at)
        metrics.MATCH_SYMBOL_FAILURES.inc()
        log.log(
            logging.WARNING if isinstance(exc, DBAPIError | psycopg.Error) else logging.ERROR,  # a bug's: an error
            "processing %s failed (%s, %d in a row); its commands stay pending, %s, the other symbols go on",
            symbol,
            _describe(exc),
            failures,
            "it is tried again at once, alone" if backoff == 0 else f"it is left alone for {backoff:g} s",
            exc_info=True,
        )
        # Tried again at once: its drain goes on with it (``more``), alone (it is in ``cache.failing``). Otherwise
        # the caller wakes it when the backoff ends (``retry_at``).
        return BatchResult(
            symbol, 0, 0, [], [], more=not backoff, rebuilt=False, retry_at=retry_at if backoff else None
        )
    cache.failing.pop(symbol, None)
    return result


def _backoff_s(exc: Exception, failures: int) -> float:
    """How long a symbol whose processing failed on its own ``failures`` times in a row is left alone. A database
    error (which the database did not repeat for a new connection: :func:`_database_wide`) is most likely this
    process's own and passing: the first in a row is retried at once, then 1 s doubling up to
    :data:`MAX_DATABASE_ERROR_BACKOFF_S`. Anything else (a bug, a book that cannot be rebuilt from its rows) fails
    again the same way: 1 s doubling up to :data:`MAX_FAILURE_BACKOFF_S`."""
    if isinstance(exc, DBAPIError | psycopg.Error):
        if failures == 1:
            return 0.0
        return min(FAILURE_BACKOFF_S * 2.0 ** (failures - 2), MAX_DATABASE_ERROR_BACKOFF_S)
    return min(FAILURE_BACKOFF_S * 2.0 ** (failures - 1), MAX_FAILURE_BACKOFF_S)


def _database_wide(engine: Engine, exc: Exception) -> bool:
    """Whether ``exc``, raised by one symbol's processing, is the database's failure rather than that symbol's:
    a connection error (class 08: through pgbouncer, PostgreSQL down) or one of :data:`DATABASE_WIDE_SQLSTATES`; and
    for any other database error (a session ended mid-transaction, e.g. by the idle-in-transaction limit; the client
    library's own failure, which a refused connect also is), when a new connection cannot run ``SELECT 1`` either.
    A failure that is not the database's (a bug, a book that cannot be rebuilt) is the symbol's."""
    if isinstance(exc, SQLAlchemyTimeoutError | DisconnectionError):
        return True  # the engine's pool: no connection to be had (every book would wait for one)
    if not isinstance(exc, DBAPIError | psycopg.Error):
        return False
    state = sqlstate(exc)
    if state[:2] in DATABASE_WIDE_CLASSES or state in DATABASE_WIDE_SQLSTATES:
        return True
    try:
        with store.connect(engine) as conn:
            store.ping(conn)
    except (DBAPIError, psycopg.Error):
        log.warning("a new connection failed too after a symbol's processing failed: the database's failure")
        return True
    return False


@dataclass(frozen=True, slots=True)
class Round:
    """One transaction of :func:`drain`: its results, and whether it was the last (nothing of the symbols drained
    was left over for another one)."""

    results: list[BatchResult]
    last: bool
    left: list[str] = field(default_factory=list)
    """The symbols the drain has still to process after this round (none when ``last``): what a caller that stops
    the drain here hands on."""


def drain(
    engine: Engine,
    cache: BookCache,
    symbols: Iterable[str],
    *,
    batch_limit: int = DEFAULT_BATCH_LIMIT,
    max_symbols: int = MAX_SYMBOLS_PER_BATCH,
) -> Iterator[Round]:
    """Process ``symbols`` until none has a full batch left: :func:`process_symbols` over groups of up to
    ``max_symbols``, then again over the symbols whose batch was full, after the rest. Yields each group's results
    once they are committed (for the caller to publish before the next group runs).

    The books a group's transaction had no room for (:attr:`BatchResult.deferred`) are the next group, before any
    other: its first book always gets a command in, so each of them waits at most for the deferred books before it,
    never for the others' sweeps; and the group they were left out of is handed on first, not held back by their
    transactions (deep sweeps, perhaps, one after another)."""
    queue = list(dict.fromkeys(symbols))
    deferred: list[str] = []
    while queue or deferred:
        if deferred:
            group, deferred = deferred, []
        else:
            group, queue = queue[:max_symbols], queue[max_symbols:]
        results = process_symbols(engine, cache, group, batch_limit=batch_limit)
        deferred = [result.symbol for result in results if result.deferred]
        queue.extend(result.symbol for result in results if result.more and not result.deferred)
        yield Round(results, last=not queue and not deferred, left=deferred + queue)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError | psycopg.Error):
        return f"SQLSTATE {sqlstate(exc) or 'none'}"
    return type(exc).__name__


def _process_once(
    engine: Engine, cache: BookCache, symbols: list[str], batch_limit: int, read: list[int] | None = None
) -> list[BatchResult]:
    """One transaction over the books of ``symbols`` (distinct), up to ``batch_limit`` commands of each; the
    sequence numbers of the commands it read are appended to ``read`` as soon as they are read. If it fails in any
    way, the symbols' cached books are dropped (they may have run ahead of what was committed)."""
    try:
        return _transaction(engine, cache, symbols, batch_limit, read)
    except BaseException:
        for symbol in symbols:
            cache.books.pop(symbol, None)
        raise


def _transaction(
    engine: Engine, cache: BookCache, symbols: list[str], batch_limit: int, read: list[int] | None
) -> list[BatchResult]:
    with store.connect(engine) as conn, ExitStack() as rebuilding:
        start = store.begin_batch(conn, symbols, batch_limit)
        if read is not None:
            read.extend(row.seq for rows in start.commands.values() for row in rows)
        if not start.commands:
            return [BatchResult(symbol, 0, 0, [], [], more=False, rebuilt=False) for symbol in symbols]
        entries: dict[str, CachedBook] = {}
        stale: list[str] = []
        for symbol in start.commands:
            cached = cache.books.get(symbol)
            if cached is None or cached.version != start.versions[symbol]:
                stale.append(symbol)
            else:
                entries[symbol] = cached
        if stale:
            # A big book is hundreds of thousands of new objects: no collection walks them before the transaction ends.
            rebuilding.enter_context(collector_paused())
            for symbol, rebuilt in _rebuild(conn, stale).items():
                entries[symbol] = CachedBook(start.versions[symbol], *rebuilt)
                cache.books[symbol] = entries[symbol]
        # From here the in-memory books run ahead of Postgres. Mark them invalid first, so if anything fails before
        # the commit (even in a way that skips our exception handler, or while another thread of this process
        # already holds a lock we just released) the next holder rebuilds them instead of trusting them.
        for cached in entries.values():
            cached.version = _INVALID_VERSION
        now_us = to_micros(start.now)
        share = max(1, MAX_EXPIRIES_PER_TRANSACTION // len(start.commands))
        events_made = 0  # by the commands applied so far, every book (see MAX_EVENTS_PER_TRANSACTION)
        batches: list[store.BookBatch] = []
        touched: dict[str, tuple[list[UUID], dict[UUID, RestingOrder]]] = {}
        placed_ids: dict[str, list[UUID]] = {}
        backlogged: set[str] = set()
        applied_rows: dict[str, int] = {}
        for symbol, rows in start.commands.items():
            book, owners = entries[symbol].book, entries[symbol].owners
            applied: list[tuple[Command, list[Event]]] = []
            placed_ids[symbol] = []
            if book.more_due_than(share, now_us):
                # A backlog of due orders (see MAX_EXPIRIES_PER_TRANSACTION): a share of it now, the commands once
                # it is gone. The expiry is no command of the log: it takes the first pending one's seq for its
                # events (it decides nothing by it), and marks nothing processed.
                backlogged.add(symbol)
                expiry = ExpireDue(rows[0].seq, share)
                applied.append((expiry, book.apply(expiry, now_us)))
                rows = []
            fitted = 0
            for row in rows:
                if events_made + MAX_COMMAND_EVENTS > MAX_EVENTS_PER_TRANSACTION:
                    break  # this one might not fit: it and the rest wait for the next transaction
                command = to_engine_command(row, symbol)
                if isinstance(command, Place):
                    owners[command.order.order_id] = (command.order.broker_id, command.order.side)
                    placed_ids[symbol].append(command.order.order_id)
                events = book.apply(command, now_us)
                events_made += len(events)
                applied.append((command, events))
                fitted += 1
            left = {row.seq for row in start.commands[symbol][fitted:]}
            if read is not None and left:  # not applied: a failure of this transaction is not theirs
                read[:] = [seq for seq in read if seq not in left]
            rows = rows[:fitted]
            applied_rows[symbol] = len(rows)
            order_ids = _touched_orders(applied)
            resting_after = {oid: r for oid in order_ids if (r := book.get(oid)) is not None}
            touched[symbol] = (order_ids, resting_after)
            batches.append(store.BookBatch(symbol, plan_batch(applied, resting_after, owners), [r.seq for r in rows]))
        written = store.write_batch(conn, start.now, batches)
        event_ids = written.event_ids
        for symbol, cached in entries.items():
            order_ids, resting_after = touched[symbol]
            for order_id in order_ids:
                if order_id not in resting_after:
                    cached.owners.pop(order_id, None)  # closed or never rested: keep the map as small as the book
            cached.version = start.versions[symbol] + 1  # last: the entry is trusted again only once it is whole
    planned = {batch.symbol: batch for batch in batches}
    results: list[BatchResult] = []
    for symbol in symbols:
        if symbol not in start.commands:
            results.append(BatchResult(symbol, 0, 0, [], [], more=False, rebuilt=False))
            continue
        commands = applied_rows[symbol]
        left_over = commands < len(start.commands[symbol])  # a backlog's expiry, or no room for all its commands
        results.append(
            BatchResult(
                symbol=symbol,
                commands=commands,
                trades=len(planned[symbol].plan.trades),
                order_ids=touched[symbol][0],
                event_ids=event_ids[symbol],
                more=commands >= batch_limit or left_over,
                rebuilt=symbol in stale,
                deferred=left_over and commands == 0 and symbol not in backlogged,
                placed=_placed_states(
                    symbol, planned[symbol].plan, placed_ids[symbol], written.trade_ids, written.broker_names, now_us
                ),
            )
        )
    return results


def _rebuild(conn: Connection, symbols: list[str]) -> dict[str, tuple[OrderBook, dict[UUID, tuple[UUID, Side]]]]:
    """The books of ``symbols`` (and their owners maps) rebuilt from their open orders as they are read, a chunk at a
    time (:func:`store.stream_open_orders`): one round trip for books that fit in a chunk, and never more than one
    chunk's work between two round trips, whatever the size of a book (see there)."""
    books: dict[str, tuple[OrderBook, dict[UUID, tuple[UUID, Side]]]] = {}
    for symbol, rows in groupby(store.stream_open_orders(conn, symbols), key=itemgetter(0)):
        owners: dict[UUID, tuple[UUID, Side]] = {}
        books[symbol] = (OrderBook.rebuild(symbol, _noting_owners(rows, owners), handed_over=True), owners)
    for symbol in symbols:
        if symbol not in books:  # no open order
            books[symbol] = (OrderBook(symbol), {})
    return books


def _noting_owners(
    rows: Iterable[tuple[str, RestingOrder]], owners: dict[UUID, tuple[UUID, Side]]
) -> Iterator[RestingOrder]:
    for _, order in rows:
        owners[order.order_id] = (order.broker_id, order.side)
        yield order


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

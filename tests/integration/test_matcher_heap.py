"""The matcher's transactions leave no reference cycles behind, against a real PostgreSQL.

``workers.matching`` freezes what survives its transactions once a second (``exchange.heap.Keeper``), which is only
safe while its long-lived objects (cached books, connections, pools) never end up as cyclic garbage: a cycle still
alive when frozen would never be freed. Here every kind of batch the matcher runs (books rebuilt and cached,
places that rest, cross and sweep levels, market orders, cancels, several books per transaction, ``drain``) runs
with the automatic collector off; a full collection afterwards must find nothing unreachable.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine

from exchange.matching import store
from exchange.matching.service import BookCache, drain, process_symbol, process_symbols
from tests.integration.sql_orders import add_broker, cancel, place


@pytest.fixture
def matcher(fresh_migrated_database_url: str) -> Iterator[Engine]:
    """The matcher's own kind of engine (autocommit connections), as ``workers.matching`` makes it."""
    engine = store.matcher_engine(fresh_migrated_database_url, pool_size=2)
    yield engine
    engine.dispose()


def _unreachable_after(work: Callable[[], object]) -> int:
    """Objects a full collection finds unreachable after ``work`` ran with the automatic collector off (whatever
    was garbage before is collected first)."""
    gc.collect()
    gc.disable()
    try:
        work()
        return gc.collect()
    finally:
        gc.enable()


def _round(engine: Engine, symbols: list[str], brokers: list[uuid.UUID], r: int) -> None:
    """Orders for one matcher round on each symbol: resting, crossing (partly and fully), market, cancelled."""
    a, b = brokers[r % len(brokers)], brokers[(r + 1) % len(brokers)]
    for symbol in symbols:
        place(engine, a, symbol, "ask", 5, 100 + r)
        place(engine, b, symbol, "bid", 3, 101 + r)
        place(engine, b, symbol, "bid", 4, None)
        resting = place(engine, a, symbol, "bid", 2, 50)
        cancel(engine, symbol, resting)
        place(engine, b, symbol, "ask", 1, 200)


def test_matcher_transactions_leave_no_reference_cycles(engine: Engine, matcher: Engine) -> None:
    brokers = [add_broker(engine, f"heap{i}") for i in range(3)]
    symbols = [f"HEP{i}" for i in range(4)]
    cache = BookCache()
    _round(engine, symbols, brokers, 0)
    process_symbols(matcher, cache, symbols)  # first use: connections, caches, plans; books rebuilt and cached

    found: list[int] = []
    for r in range(1, 4):
        _round(engine, symbols, brokers, r)
        found.append(_unreachable_after(lambda: process_symbols(matcher, cache, symbols)))
        _round(engine, symbols, brokers, r)
        found.append(_unreachable_after(lambda: [process_symbol(matcher, cache, s) for s in symbols]))
        _round(engine, symbols, brokers, r)
        found.append(_unreachable_after(lambda: list(drain(matcher, cache, symbols, max_symbols=2))))
    _round(engine, symbols, brokers, 4)
    found.append(_unreachable_after(lambda: process_symbols(matcher, BookCache(), symbols)))  # rebuilt from stale

    assert found == [0] * len(found)
    assert all(cache.books[s].version > 0 for s in symbols)  # the cached books were really used and kept

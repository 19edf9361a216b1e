"""Several books in one matcher transaction (``process_symbols`` / ``drain``) against a real PostgreSQL: the same
effects as one transaction per symbol, no deadlock between overlapping groups, each command applied once, and a
poison command in one book that costs the other books nothing."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, text

from exchange.matching import store
from exchange.matching.service import (
    MAX_SYMBOLS_PER_BATCH,
    BatchResult,
    BookCache,
    drain,
    process_symbol,
    process_symbols,
)
from exchange.messaging.partitions import book_lock_key
from tests.integration.concurrency import run_concurrently
from tests.integration.sql_orders import add_broker, cancel, place
from tests.integration.test_matching_service import assert_conserved


def scenario(engine: Engine, symbols: list[str], brokers: list[uuid.UUID]) -> list[uuid.UUID]:
    """The same mix of resting, crossing, partially filled, market and cancelled orders on every symbol (symbol
    ``i`` gets ``i + 1`` rounds, so the books differ). Returns the order ids in placement order."""
    ids: list[uuid.UUID] = []
    for i, symbol in enumerate(symbols):
        for r in range(i + 1):
            a, b = brokers[r % len(brokers)], brokers[(r + 1) % len(brokers)]
            ids.append(place(engine, a, symbol, "ask", 3 + r, 100 + r))
            ids.append(place(engine, b, symbol, "bid", 2, 101 + r))
            ids.append(place(engine, b, symbol, "bid", 5, None))
            resting = place(engine, a, symbol, "bid", 1, 50)
            ids.append(resting)
            cancel(engine, symbol, resting)
            ids.append(place(engine, a, symbol, "ask", 4, 99))
    return ids


def outcome(engine: Engine, symbols: list[str], brokers: list[uuid.UUID], ids: list[uuid.UUID]) -> dict[str, Any]:
    """Everything the matcher wrote for these symbols and brokers, with ids replaced by their index (so two runs
    on different symbols and brokers compare equal when they did the same)."""
    order_no = {order_id: n for n, order_id in enumerate(ids)}
    broker_no = {broker_id: n for n, broker_id in enumerate(brokers)}
    symbol_no = {symbol: n for n, symbol in enumerate(symbols)}
    with engine.connect() as conn:
        orders = conn.execute(
            text("SELECT id, status, remaining, quantity, close_reason FROM orders WHERE id = ANY(:ids)"),
            {"ids": ids},
        ).all()
        trades = conn.execute(
            text(
                "SELECT symbol, price, quantity, buy_order_id, sell_order_id, match_no FROM trades "
                "WHERE symbol = ANY(:s) ORDER BY command_seq, match_no"
            ),
            {"s": symbols},
        ).all()
        balances = conn.execute(
            text("SELECT id, balance, event_seq FROM brokers WHERE id = ANY(:b)"), {"b": brokers}
        ).all()
        positions = conn.execute(
            text("SELECT broker_id, symbol, quantity FROM positions WHERE symbol = ANY(:s)"), {"s": symbols}
        ).all()
        events = conn.execute(
            text(
                "SELECT broker_id, sequence, type, order_id, payload FROM webhook_events WHERE broker_id = ANY(:b) "
                "ORDER BY broker_id, sequence"
            ),
            {"b": brokers},
        ).all()
        books = conn.execute(
            text("SELECT symbol, book_version, last_price FROM symbols WHERE symbol = ANY(:s)"), {"s": symbols}
        ).all()
    return {
        "orders": sorted((order_no[o.id], o.status, o.remaining, o.quantity, o.close_reason) for o in orders),
        "trades": sorted(
            (symbol_no[t.symbol], t.price, t.quantity, order_no[t.buy_order_id], order_no[t.sell_order_id], t.match_no)
            for t in trades
        ),
        "balances": sorted((broker_no[b.id], b.balance, b.event_seq) for b in balances),
        "positions": sorted((broker_no[p.broker_id], symbol_no[p.symbol], p.quantity) for p in positions),
        # Per broker, the kinds of events per symbol in sequence order, numbered without gaps.
        "events": sorted(
            (
                broker_no[e.broker_id],
                symbol_no[e.payload["symbol"]],
                e.type,
                order_no[e.order_id],
                e.payload["sequence"],
            )
            for e in events
        ),
        "books": sorted((symbol_no[b.symbol], b.book_version, b.last_price) for b in books),
    }


def summary(results: list[BatchResult]) -> list[tuple[int, int, int, int]]:
    return [(r.commands, r.trades, len(r.event_ids), len(r.order_ids)) for r in results]


def test_one_transaction_over_several_symbols_writes_what_one_transaction_per_symbol_writes(engine: Engine) -> None:
    alone_symbols, grouped_symbols = [f"ALN{i}" for i in range(4)], [f"GRP{i}" for i in range(4)]
    alone_brokers = [add_broker(engine, f"alone{i}") for i in range(3)]
    grouped_brokers = [add_broker(engine, f"grouped{i}") for i in range(3)]
    # Interleaved, so the two runs' command sequences are interleaved too.
    alone_ids, grouped_ids = [], []
    for n in range(4):
        alone_ids += scenario(engine, alone_symbols[n : n + 1], alone_brokers)
        grouped_ids += scenario(engine, grouped_symbols[n : n + 1], grouped_brokers)

    alone = [process_symbol(engine, BookCache(), symbol) for symbol in alone_symbols]
    grouped = process_symbols(engine, BookCache(), grouped_symbols)

    assert [r.symbol for r in grouped] == grouped_symbols
    assert summary(grouped) == summary(alone)
    assert all(r.trades for r in grouped)
    assert not any(r.more for r in grouped)
    assert outcome(engine, grouped_symbols, grouped_brokers, grouped_ids) == outcome(
        engine, alone_symbols, alone_brokers, alone_ids
    )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
        gaps = conn.execute(
            text("SELECT broker_id FROM webhook_events GROUP BY broker_id HAVING max(sequence) <> count(*)")
        ).all()
        assert gaps == []
    assert_conserved(engine)


def test_cached_books_of_a_group_stay_in_step_with_postgres(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    symbols = ["CCH1", "CCH2", "CCH3"]
    cache = BookCache()
    for symbol in symbols:
        place(engine, seller, symbol, "ask", 5, 100)
    first = process_symbols(engine, cache, symbols)
    assert [r.rebuilt for r in first] == [True, True, True]
    place(engine, buyer, "CCH1", "bid", 2, 100)
    place(engine, buyer, "CCH3", "bid", 2, 100)
    process_symbol(engine, BookCache(), "CCH3")  # another matcher moves CCH3's book: our cache of it is stale

    second = process_symbols(engine, cache, symbols)

    assert [(r.commands, r.rebuilt) for r in second] == [(1, False), (0, False), (0, False)]
    place(engine, buyer, "CCH3", "bid", 5, 100)  # 3 left at 100 after the other matcher's fill: 3 more trade
    third = process_symbols(engine, cache, symbols)
    assert [(r.commands, r.trades, r.rebuilt) for r in third] == [(0, 0, False), (0, 0, False), (1, 1, True)]
    with engine.connect() as conn:
        traded = dict(conn.execute(text("SELECT symbol, sum(quantity) FROM trades GROUP BY symbol")).all())
    assert traded == {"CCH1": 2, "CCH3": 5}
    assert_conserved(engine)


def test_a_group_shares_its_batch_limit_and_drain_finishes_every_symbol(engine: Engine) -> None:
    broker = add_broker(engine, "b")
    symbols = ["LIM1", "LIM2", "LIM3", "LIM4"]
    for symbol in symbols:
        for price in range(1, 7):
            place(engine, broker, symbol, "bid", 1, price)
    place(engine, broker, "LIM4", "bid", 1, 99)  # 7 commands: more than its share of two batches

    first = process_symbols(engine, BookCache(), symbols, batch_limit=12)  # 3 commands per symbol
    assert [(r.commands, r.more) for r in first] == [(3, True)] * 4

    rounds = list(drain(engine, BookCache(), symbols, batch_limit=12, max_symbols=3))
    processed = [sum(r.commands for r in round_.results) for round_ in rounds]
    assert sum(processed) == 4 * 6 + 1 - 12
    assert all(len(round_.results) <= 3 for round_ in rounds)
    assert [round_.last for round_ in rounds] == [False] * (len(rounds) - 1) + [True]  # only the last is last
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0


def test_too_many_symbols_for_one_transaction_is_refused_and_drain_splits_them(engine: Engine) -> None:
    broker = add_broker(engine, "b")
    symbols = [f"CAP{i}" for i in range(MAX_SYMBOLS_PER_BATCH + 3)]
    for symbol in symbols:
        place(engine, broker, symbol, "bid", 1, 10)
    with pytest.raises(ValueError, match="at most"):
        process_symbols(engine, BookCache(), symbols)

    rounds = list(drain(engine, BookCache(), symbols))

    assert [(len(round_.results), round_.last) for round_ in rounds] == [(MAX_SYMBOLS_PER_BATCH, False), (3, True)]
    assert sum(r.commands for round_ in rounds for r in round_.results) == len(symbols)


def test_overlapping_groups_in_concurrent_matchers_never_deadlock_and_apply_each_command_once(
    engine: Engine, caplog: Any
) -> None:
    first, second = add_broker(engine, "first"), add_broker(engine, "second")
    symbols = [f"OVL{i}" for i in range(6)]
    for i, symbol in enumerate(symbols):
        buyer, seller = (first, second) if i % 2 == 0 else (second, first)
        for _ in range(20):
            place(engine, seller, symbol, "ask", 1, 100)
            place(engine, buyer, symbol, "bid", 1, 100)
    by_key = sorted(symbols, key=book_lock_key)
    # Groups given in opposite lock-key orders, overlapping on every symbol: locks taken in the order given would
    # deadlock at once. Plus one-symbol matchers (the sweeper's messages) in the middle of it.
    groups = [by_key, by_key[::-1], by_key[1:5], by_key[4::-1], [by_key[2]], [by_key[3]]]

    def run(group: list[str]) -> None:
        cache = BookCache()
        while any(r.commands for r in process_symbols(engine, cache, group, batch_limit=len(group) * 2)):
            pass

    with caplog.at_level("WARNING", logger="exchange.matching.service"):
        run_concurrently(run, groups)
    assert [r.message for r in caplog.records] == [], "a group failed or retried: locks taken out of order?"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM orders WHERE status <> 'closed'")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM trades")).scalar_one() == 6 * 20
        versions = dict(conn.execute(text("SELECT symbol, book_version FROM symbols")).all())
        batches = conn.execute(
            text("SELECT count(DISTINCT processed_at) FROM commands GROUP BY symbol ORDER BY symbol")
        ).scalars()
        assert sorted(versions.values()) == sorted(batches)  # one version per committed batch of the symbol
        gaps = conn.execute(
            text("SELECT broker_id FROM webhook_events GROUP BY broker_id HAVING max(sequence) <> count(*)")
        ).all()
        assert gaps == []
    assert_conserved(engine)


def _filled_pair(engine: Engine, buyer: uuid.UUID, seller: uuid.UUID, symbol: str) -> uuid.UUID:
    """An ask and a bid of ``symbol`` that fill each other; returns the bid."""
    place(engine, seller, symbol, "ask", 2, 100)
    return place(engine, buyer, symbol, "bid", 2, 100)


def test_a_poison_command_in_one_symbol_does_not_stop_the_others(engine: Engine, caplog: Any) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    good = [_filled_pair(engine, buyer, seller, symbol) for symbol in ("PSN1", "PSN3")]
    place(engine, seller, "PSN2", "ask", 2, 2**62)
    poison = place(engine, buyer, "PSN2", "bid", 2, 2**62)  # its cash leaves 64 bits: the group's write fails
    later = place(engine, buyer, "PSN2", "bid", 1, 5)
    cache = BookCache()

    with caplog.at_level("WARNING", logger="exchange.matching.service"):
        rounds = list(drain(engine, cache, ["PSN1", "PSN2", "PSN3"]))

    assert any("processing them one by one" in r.message for r in caplog.records)
    assert any("quarantined" in r.message for r in caplog.records)
    assert sum(r.trades for round_ in rounds for r in round_.results) == 2
    with engine.connect() as conn:
        status = dict(conn.execute(text("SELECT id, close_reason FROM orders WHERE status = 'closed'")).all())
        assert [status.get(order_id) for order_id in good] == ["filled", "filled"]
        assert status.get(poison) == "rejected"
        assert conn.execute(text("SELECT status FROM orders WHERE id = :id"), {"id": later}).scalar_one() == "open"
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
    assert cache.suspects == set()
    assert_conserved(engine)


def test_a_book_that_cannot_be_rebuilt_stops_only_its_own_symbol(engine: Engine, caplog: Any) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    good = [_filled_pair(engine, buyer, seller, symbol) for symbol in ("CRS1", "CRS3")]
    crossing = [place(engine, seller, "CRS2", "ask", 1, 100), place(engine, buyer, "CRS2", "bid", 1, 101)]
    with engine.begin() as conn:  # rows no book can hold (the engine would have matched them): a crossed book
        conn.execute(text("UPDATE orders SET status = 'open', priority = seq WHERE id = ANY(:ids)"), {"ids": crossing})
        conn.execute(text("UPDATE commands SET processed_at = now() WHERE order_id = ANY(:ids)"), {"ids": crossing})
    stuck = place(engine, buyer, "CRS2", "bid", 1, 50)

    with caplog.at_level("ERROR", logger="exchange.matching.service"):
        rounds = list(drain(engine, BookCache(), ["CRS1", "CRS2", "CRS3"]))

    assert any("processing CRS2 failed" in r.message for r in caplog.records)
    assert sum(r.trades for round_ in rounds for r in round_.results) == 2
    with engine.connect() as conn:
        status = dict(conn.execute(text("SELECT id, close_reason FROM orders WHERE status = 'closed'")).all())
        assert [status.get(order_id) for order_id in good] == ["filled", "filled"]
        pending = conn.execute(text("SELECT order_id FROM commands WHERE processed_at IS NULL")).scalars().all()
    assert pending == [stuck]  # left for a mended book: never skipped


def test_a_failure_of_the_group_after_the_engine_ran_falls_back_without_losing_or_repeating_work(
    engine: Engine, monkeypatch: Any
) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    symbols = ["FLB1", "FLB2"]
    cache = BookCache()
    for symbol in symbols:
        place(engine, seller, symbol, "ask", 5, 10)
    process_symbols(engine, cache, symbols)
    for symbol in symbols:
        place(engine, buyer, symbol, "bid", 5, 10)
    real_write = store.write_batch
    calls: list[int] = []

    def crash_groups(conn: Any, now: Any, books: Any) -> Any:
        calls.append(len(books))
        if len(books) > 1:
            raise RuntimeError("crash between apply and commit")  # fault injection in the group's transaction
        return real_write(conn, now, books)

    monkeypatch.setattr(store, "write_batch", crash_groups)
    results = process_symbols(engine, cache, symbols)

    assert calls == [2, 1, 1]
    assert [(r.commands, r.trades, r.rebuilt) for r in results] == [(1, 1, True), (1, 1, True)]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM trades")).scalar_one() == 2
    assert_conserved(engine)


def test_a_suspect_symbol_is_processed_alone_while_the_rest_share_a_transaction(engine: Engine) -> None:
    broker = add_broker(engine, "b")
    symbols = ["SUS1", "SUS2", "SUS3"]
    for symbol in symbols:
        place(engine, broker, symbol, "bid", 1, 10)
        place(engine, broker, symbol, "bid", 1, 11)
    cache = BookCache()
    cache.suspects.add("SUS2")

    results = process_symbols(engine, cache, symbols)

    assert [(r.symbol, r.commands) for r in results] == [("SUS1", 2), ("SUS2", 1), ("SUS3", 2)]


def test_each_round_of_a_drain_says_what_it_has_left_to_process(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    for _ in range(3):
        place(engine, seller, "LEFT1", "ask", 1, 100 + _)
    place(engine, buyer, "LEFT2", "bid", 1, 90)

    rounds = list(drain(engine, BookCache(), ["LEFT1", "LEFT2"], batch_limit=4))  # 2 a symbol: LEFT1 is full

    assert [(r.left, r.last) for r in rounds] == [(["LEFT1"], False), ([], True)]

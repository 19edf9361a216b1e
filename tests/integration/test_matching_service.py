"""The matcher's service layer against a real PostgreSQL: command log in, committed effects out."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from exchange.matching.service import BookCache, process_symbol
from tests.integration.concurrency import run_concurrently
from tests.integration.sql_orders import add_broker, cancel, place


def order(conn: Connection, order_id: uuid.UUID) -> Any:
    return conn.execute(text("SELECT * FROM orders WHERE id = :id"), {"id": order_id}).one()


def assert_conserved(engine: Engine) -> None:
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COALESCE(sum(balance), 0) FROM brokers")).scalar_one() == 0
        assert (
            conn.execute(
                text("SELECT count(*) FROM (SELECT symbol FROM positions GROUP BY symbol HAVING sum(quantity) <> 0) s")
            ).scalar_one()
            == 0
        )
        leaks = conn.execute(
            text(
                """
                SELECT o.id FROM orders o
                LEFT JOIN (SELECT order_id, sum(quantity) AS traded FROM (
                    SELECT buy_order_id AS order_id, quantity FROM trades
                    UNION ALL SELECT sell_order_id, quantity FROM trades) t GROUP BY order_id) t
                  ON t.order_id = o.id
                WHERE o.quantity <> o.remaining + COALESCE(t.traded, 0)
                """
            )
        ).all()
        assert leaks == []
        assert (
            conn.execute(
                text(
                    "SELECT count(*) FROM trades t WHERE (SELECT count(*) FROM webhook_events e "
                    "WHERE e.trade_id = t.id AND e.type = 'order.fill') <> 2"
                )
            ).scalar_one()
            == 0
        )


def test_crossing_orders_trade_at_the_sellers_price_and_commit_every_effect(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    bid = place(engine, buyer, "PETR4", "bid", 10, 100)
    ask = place(engine, seller, "PETR4", "ask", 4, 90)

    result = process_symbol(engine, BookCache(), "PETR4")

    assert (result.commands, result.trades, len(result.event_ids)) == (2, 1, 2)
    with engine.connect() as conn:
        trade = conn.execute(text("SELECT * FROM trades")).one()
        assert (trade.price, trade.quantity, trade.buy_order_id, trade.sell_order_id) == (90, 4, bid, ask)
        assert (order(conn, bid).status, order(conn, bid).remaining, order(conn, bid).priority) == ("open", 6, 1)
        assert (order(conn, ask).status, order(conn, ask).close_reason) == ("closed", "filled")
        balances = dict(conn.execute(text("SELECT name, balance FROM brokers")).all())
        assert balances == {"buyer": -360, "seller": 360}
        positions = dict(conn.execute(text("SELECT broker_id, quantity FROM positions")).all())
        assert positions == {buyer: 4, seller: -4}
        symbol = conn.execute(text("SELECT * FROM symbols")).one()
        assert (symbol.last_price, symbol.book_version) == (90, 1)
        pending = conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one()
        assert pending == 0
        sequences = conn.execute(text("SELECT broker_id, sequence FROM webhook_events ORDER BY broker_id")).all()
        assert sorted(s for _, s in sequences) == [1, 1]
    assert_conserved(engine)


def test_a_duplicate_wakeup_finds_nothing_to_do(engine: Engine) -> None:
    broker = add_broker(engine, "b")
    place(engine, broker, "VALE3", "bid", 1, 100)
    cache = BookCache()
    assert process_symbol(engine, cache, "VALE3").commands == 1
    again = process_symbol(engine, cache, "VALE3")
    assert (again.commands, again.order_ids) == (0, [])


def test_a_stale_cached_book_is_rebuilt_from_open_orders(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    first, second = BookCache(), BookCache()
    place(engine, buyer, "ITUB4", "bid", 5, 100)
    process_symbol(engine, first, "ITUB4")
    place(engine, buyer, "ITUB4", "bid", 5, 101)
    process_symbol(engine, second, "ITUB4")  # another matcher process takes over the symbol
    place(engine, seller, "ITUB4", "ask", 7, 100)

    result = process_symbol(engine, first, "ITUB4")  # the first one's cache is now stale

    assert result.rebuilt
    with engine.connect() as conn:
        fills = conn.execute(text("SELECT price, quantity FROM trades ORDER BY match_no")).all()
    assert [tuple(f) for f in fills] == [(100, 5), (100, 2)]  # best bid (101) first, then 100: seller's price
    assert_conserved(engine)


def test_cancel_before_a_crossing_order_prevents_the_trade(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    ask = place(engine, seller, "BBAS3", "ask", 3, 50)
    cancel(engine, "BBAS3", ask)
    place(engine, buyer, "BBAS3", "bid", 3, 50)

    process_symbol(engine, BookCache(), "BBAS3")

    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM trades")).scalar_one() == 0
        assert order(conn, ask).close_reason == "cancelled"
        types = conn.execute(text("SELECT type FROM webhook_events")).scalars().all()
    assert types == ["order.cancelled"]


def test_an_expired_resting_order_never_trades(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    ask = place(engine, seller, "ABEV3", "ask", 3, 50, valid_until=soon)
    cache = BookCache()
    process_symbol(engine, cache, "ABEV3")
    threading.Event().wait(0.4)
    bid = place(engine, buyer, "ABEV3", "bid", 3, 50)

    process_symbol(engine, cache, "ABEV3")

    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM trades")).scalar_one() == 0
        assert order(conn, ask).close_reason == "expired"
        assert order(conn, bid).status == "open"


@pytest.mark.parametrize(("price", "tif"), [(None, "ioc"), (None, "fok"), (30, "ioc"), (30, "fok")])
def test_an_ioc_or_fok_order_matched_after_its_valid_until_closes_expired_without_trading(
    engine: Engine, price: int | None, tif: str
) -> None:
    # Accepted while its valid_until was ahead, matched after it (a matcher behind, a wake-up the sweeper recovers).
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    ask = place(engine, seller, "RENT3", "ask", 5, 30)
    bid = place(engine, buyer, "RENT3", "bid", 5, price, tif=tif, valid_until=datetime.now(UTC) + timedelta(hours=1))
    with engine.begin() as conn:  # let it come due without sleeping
        conn.execute(text("UPDATE orders SET valid_until = now() - interval '1 second' WHERE id = :id"), {"id": bid})

    process_symbol(engine, BookCache(), "RENT3")

    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM trades")).scalar_one() == 0
        row = order(conn, bid)
        assert (row.status, row.close_reason, row.remaining) == ("closed", "expired", 5)
        assert order(conn, ask).status == "open"
        types = conn.execute(text("SELECT type FROM webhook_events WHERE order_id = :id"), {"id": bid}).scalars()
        assert list(types) == ["order.expired"]
    assert_conserved(engine)


def test_an_ioc_order_matched_before_its_valid_until_trades(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    place(engine, seller, "LREN3", "ask", 5, 30)
    bid = place(engine, buyer, "LREN3", "bid", 5, None, valid_until=datetime.now(UTC) + timedelta(hours=1))

    process_symbol(engine, BookCache(), "LREN3")

    with engine.connect() as conn:
        row = order(conn, bid)
        assert (row.status, row.close_reason, row.remaining) == ("closed", "filled", 0)
    assert_conserved(engine)


def test_a_cancel_of_an_order_past_its_valid_until_not_yet_swept_closes_it_expired(engine: Engine) -> None:
    # The broker's close reason and webhook are the sweeper's, whichever of the two reaches the order first.
    seller = add_broker(engine, "seller")
    ask = place(engine, seller, "CSAN3", "ask", 3, 50, valid_until=datetime.now(UTC) + timedelta(hours=1))
    process_symbol(engine, BookCache(), "CSAN3")
    with engine.begin() as conn:  # let it come due without sleeping
        conn.execute(text("UPDATE orders SET valid_until = now() - interval '1 second' WHERE id = :id"), {"id": ask})
    cancel(engine, "CSAN3", ask)

    process_symbol(engine, BookCache(), "CSAN3")  # a new cache: the book is rebuilt with the new valid_until

    with engine.connect() as conn:
        row = order(conn, ask)
        assert (row.status, row.close_reason, row.remaining) == ("closed", "expired", 3)
        types = conn.execute(text("SELECT type FROM webhook_events WHERE order_id = :id"), {"id": ask}).scalars()
        assert list(types) == ["order.expired"]


def test_market_order_remainder_is_closed_unfilled(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    place(engine, seller, "WEGE3", "ask", 2, 30)
    bid = place(engine, buyer, "WEGE3", "bid", 5, None)

    process_symbol(engine, BookCache(), "WEGE3")

    with engine.connect() as conn:
        row = order(conn, bid)
        assert (row.status, row.close_reason, row.remaining) == ("closed", "unfilled", 3)
    assert_conserved(engine)


def test_self_trade_decrement_shrinks_quantity_and_keeps_shares_conserved(engine: Engine) -> None:
    broker = add_broker(engine, "solo")
    ask = place(engine, broker, "MGLU3", "ask", 5, 10)
    with engine.begin() as conn:
        conn.execute(text("UPDATE orders SET stp = 'decrement'"))
    bid = place(engine, broker, "MGLU3", "bid", 3, 10)
    with engine.begin() as conn:
        conn.execute(text("UPDATE orders SET stp = 'decrement' WHERE id = :id"), {"id": bid})

    process_symbol(engine, BookCache(), "MGLU3")

    with engine.connect() as conn:
        resting, taker = order(conn, ask), order(conn, bid)
        assert (resting.status, resting.quantity, resting.remaining) == ("open", 2, 2)
        assert (taker.status, taker.close_reason) == ("closed", "self_trade_prevented")
        assert conn.execute(text("SELECT count(*) FROM trades")).scalar_one() == 0
    assert_conserved(engine)


def test_a_self_trade_decrement_tells_the_broker_of_the_order_that_shrank_and_of_the_one_it_closed(
    engine: Engine,
) -> None:
    broker = add_broker(engine, "solo")
    ask = place(engine, broker, "DECR3", "ask", 5, 10)
    bid = place(engine, broker, "DECR3", "bid", 3, 10)
    with engine.begin() as conn:
        conn.execute(text("UPDATE orders SET stp = 'decrement'"))

    process_symbol(engine, BookCache(), "DECR3")

    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT sequence, type, order_id, payload FROM webhook_events WHERE broker_id = :b ORDER BY 1"),
            {"b": broker},
        ).all()
    assert [(r.sequence, r.type, r.order_id) for r in rows] == [
        (1, "order.decremented", ask),
        (2, "order.cancelled", bid),
    ]
    shrank = rows[0].payload
    assert (shrank["event"], shrank["reason"]) == ("order_decremented", "self_trade_prevented")
    assert (shrank["quantity"], shrank["order_remaining_quantity"], shrank["side"]) == (2, 2, "ask")
    assert rows[1].payload["reason"] == "self_trade_prevented"


def test_batches_are_bounded_and_report_more_work(engine: Engine) -> None:
    broker = add_broker(engine, "b")
    for price in range(1, 8):
        place(engine, broker, "SUZB3", "bid", 1, price)
    cache = BookCache()
    first = process_symbol(engine, cache, "SUZB3", batch_limit=5)
    second = process_symbol(engine, cache, "SUZB3", batch_limit=5)
    assert (first.commands, first.more, second.commands, second.more) == (5, True, 2, False)


def test_concurrent_matchers_on_one_symbol_apply_each_command_once(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    for i in range(40):
        place(engine, seller if i % 2 else buyer, "RENT3", "ask" if i % 2 else "bid", 1 + i % 3, 100)

    def run(_: int) -> None:
        cache = BookCache()
        while process_symbol(engine, cache, "RENT3", batch_limit=3).commands:
            pass

    run_concurrently(run, range(3))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM orders WHERE status = 'pending'")).scalar_one() == 0
    assert_conserved(engine)


def test_a_failed_batch_leaves_the_cached_book_to_be_rebuilt(engine: Engine, monkeypatch: Any) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    cache = BookCache()
    place(engine, seller, "CSNA3", "ask", 5, 10)
    process_symbol(engine, cache, "CSNA3")
    place(engine, buyer, "CSNA3", "bid", 5, 10)

    from exchange.matching import store

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("crash between apply and commit")

    with monkeypatch.context() as patch:
        patch.setattr(store, "write_batch", crash)  # fault injection: the process dies mid-transaction
        with pytest.raises(RuntimeError):
            process_symbol(engine, cache, "CSNA3")
    result = process_symbol(engine, cache, "CSNA3")  # the fill must happen exactly once, from Postgres' state

    assert (result.rebuilt, result.trades) == (True, 1)
    assert_conserved(engine)


def test_a_trade_whose_cash_leaves_64_bits_is_quarantined_and_the_symbol_keeps_matching(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    # Accepted straight into the command log (the api bounds price and quantity, this is the matcher's own guard).
    place(engine, seller, "OVER3", "ask", 2, 2**62)
    poison = place(engine, buyer, "OVER3", "bid", 2, 2**62)
    place(engine, seller, "OVER3", "ask", 1, 100)
    later = place(engine, buyer, "OVER3", "bid", 1, 100)
    cache = BookCache()

    while process_symbol(engine, cache, "OVER3").commands:
        pass

    with engine.connect() as conn:
        assert (order(conn, poison).status, order(conn, poison).close_reason) == ("closed", "rejected")
        assert (order(conn, later).status, order(conn, later).close_reason) == ("closed", "filled")
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
    assert cache.suspects == set()
    assert_conserved(engine)


def test_a_quarantined_place_tells_its_broker_by_an_order_rejected_event_next_in_its_sequence(
    engine: Engine,
) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    place(engine, seller, "TELL3", "ask", 1, 100)
    filled = place(engine, buyer, "TELL3", "bid", 1, 100)  # the buyer's event 1
    place(engine, seller, "TELL3", "ask", 2, 2**62)
    poison = place(engine, buyer, "TELL3", "bid", 2, 2**62)  # its cash would leave 64 bits: quarantined
    cache = BookCache()

    event_ids = []
    while (result := process_symbol(engine, cache, "TELL3")).commands:
        event_ids += result.event_ids

    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, sequence, type, order_id, payload FROM webhook_events WHERE broker_id = :b ORDER BY 2"),
            {"b": buyer},
        ).all()
    assert [(r.sequence, r.type, r.order_id) for r in rows] == [
        (1, "order.fill", filled),
        (2, "order.rejected", poison),
    ]
    payload = rows[1].payload
    assert (payload["event"], payload["reason"]) == ("order_rejected", "rejected")
    assert payload["reject_reason"] == "unprocessable"
    assert (payload["sequence"], payload["order_remaining_quantity"], payload["side"]) == (2, 2, "bid")
    with engine.connect() as conn:  # the command keeps why it changed nothing (alembic 0027)
        kept = text("SELECT order_id, rejected_reason FROM commands WHERE rejected_reason IS NOT NULL")
        assert conn.execute(kept).all() == [(poison, "unprocessable")]
    assert rows[1].id in event_ids  # handed to the webhook queue like any batch's events
    assert_conserved(engine)


def test_a_quarantine_whose_rejection_cannot_be_written_still_frees_the_symbol(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    with engine.begin() as conn:  # the buyer's next event has no number: neither its fill nor its rejection fits
        conn.execute(text("UPDATE brokers SET event_seq = 9223372036854775807 WHERE id = :id"), {"id": buyer})
    place(engine, seller, "FULL3", "ask", 1, 100)
    poison = place(engine, buyer, "FULL3", "bid", 1, 100)
    later = place(engine, seller, "FULL3", "ask", 1, 90)
    cache = BookCache()

    while process_symbol(engine, cache, "FULL3").commands:
        pass

    with engine.connect() as conn:
        assert (order(conn, poison).status, order(conn, poison).close_reason) == ("closed", "rejected")
        assert order(conn, later).status == "open"
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM webhook_events")).scalar_one() == 0
        kept = text("SELECT order_id, rejected_reason FROM commands WHERE rejected_reason IS NOT NULL")
        assert conn.execute(kept).all() == [(poison, "unprocessable")]  # the bare quarantine keeps it too
    assert cache.suspects == set()


def test_a_place_command_without_its_order_is_quarantined(engine: Engine) -> None:
    broker = add_broker(engine, "b")
    with engine.begin() as conn:  # a hand-made row the engine cannot be asked about
        conn.execute(text("ALTER TABLE commands DROP CONSTRAINT ck_commands_order_id_required"))
        conn.execute(text("INSERT INTO commands (symbol, kind) VALUES ('GHOST3', 'place')"))
    place(engine, broker, "GHOST3", "bid", 1, 100)

    while process_symbol(engine, BookCache(), "GHOST3").commands:
        pass

    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
        assert conn.execute(text("SELECT status FROM orders")).scalar_one() == "open"


def test_quarantine_skips_only_the_failed_command_not_a_lower_one_that_committed_after_it_failed(
    engine: Engine, monkeypatch: Any
) -> None:
    owner, buyer, seller = add_broker(engine, "owner"), add_broker(engine, "buyer"), add_broker(engine, "seller")
    cache = BookCache()
    place(engine, owner, "LATE3", "ask", 1, 100)
    resting = place(engine, owner, "LATE3", "bid", 5, 90)
    process_symbol(engine, cache, "LATE3")
    with engine.begin() as conn:  # the buyer's next purchase takes its cash below the 64-bit range: a poison place
        conn.execute(text("UPDATE brokers SET balance = -9223372036854775800 WHERE id = :id"), {"id": buyer})
    late = engine.connect()  # the owner's cancel: its sequence number is taken now, its commit comes late
    late.execute(text("INSERT INTO commands (symbol, kind, order_id) VALUES ('LATE3', 'cancel', :id)"), {"id": resting})
    poison = place(engine, buyer, "LATE3", "bid", 1, 100)

    from exchange.matching import store

    real_write, writes = store.write_batch, []

    def write_then_commit_the_cancel(*args: Any, **kwargs: Any) -> Any:
        writes.append(1)
        if len(writes) == 2:  # the poison alone, one command at a time: the cancel commits after that attempt read
            late.commit()
        return real_write(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(store, "write_batch", write_then_commit_the_cancel)
        while (result := process_symbol(engine, cache, "LATE3")).commands or result.more:
            pass
    late.close()
    place(engine, seller, "LATE3", "ask", 5, 90)  # would fill the cancelled bid, had its cancel been skipped
    process_symbol(engine, cache, "LATE3")

    with engine.connect() as conn:
        assert (order(conn, resting).status, order(conn, resting).close_reason) == ("closed", "cancelled")
        assert (order(conn, poison).status, order(conn, poison).close_reason) == ("closed", "rejected")
        assert conn.execute(text("SELECT count(*) FROM trades WHERE buy_order_id = :id"), {"id": resting}).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
    assert cache.suspects == set()


def test_a_trade_whose_cash_exceeds_even_unsigned_64_bits_is_quarantined(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    place(engine, seller, "HUGE3", "ask", 16, 2**62)
    poison = place(engine, buyer, "HUGE3", "bid", 16, 2**62)  # notional 2**66: no 64-bit type holds it
    later = place(engine, buyer, "HUGE3", "bid", 1, 5)
    cache = BookCache()

    while process_symbol(engine, cache, "HUGE3").commands:
        pass

    with engine.connect() as conn:
        assert (order(conn, poison).status, order(conn, poison).close_reason) == ("closed", "rejected")
        assert order(conn, later).status == "open"
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
    assert_conserved(engine)


def test_each_brokers_events_are_numbered_without_gaps_in_the_order_they_happened(engine: Engine) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    cache = BookCache()
    for symbol in ("SEQA3", "SEQB3"):
        for price in (10, 11, 12):  # three resting asks of one broker: one sweep fills them in price order
            place(engine, seller, symbol, "ask", 1, price, document_number=f"doc{price}")
        place(engine, buyer, symbol, "bid", 3, 12, document_number="sweeper")
        process_symbol(engine, cache, symbol)  # one batch: 3 fills, two events each
        place(engine, seller, symbol, "ask", 2, 20)
        cancel_id = place(engine, buyer, symbol, "bid", 1, 5)
        cancel(engine, symbol, cancel_id)
        process_symbol(engine, cache, symbol)

    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT e.broker_id, e.sequence, e.type, e.payload, t.command_seq, t.match_no, o.document_number "
                "FROM webhook_events e JOIN orders o ON o.id = e.order_id LEFT JOIN trades t ON t.id = e.trade_id "
                "ORDER BY e.broker_id, e.sequence"
            )
        ).all()
    for broker in (buyer, seller):
        mine = [r for r in rows if r.broker_id == broker]
        assert [r.sequence for r in mine] == list(range(1, len(mine) + 1))
        fills = [(r.command_seq, r.match_no) for r in mine if r.type == "order.fill"]
        assert fills == sorted(fills), "a broker's fills must be numbered in execution order"
    assert {r.broker_id for r in rows if r.type == "order.cancelled"} == {buyer}
    for r in rows:
        assert r.payload["sequence"] == r.sequence
        assert r.payload["document_number"] == r.document_number
        assert r.payload["client_order_id"] is None
    assert len(rows) == 2 * (6 + 1)  # per symbol: 3 trades x 2 sides, one cancel


def test_matchers_of_different_symbols_sharing_brokers_never_deadlock(engine: Engine, caplog: Any) -> None:
    first, second = add_broker(engine, "first"), add_broker(engine, "second")
    symbols = [f"DL{i}" for i in range(4)]
    for i, symbol in enumerate(symbols):
        # Even symbols: first buys from second; odd ones the other way round, so batches touch both brokers.
        buyer, seller = (first, second) if i % 2 == 0 else (second, first)
        for _ in range(30):
            place(engine, seller, symbol, "ask", 1, 100)
            place(engine, buyer, symbol, "bid", 1, 100)

    def run(symbol: str) -> None:
        cache = BookCache()
        while process_symbol(engine, cache, symbol, batch_limit=2).commands:
            pass

    with caplog.at_level("WARNING", logger="exchange.matching.service"):
        run_concurrently(run, symbols)
    assert [r.message for r in caplog.records if "retrying" in r.message] == [], "broker rows locked out of order"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM trades")).scalar_one() == 4 * 30
        gaps = conn.execute(
            text("SELECT broker_id FROM webhook_events GROUP BY broker_id HAVING max(sequence) <> count(*)")
        ).all()
        assert gaps == []
    assert_conserved(engine)

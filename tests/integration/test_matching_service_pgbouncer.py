"""The matcher's transaction through pgbouncer 1.18 in transaction pooling, as production runs it.

What these pin down: a batch is two round trips whatever its size and its number of symbols (one query message
carrying BEGIN, the locks and the reads; one carrying the writes and COMMIT), multi-statement messages on autocommit
connections work through the pooler, and concurrent matchers (overlapping groups of symbols included) still apply
each command exactly once. Round trips are counted by pgbouncer
itself: ``SHOW STATS``' ``total_query_count`` grows by one per ReadyForQuery, i.e. per round trip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy import Engine, text

from exchange.db.engines import IDLE_HOLDER_LIMIT_MS, pooled_engine
from exchange.matching import store
from exchange.matching.service import BatchResult, BookCache, drain, process_symbol, process_symbols
from tests.conftest import skip_or_fail
from tests.integration.concurrency import run_concurrently
from tests.integration.sql_orders import add_broker, cancel, crossing_pair, place, trades
from tests.integration.test_big_books import BIG, add_resting_asks, limit_idle, read_in_one_piece
from tests.integration.test_matching_service import assert_conserved

PGBOUNCER_SCRIPT = Path(__file__).resolve().parents[2] / "ops" / "scripts" / "pgbouncer.sh"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def pgbouncer_port(postgres_admin_url: str) -> Iterator[int]:
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        skip_or_fail("pgbouncer is not installed (ops/scripts/install-system-deps.sh installs it)")
    # Not under pytest's tmp dir: as root, pgbouncer runs as the postgres user, which cannot enter it.
    run_dir = Path(tempfile.mkdtemp(prefix="exchange-test-matcher-pgbouncer-"))
    parts = urlsplit(postgres_admin_url)
    port = _free_port()
    argv = ["bash", str(PGBOUNCER_SCRIPT), "start", str(run_dir), str(port)]
    argv += [parts.hostname or "127.0.0.1", str(parts.port or 5432), parts.username or "postgres"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        pytest.fail(f"pgbouncer did not start:\n{result.stdout}\n{result.stderr}")
    yield port
    subprocess.run(["bash", str(PGBOUNCER_SCRIPT), "stop", str(run_dir)], check=False)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def pooled_url(fresh_migrated_database_url: str, pgbouncer_port: int) -> str:
    parts = urlsplit(fresh_migrated_database_url)
    return parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{pgbouncer_port}").geturl()


@pytest.fixture
def bounced(pooled_url: str) -> Iterator[Engine]:
    """The matcher's engine through pgbouncer (``store.matcher_engine``, as workers/matching.py builds it),
    connected once so that SQLAlchemy's first-connect queries are not counted."""
    engine = store.matcher_engine(pooled_url, pool_size=5)
    engine.connect().close()
    yield engine
    engine.dispose()


@pytest.fixture
def round_trips(pooled_url: str, pgbouncer_port: int) -> Callable[[Callable[[], object]], int]:
    """Run a call and return how many round trips pgbouncer saw for this test's database meanwhile."""
    database = urlsplit(pooled_url).path.lstrip("/")
    admin_url = urlsplit(pooled_url)._replace(path="/pgbouncer").geturl()

    def count() -> int:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            for row in admin.execute("SHOW STATS").fetchall():
                if row[0] == database:
                    return int(row[2])  # total_query_count
        return 0

    def measure(call: Callable[[], object]) -> int:
        before = count()
        call()
        return count() - before

    return measure


def test_a_batch_costs_two_round_trips_whatever_its_size(
    engine: Engine, bounced: Engine, round_trips: Callable[[Callable[[], object]], int]
) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    cache = BookCache()
    place(engine, seller, "RT3", "ask", 1, 100)
    # The first batch of a symbol also creates its symbols row and builds the book: two more round trips.
    assert round_trips(lambda: process_symbol(bounced, cache, "RT3")) == 4

    place(engine, buyer, "RT3", "bid", 1, 100)
    assert round_trips(lambda: process_symbol(bounced, cache, "RT3")) == 2  # one fill: every table written

    for i in range(40):
        place(engine, seller, "RT3", "ask", 1 + i % 3, 100 + i % 5)
        place(engine, buyer, "RT3", "bid", 1 + i % 2, 100 + i % 4)
        if i % 7 == 0:
            cancel(engine, "RT3", place(engine, buyer, "RT3", "bid", 1, 90))
    assert round_trips(lambda: process_symbol(bounced, cache, "RT3")) == 2  # a batch of ~90 commands

    assert round_trips(lambda: process_symbol(bounced, cache, "RT3")) == 2  # nothing to do: BEGIN… then ROLLBACK
    assert round_trips(lambda: process_symbol(bounced, BookCache(), "RT3")) == 2  # nothing to do, cold cache

    place(engine, buyer, "RT3", "bid", 1, 1)
    assert round_trips(lambda: process_symbol(bounced, BookCache(), "RT3")) == 3  # one more to rebuild the book
    assert_conserved(engine)


def test_concurrent_matchers_through_pgbouncer_apply_each_command_once(engine: Engine, bounced: Engine) -> None:
    first, second = add_broker(engine, "first"), add_broker(engine, "second")
    for i in range(60):
        symbol = "PGB1" if i % 3 else "PGB2"
        buyer, seller = (first, second) if i % 2 else (second, first)
        place(engine, seller, symbol, "ask", 1 + i % 3, 100)
        place(engine, buyer, symbol, "bid", 1 + i % 2, 100)

    def run(symbol: str) -> None:
        cache = BookCache()
        while process_symbol(bounced, cache, symbol, batch_limit=3).commands:
            pass

    run_concurrently(run, ("PGB1", "PGB1", "PGB1", "PGB2", "PGB2"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM orders WHERE status = 'pending'")).scalar_one() == 0
        assert conn.execute(text("SELECT sum(book_version) FROM symbols")).scalar_one() > 0
    assert_conserved(engine)


def test_a_batch_of_several_symbols_also_costs_two_round_trips(
    engine: Engine, bounced: Engine, round_trips: Callable[[Callable[[], object]], int]
) -> None:
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    symbols = [f"RTM{i}" for i in range(12)]
    cache = BookCache()
    for symbol in symbols:
        place(engine, seller, symbol, "ask", 2, 100)
    # New symbols: one more round trip creates all their rows, one more rebuilds all their books.
    assert round_trips(lambda: process_symbols(bounced, cache, symbols)) == 4

    for symbol in symbols:
        place(engine, buyer, symbol, "bid", 1, 100)
    results: list[BatchResult] = []
    assert round_trips(lambda: results.extend(process_symbols(bounced, cache, symbols))) == 2
    assert [(r.commands, r.trades, len(r.event_ids)) for r in results] == [(1, 1, 2)] * len(symbols)

    assert round_trips(lambda: process_symbols(bounced, cache, symbols)) == 2  # nothing to do: BEGIN… then ROLLBACK
    place(engine, buyer, symbols[3], "bid", 1, 100)
    place(engine, buyer, symbols[7], "bid", 1, 100)
    assert round_trips(lambda: process_symbols(bounced, BookCache(), symbols)) == 3  # both books rebuilt in one
    assert_conserved(engine)


def test_overlapping_groups_through_pgbouncer_apply_each_command_once(engine: Engine, bounced: Engine) -> None:
    first, second = add_broker(engine, "first"), add_broker(engine, "second")
    symbols = [f"PGM{i}" for i in range(5)]
    for i in range(80):
        symbol = symbols[i % len(symbols)]
        buyer, seller = (first, second) if i % 2 else (second, first)
        place(engine, seller, symbol, "ask", 1 + i % 3, 100)
        place(engine, buyer, symbol, "bid", 1 + i % 2, 100)

    def run(group: list[str]) -> None:
        cache = BookCache()
        while any(r.commands for round_ in drain(bounced, cache, group, batch_limit=6) for r in round_.results):
            pass

    groups = [symbols, symbols[::-1], symbols[1:4], [symbols[2]]]
    run_concurrently(run, groups)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM commands WHERE processed_at IS NULL")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM orders WHERE status = 'pending'")).scalar_one() == 0
    assert_conserved(engine)


def test_the_matchers_connections_stay_in_autocommit_and_others_get_their_mode_back(
    bounced: Engine, pooled_url: str
) -> None:
    other = pooled_engine(pooled_url, pool_size=1, max_overflow=0)
    try:
        for engine, mode_in_pool in ((bounced, True), (other, False)):
            for _ in range(2):  # the second checkout gets the connection the first returned
                with store.connect(engine) as conn:
                    pg = conn.connection.driver_connection
                    assert pg is not None
                    assert pg.autocommit  # the queries carry their own BEGIN/COMMIT
                    conn.exec_driver_sql("BEGIN; SELECT 1; COMMIT")
                with engine.connect() as conn:
                    pg = conn.connection.driver_connection
                    assert pg is not None
                    assert pg.autocommit is mode_in_pool
    finally:
        other.dispose()


def test_a_matcher_frozen_while_holding_its_books_frees_them_after_the_idle_limit(
    engine: Engine, bounced: Engine, pooled_url: str
) -> None:
    """A matcher stopped between its two round trips (SIGSTOP, swapping, cut off) holds its books' locks only until
    PostgreSQL ends its idle transaction: another matcher then applies the symbol's commands, and the frozen one's
    next statement fails, so nothing of its batch is ever committed."""
    crossing_pair(engine, "FRZ")
    other = store.matcher_engine(pooled_url, pool_size=1)
    applied: list[BatchResult] = []
    failed: list[BaseException] = []

    def wait_and_apply() -> None:
        try:
            applied.append(process_symbol(other, BookCache(), "FRZ"))
        except BaseException as exc:  # reported below, not lost in the thread
            failed.append(exc)

    waiter = threading.Thread(target=wait_and_apply, daemon=True)
    try:
        with store.connect(bounced) as frozen:
            assert len(store.begin_batch(frozen, ["FRZ"], limit=10).commands["FRZ"]) == 2  # locks held: it freezes
            waiter.start()
            waiter.join(timeout=IDLE_HOLDER_LIMIT_MS / 1000 + 10)
            assert not failed, failed
            assert [(r.commands, r.trades) for r in applied] == [(2, 1)], "the frozen matcher still blocks the book"
            with pytest.raises(psycopg.Error):  # it wakes up: its transaction is gone
                store._driver(frozen).execute("SELECT 1")
    finally:
        waiter.join()  # released at the latest when the frozen connection is rolled back
        other.dispose()
    assert trades(engine, "FRZ") == 1


def test_a_book_of_several_chunks_is_rebuilt_through_pgbouncer_one_round_trip_a_chunk(
    engine: Engine, bounced: Engine, round_trips: Callable[[Callable[[], object]], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server-side cursor of a rebuild lives inside the matcher's transaction, so pgbouncer keeps it on one
    server connection from its ``DECLARE`` (sent with the first ``FETCH``) to the ``COMMIT`` that closes it."""
    monkeypatch.setattr(store, "REBUILD_CHUNK", 4)
    buyer, seller = add_broker(engine, "buyer"), add_broker(engine, "seller")
    for i in range(10):
        place(engine, seller, "CHK3", "ask", 1, 100 + i)
    process_symbol(bounced, BookCache(), "CHK3")
    place(engine, buyer, "CHK3", "bid", 3, 102)
    results: list[BatchResult] = []

    # BEGIN… and the reads; 4 + 4 + 2 open orders; the writes and COMMIT.
    assert round_trips(lambda: results.append(process_symbol(bounced, BookCache(), "CHK3"))) == 1 + 3 + 1
    assert [(r.commands, r.trades, r.rebuilt) for r in results] == [(1, 3, True)]
    assert_conserved(engine)


def test_a_symbol_whose_transaction_the_server_ended_does_not_stop_the_next_one_through_pgbouncer(
    engine: Engine, bounced: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ends the big book's session (idle-in-transaction limit, 25P03, which pgbouncer passes on and
    follows by closing the client connection): the symbol's own failure, since the database answers the next
    transaction."""
    limit_idle(monkeypatch, 100)
    read_in_one_piece(monkeypatch)
    seller, buyer = add_broker(engine, "seller"), add_broker(engine, "buyer")
    add_resting_asks(engine, seller, "BIGP", BIG)
    place(engine, buyer, "BIGP", "bid", 1, 2000)
    place(engine, seller, "NXTP", "ask", 1, 100)
    place(engine, buyer, "NXTP", "bid", 1, 100)
    cache = BookCache()

    rounds = list(drain(bounced, cache, ["BIGP", "NXTP"]))

    matched = {r.symbol: (r.commands, r.trades) for round_ in rounds for r in round_.results if r.commands}
    assert matched == {"NXTP": (2, 1)}
    assert cache.failing["BIGP"].failures == 2  # tried again at once, alone (a database error), then left alone
    assert_conserved(engine)

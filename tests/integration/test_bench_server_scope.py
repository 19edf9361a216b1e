"""``exchange bench --server-stats`` counts the CPU of the exchange under test only, not other work on the machine
that looks like it by command line: a busy backend of another database on the same PostgreSQL server, a busy
dramatiq-like worker of another exchange, on another Redis database or on the same one (exchanges on different
PostgreSQL databases may share a Redis database, each under its own namespace)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from ops.bench.server_stats import PerProcess, Snapshot, per_order, take
from tests.integration.redis_support import claimed_database

BURN = "SELECT count(*) FROM generate_series(1, 2e7::bigint)"
"""A few seconds of one backend's CPU."""

WORKER = """
import sys, time, psycopg, redis
client = redis.Redis.from_url(sys.argv[1])
client.ping()  # connections held for the process's life, as a dramatiq worker's
database = psycopg.connect(sys.argv[3]) if sys.argv[3] != "-" else None
print("ready", flush=True)
busy = sys.argv[2] == "busy"
while True:
    if not busy:
        time.sleep(0.05)
"""
"""A process named like a matcher (``workers.matching`` in its command line), connected to a Redis database and,
unless its third argument is ``-``, to a PostgreSQL database."""


@pytest.fixture
def redis_url() -> Iterator[str]:
    with claimed_database() as url:
        if not url.startswith("redis://"):
            pytest.skip("the tests' Redis listens on a unix socket: its clients have no TCP port to match")
        yield url


def _delta(before: Snapshot, after: Snapshot, pid: int) -> float:
    def figure(per: PerProcess) -> float:
        return next(value for (p, _), (_, value) in per.items() if p == pid)

    return figure(after.cpu_s) - figure(before.cpu_s)


def _key(snapshot: Snapshot, pid: int) -> tuple[int, int]:
    return next(key for key in snapshot.cpu_s if key[0] == pid)


def test_a_busy_backend_of_another_database_is_not_counted_as_the_exchanges_postgres(
    freshdatabase_factory: Callable[[], str], redis_url: str
) -> None:
    ours, other = freshdatabase_factory(), freshdatabase_factory()
    with psycopg.connect(ours, autocommit=True) as mine, psycopg.connect(other, autocommit=True) as theirs:
        my_pid, their_pid = mine.info.backend_pid, theirs.info.backend_pid
        before = take(redis_url, ours)
        burner = threading.Thread(target=lambda: theirs.execute(BURN).fetchone())
        burner.start()
        mine.execute("SELECT count(*) FROM generate_series(1, 1e6::bigint)").fetchone()
        burner.join()
        after = take(redis_url, ours)

        burned = _delta(before, after, their_pid)
        got = per_order(before, after, accepted_orders=1)

    assert burned > 0.1, burned  # it did burn (checked: the figure below would hide it otherwise)
    assert got["cpu_s"].get("postgres", 0.0) < burned, got  # was >= burned: every backend of the server counted
    assert after.scope is not None
    assert _key(after, my_pid) in after.scope
    assert _key(after, their_pid) not in after.scope
    assert got["processes"]["postgres"] == 1, got  # our backend; take()'s own connection is not counted
    assert got["processes_left_out"].get("postgres", 0) >= 1, got
    assert "postgres-shared" in got["processes"], got  # checkpointer, walwriter, ...: reported apart
    assert "postgres-shared" not in got["cpu_s"], got


@pytest.mark.parametrize("same_redis_database", [False, True])
def test_a_busy_worker_of_another_exchange_is_not_counted_as_the_exchanges_matcher(
    freshdatabase_factory: Callable[[], str], redis_url: str, same_redis_database: bool
) -> None:
    ours, other = freshdatabase_factory(), freshdatabase_factory()
    their_redis = redis_url if same_redis_database else redis_url.rsplit("/", 1)[0] + "/0"
    argv = [sys.executable, "-c", WORKER]
    mine = subprocess.Popen([*argv, redis_url, "idle", ours, "workers.matching"], stdout=subprocess.PIPE)
    theirs = subprocess.Popen([*argv, their_redis, "busy", other, "workers.matching"], stdout=subprocess.PIPE)
    try:
        for proc in (mine, theirs):
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
        before = take(redis_url, ours)
        time.sleep(0.5)  # theirs spins meanwhile
        after = take(redis_url, ours)
    finally:
        for proc in (mine, theirs):
            proc.kill()
            proc.wait()

    spun = _delta(before, after, theirs.pid)
    got = per_order(before, after, accepted_orders=1)
    assert spun > 0, spun
    assert got["cpu_s"].get("matcher", 0.0) < spun, got  # was >= spun: every matcher of the machine counted
    assert after.scope is not None
    assert after.scope.get(_key(after, mine.pid)) == "matcher"  # found through its connection to our database
    assert _key(after, theirs.pid) not in after.scope
    assert got["processes"].get("redis") == 1, got  # the server of the URL, found by its INFO process_id

"""The power-loss filesystem under a real PostgreSQL (:class:`tests.e2e.private_services.PowerLossPostgres`): what
the fault test's power loss can show. A commit PostgreSQL reported with its WAL synced survives the cut; one
reported before its WAL was synced (``synchronous_commit = off``, with the WAL writer held off) does not, so an
answer given before the sync would fail the fault test."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import psycopg
import pytest

from tests.e2e.conftest import free_port, in_ci
from tests.e2e.private_services import PowerLossPostgres, power_loss_missing, private_services_missing


@pytest.fixture
def cluster() -> Iterator[PowerLossPostgres]:
    missing = private_services_missing() or power_loss_missing()
    if missing:
        (pytest.fail if in_ci() else pytest.skip)(missing)
    pg = PowerLossPostgres(free_port())
    try:
        pg.init()
        pg.start()
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE TABLE acknowledged (n int PRIMARY KEY)")
            conn.execute("CHECKPOINT")  # the table itself is on the disk
        yield pg
    finally:
        pg.close()


def _commit(pg: PowerLossPostgres, rows: range, *, synchronous_commit: str) -> None:
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute(f"SET synchronous_commit = {synchronous_commit}")
        for n in rows:
            conn.execute("INSERT INTO acknowledged VALUES (%s)", (n,))


def _after_power_loss(pg: PowerLossPostgres) -> list[int]:
    pg.power_loss()
    pg.start()
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        return [n for (n,) in conn.execute("SELECT n FROM acknowledged ORDER BY n")]


def test_every_commit_reported_with_its_wal_synced_survives_a_power_loss(cluster: PowerLossPostgres) -> None:
    _commit(cluster, range(200), synchronous_commit="on")
    assert _after_power_loss(cluster) == list(range(200))


def test_a_commit_reported_before_its_wal_was_synced_is_lost_by_a_power_loss(cluster: PowerLossPostgres) -> None:
    _commit(cluster, range(10), synchronous_commit="on")
    # Held off, as they would be by a busy machine: the WAL writer syncs an asynchronous commit within
    # wal_writer_delay (200 ms), and the background writer the WAL of any page it writes out.
    for process in ("walwriter", "background writer"):
        os.kill(cluster.process_pid(process), signal.SIGSTOP)
    _commit(cluster, range(10, 20), synchronous_commit="off")
    assert _after_power_loss(cluster) == list(range(10))

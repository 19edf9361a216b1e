"""The power-loss filesystem under a real PostgreSQL (:class:`tests.e2e.private_services.PowerLossPostgres`): what
the fault test's power loss can show that a crash of PostgreSQL's processes cannot.

A commit whose WAL PostgreSQL synced survives the power cut. A commit whose WAL was written to the filesystem but
never synced (``fsync`` turned off for it) survives a crash of PostgreSQL alone, as it would on a real machine (the
kernel keeps what was written), but not the power cut: so an answer given before its WAL was on the disk fails the
fault test, where its earlier crash (``fsync = off``, processes killed) could only catch one given before the WAL
left PostgreSQL's memory.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import skip_or_fail
from tests.e2e.conftest import free_port, wait_until
from tests.e2e.private_services import PowerLossPostgres, power_loss_missing, private_services_missing


@pytest.fixture
def cluster() -> Iterator[PowerLossPostgres]:
    missing = private_services_missing() or power_loss_missing()
    if missing:
        skip_or_fail(missing)
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


def _commit(pg: PowerLossPostgres, rows: range) -> None:
    """One commit per row, each reported only after its WAL was written and (with ``fsync`` on) synced."""
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        for n in rows:
            conn.execute("INSERT INTO acknowledged VALUES (%s)", (n,))


def _stop_syncing(pg: PowerLossPostgres) -> None:
    """From now on nothing the cluster writes is synced: ``fsync`` off (the committing sessions still write their
    WAL before they report the commit), and the WAL writer and the background writer held off (stopped), which
    might otherwise sync some before they see the new setting."""
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET fsync = off")
        conn.execute("SELECT pg_reload_conf()")

    def fsync_off() -> bool:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            return conn.execute("SHOW fsync").fetchone() == ("off",)

    wait_until(fsync_off, message="fsync off after the reload")
    for process in ("walwriter", "background writer"):
        pg.stop_waiting(process)


def _rows_after(pg: PowerLossPostgres, failure: Callable[[], None]) -> list[int]:
    failure()
    pg.start()
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        return [n for (n,) in conn.execute("SELECT n FROM acknowledged ORDER BY n")]


def test_every_commit_whose_wal_was_synced_survives_a_power_loss(cluster: PowerLossPostgres) -> None:
    _commit(cluster, range(200))
    assert _rows_after(cluster, cluster.power_loss) == list(range(200))


def test_a_commit_whose_wal_was_written_but_not_synced_is_lost_by_a_power_loss(cluster: PowerLossPostgres) -> None:
    _commit(cluster, range(10))
    _stop_syncing(cluster)
    _commit(cluster, range(10, 20))
    assert _rows_after(cluster, cluster.power_loss) == list(range(10))


def test_a_commit_whose_wal_was_written_but_not_synced_survives_a_crash_of_postgresql_alone(
    cluster: PowerLossPostgres,
) -> None:
    _commit(cluster, range(10))
    _stop_syncing(cluster)
    _commit(cluster, range(10, 20))
    assert _rows_after(cluster, cluster.kill) == list(range(20))


# ------------------------------------------------------------------------------------------------ the model alone


@pytest.fixture
def model(tmp_path: Path) -> Any:
    """A :class:`~tests.e2e.power_loss_fs.PowerLossFS` called directly, without a mount (its files made in the
    backing directory: creating through it asks FUSE who the caller is)."""
    try:
        from tests.e2e.power_loss_fs import BLOCK, PowerLossFS
    except (ImportError, OSError) as exc:  # mfusepy finds libfuse as it is imported
        skip_or_fail(f"libfuse is not usable: {exc}")
    (tmp_path / "f").write_bytes(b"A" * 3 * BLOCK)
    return PowerLossFS(str(tmp_path))


def test_the_model_drops_what_was_written_after_the_last_sync_at_a_power_cut(model: Any, tmp_path: Path) -> None:
    model.write("/f", b"B" * 10, 0, 0)
    model.fsync("/f", 1, 0)
    model.write("/f", b"C" * 10, 20, 0)
    assert model.read("/f", 30, 0, 0) == b"B" * 10 + b"A" * 10 + b"C" * 10
    model.crash()
    assert (tmp_path / "f").read_bytes()[:30] == b"B" * 10 + b"A" * 20


def test_the_model_reads_zeros_where_a_file_was_cut_short_and_then_extended(model: Any, tmp_path: Path) -> None:
    size = len((tmp_path / "f").read_bytes())
    model.truncate("/f", 100)
    model.write("/f", b"Z", size - 1, 0)
    expected = b"A" * 100 + bytes(size - 101) + b"Z"
    assert model.read("/f", size, 0, 0) == expected
    model.fsync("/f", 1, 0)
    assert (tmp_path / "f").read_bytes() == expected


def test_the_model_moves_unsynced_contents_with_their_directory(model: Any, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "g").write_bytes(b"")
    model.write("/a/g", b"moved", 0, 0)
    model.rename("/a", "/b")
    assert model.read("/b/g", 5, 0, 0) == b"moved"
    model.fsync("/b/g", 1, 0)
    assert (tmp_path / "b" / "g").read_bytes() == b"moved"


def test_the_model_fails_every_operation_after_the_power_cut_with_eio(model: Any) -> None:
    """Above all no write or sync may be accepted after the cut: a sync that succeeded would claim durability."""
    from mfusepy import FuseOSError

    model.crash()
    operations = {
        "getattr": lambda: model.getattr("/f"),
        "readdir": lambda: model.readdir("/", 0),
        "read": lambda: model.read("/f", 1, 0, 0),
        "write": lambda: model.write("/f", b"x", 0, 0),
        "truncate": lambda: model.truncate("/f", 0),
        "fsync": lambda: model.fsync("/f", 1, 0),
        "rename": lambda: model.rename("/f", "/g"),
        "unlink": lambda: model.unlink("/f"),
    }
    for name, operation in operations.items():
        with pytest.raises(FuseOSError) as failed:
            operation()
        assert failed.value.errno == errno.EIO, name


def test_the_model_when_full_refuses_to_grow_a_file_but_lets_it_be_overwritten(model: Any, tmp_path: Path) -> None:
    """A full disk: a file's own blocks can be written (PostgreSQL's pages, its recycled WAL segments) and a file cut
    short, but no file may grow; with room again it grows."""
    from mfusepy import FuseOSError

    size = len((tmp_path / "f").read_bytes())
    model.fill(True)
    model.write("/f", b"B" * 10, size - 10, 0)
    for grow in (lambda: model.write("/f", b"C", size, 0), lambda: model.truncate("/f", size + 1)):
        with pytest.raises(FuseOSError) as refused:
            grow()
        assert refused.value.errno == errno.ENOSPC
    model.truncate("/f", size - 5)  # shorter, as PostgreSQL's truncation of a relation
    assert model.fill(False) == 2
    model.write("/f", b"E", size, 0)
    assert model.read("/f", 11, size - 10, 0) == b"B" * 5 + bytes(5) + b"E"

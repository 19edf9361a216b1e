"""``ops/scripts/pgbouncer.sh`` for a run directory its user cannot enter.

As root, pgbouncer runs as ``postgres``, which cannot enter a directory under ``/root`` or any 0700 parent (a
fresh clone under ``/root`` made ``exchange dev`` fail with "could not load file pgbouncer.ini: Permission
denied"). pytest's own tmp dir is such a parent.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from urllib.parse import quote, urlsplit

import psutil
import psycopg
import pytest
from psycopg import sql

from exchange.dev import StopRequest, _spawn, _stop, pgbouncer_child, stop_pgbouncer, wait_listening
from tests.e2e.conftest import PGBOUNCER_SCRIPT, free_port, pgbouncer_files, require_services
from tests.e2e.private_services import PrivatePostgres


def start(run_dir: Path, port: int, database_url: str) -> tuple[subprocess.CompletedProcess[str], Path | None]:
    """Run ``pgbouncer.sh start``; returns its outcome and the stand-in directory it recorded, if any."""
    parts = urlsplit(database_url)
    argv = ["bash", str(PGBOUNCER_SCRIPT), "start", str(run_dir), str(port)]
    argv += [parts.hostname or "127.0.0.1", str(parts.port or 5432), parts.username or "postgres"]
    started = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    files = pgbouncer_files(run_dir)
    return started, files if files != run_dir else None


def gone(pid: int) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(10)  # raises TimeoutExpired if it is still running
    return True


def test_pgbouncer_serves_and_stops_for_a_run_dir_its_user_cannot_enter(
    tmp_path: Path, migrated_database_url: str
) -> None:
    require_services()
    if os.geteuid() != 0:
        pytest.skip("only root hands pgbouncer to another user")
    run_dir, port = tmp_path / "private" / "pgbouncer", free_port()
    run_dir.parent.mkdir(mode=0o700)
    parts = urlsplit(migrated_database_url)
    try:
        started, files = start(run_dir, port, migrated_database_url)
        assert started.returncode == 0, started.stdout + started.stderr
        assert files is not None
        with psycopg.connect(f"postgresql://{parts.username}@127.0.0.1:{port}{parts.path}", autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pid = int((files / "pgbouncer.pid").read_text())

        # Started again without a stop (same port): the first one is stopped and its directory removed first.
        again, files_again = start(run_dir, port, migrated_database_url)
        assert again.returncode == 0, again.stdout + again.stderr
        assert gone(pid)
        assert not files.exists()
        assert files_again is not None
        pid = int((files_again / "pgbouncer.pid").read_text())
    finally:
        subprocess.run(["bash", str(PGBOUNCER_SCRIPT), "stop", str(run_dir)], check=False, timeout=30)
    assert gone(pid)
    assert not files_again.exists()
    assert not (run_dir / "pgbouncer.files").exists()


def test_exchange_devs_pgbouncer_logs_in_with_the_database_urls_password(tmp_path: Path) -> None:
    require_services()
    password = "p'w d\\$x%"  # a quote, a space, a backslash, a dollar: each quoted for pgbouncer's connection string
    pg = PrivatePostgres(free_port())
    pg.init()
    pg.start()
    child = None
    try:
        with psycopg.connect(pg.url(), autocommit=True) as conn:  # trust, until the reload below
            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(password)))
            (pg.data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
            conn.execute("SELECT pg_reload_conf()")
        url = f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:{pg.port}/postgres"
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.url(), connect_timeout=5).close()  # the server asks for the password now
        port = free_port()
        made = pgbouncer_child(url, tmp_path / "pgbouncer", port)
        assert made is not None
        child, pooled_url = made
        assert password not in pooled_url
        assert quote(password, safe="") not in pooled_url
        _spawn(child, dict(os.environ))
        wait_listening(child, port, StopRequest())

        with psycopg.connect(pooled_url, autocommit=True, prepare_threshold=None) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        files = pgbouncer_files(tmp_path / "pgbouncer")
        assert (files / "pgbouncer.ini").stat().st_mode & 0o077 == 0  # the password is not for other users
    finally:
        if child is not None:
            _stop([child], grace_s=5)
            stop_pgbouncer(tmp_path / "pgbouncer")
        pg.close()


def test_exchange_devs_pgbouncer_admits_only_the_pooled_urls_user_with_its_password(
    tmp_path: Path, postgres_admin_url: str
) -> None:
    """``exchange dev``'s pgbouncer listens on 127.0.0.1, where every local user reaches it: only the pooled URL dev
    hands its children gets in (its user, with a password of the run's own), even in front of a server that trusts
    every local connection as this one does (the README's first command: no configuration, no password)."""
    require_services()
    port, run_dir = free_port(), tmp_path / "pgbouncer"
    made = pgbouncer_child(postgres_admin_url, run_dir, port)
    assert made is not None
    child, pooled_url = made
    try:
        _spawn(child, dict(os.environ))
        wait_listening(child, port, StopRequest())
        with psycopg.connect(pooled_url, autocommit=True, prepare_threshold=None, connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)

        parts = urlsplit(pooled_url)
        for netloc in (f"postgres@127.0.0.1:{port}", f"postgres:guess@127.0.0.1:{port}", f"nobody@127.0.0.1:{port}"):
            other = parts._replace(netloc=netloc).geturl()
            with pytest.raises(psycopg.OperationalError):  # was let in as postgres: auth_type any
                psycopg.connect(other, prepare_threshold=None, connect_timeout=5).close()
        assert (pgbouncer_files(run_dir) / "pgbouncer.users").stat().st_mode & 0o077 == 0
    finally:
        _stop([child], grace_s=5)
        stop_pgbouncer(run_dir)

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
from urllib.parse import urlsplit

import psutil
import psycopg
import pytest

from tests.e2e.conftest import PGBOUNCER_SCRIPT, free_port, pgbouncer_files, require_services


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

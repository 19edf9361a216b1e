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

from tests.e2e.conftest import PGBOUNCER_SCRIPT, free_port, require_services


def test_pgbouncer_serves_and_stops_for_a_run_dir_its_user_cannot_enter(
    tmp_path: Path, migrated_database_url: str
) -> None:
    require_services()
    if os.geteuid() != 0:
        pytest.skip("only root hands pgbouncer to another user")
    run_dir, port = tmp_path / "private" / "pgbouncer", free_port()
    run_dir.parent.mkdir(mode=0o700)
    parts = urlsplit(migrated_database_url)
    user = parts.username or "postgres"
    argv = ["bash", str(PGBOUNCER_SCRIPT), "start", str(run_dir), str(port)]
    argv += [parts.hostname or "127.0.0.1", str(parts.port or 5432), user]
    started = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    files = Path((run_dir / "pgbouncer.files").read_text().strip()) if (run_dir / "pgbouncer.files").exists() else None
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        with psycopg.connect(f"postgresql://{user}@127.0.0.1:{port}{parts.path}", autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert files is not None
        pid = int((files / "pgbouncer.pid").read_text())
    finally:
        subprocess.run(["bash", str(PGBOUNCER_SCRIPT), "stop", str(run_dir)], check=False, timeout=30)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(10)  # raises TimeoutExpired if it is still running
    assert not files.exists()
    assert not (run_dir / "pgbouncer.files").exists()

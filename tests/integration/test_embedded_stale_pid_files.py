"""The embedded servers' pid files, left behind by a server that died (a reboot, the OOM killer, a SIGKILLed
``exchange dev``), name a pid the kernel may since have given to an unrelated process: starting the server again
must not signal it (dev often runs as root, where it may signal anything)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange.embedded import EmbeddedPostgres, EmbeddedRedis


@pytest.fixture
def unrelated() -> Iterator[subprocess.Popen[bytes]]:
    """A process that has nothing to do with the exchange, standing in for one that got a dead server's pid."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


def test_a_stale_redis_pid_file_naming_an_unrelated_process_leaves_that_process_alone(
    tmp_path: Path, unrelated: subprocess.Popen[bytes]
) -> None:
    (tmp_path / "redis.pid").write_text(f"{unrelated.pid}\n")
    server = EmbeddedRedis(tmp_path)
    try:
        server.start()
    finally:
        server.stop()

    assert unrelated.poll() is None  # before: killed by SIGTERM (-15)


def test_a_redis_left_running_by_a_killed_supervisor_is_replaced(tmp_path: Path) -> None:
    left = EmbeddedRedis(tmp_path)
    left.start()
    assert left.process is not None
    try:
        server = EmbeddedRedis(tmp_path)  # the next run: the first one's handle is lost, its pid file remains
        try:
            server.start()
            assert left.process.wait(10) is not None
            assert server.process is not None
            assert server.process.poll() is None
        finally:
            server.stop()
    finally:
        left.stop()


def test_a_stale_postmaster_pid_file_naming_an_unrelated_process_leaves_that_process_alone(
    tmp_path: Path, unrelated: subprocess.Popen[bytes]
) -> None:
    server = EmbeddedPostgres(tmp_path / "pgdata")
    server.start()
    server.stop()  # a clean stop removes postmaster.pid: write back one as a server killed outright leaves it
    pid_file = tmp_path / "pgdata" / "postmaster.pid"
    pid_file.write_text(f"{unrelated.pid}\n{tmp_path / 'pgdata'}\n0\n5432\n{tmp_path}\n\n0 0\nready\n")

    server = EmbeddedPostgres(tmp_path / "pgdata")
    try:
        url = server.start()  # before: the unrelated process was adopted as the server (no socket: start failed)
        assert server.pid != unrelated.pid
        assert url.startswith("postgresql://")
    finally:
        server.stop()

    assert unrelated.poll() is None

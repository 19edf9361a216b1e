"""A real ``exchange matcher`` (dramatiq's master and its worker process) under ``EXCHANGE_LOG_FORMAT``: the
master's own lines — its start, the signal it forwards, its stop — are in the exchange's format like the workers'
lines, so that a log shipper reading the process's stderr meets only JSON lines when the format is json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.redis_support import claimed_database

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = "Worker process is ready for action."


@pytest.fixture
def redis_url() -> Iterator[str]:
    with claimed_database() as url:
        yield url


def _run_matcher_until_ready_then_stop(tmp_path: Path, database_url: str, redis_url: str, log_format: str) -> str:
    """Start ``exchange matcher`` (one worker process, one thread), SIGTERM it once its worker is ready, and return
    what it wrote to stderr, every line of the master and of its worker until it exited."""
    (tmp_path / "empty.env").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXCHANGE_", "dramatiq_"))}
    env.update(
        EXCHANGE_ENV_FILE=str(tmp_path / "empty.env"),
        EXCHANGE_LOG_FORMAT=log_format,
        EXCHANGE_DATABASE_URL=database_url,
        EXCHANGE_REDIS_URL=redis_url,
        EXCHANGE_PARTITIONS="2",
        PYTHONUNBUFFERED="1",
    )
    argv = [sys.executable, "-m", "exchange.cli", "matcher", "--partitions", "all", "--threads", "1"]
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as stderr:
        master = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            while READY not in log_path.read_text() and master.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert READY in log_path.read_text(), log_path.read_text()
        finally:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, signal.SIGKILL)
                master.wait()
    return log_path.read_text()


def test_every_line_a_dramatiq_master_and_its_worker_write_is_json_when_the_log_format_is_json(
    tmp_path: Path, migrated_database_url: str, redis_url: str
) -> None:
    output = _run_matcher_until_ready_then_stop(tmp_path, migrated_database_url, redis_url, "json")

    lines = [line for line in output.splitlines() if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)  # was "[2026-…] [PID 123] [MainProcess] [dramatiq.MainProcess] [INFO] Dramatiq …"
        assert isinstance(record, dict), line
        records.append(record)
    master = [r for r in records if r["logger"] == "dramatiq.MainProcess"]
    messages = " | ".join(r["msg"] for r in master)
    assert "is booting up" in messages, lines
    assert "Sending signal 'SIGTERM' to subprocesses" in messages, lines
    assert {r["process"] for r in records} == {"matcher"}, lines
    assert any(r["msg"] == READY and r["pid"] != master[0]["pid"] for r in records), lines  # the worker's, too


def test_a_dramatiq_masters_lines_are_the_exchanges_text_lines_when_the_log_format_is_text(
    tmp_path: Path, migrated_database_url: str, redis_url: str
) -> None:
    output = _run_matcher_until_ready_then_stop(tmp_path, migrated_database_url, redis_url, "text")

    booting = [line for line in output.splitlines() if "is booting up" in line]
    assert len(booting) == 1, output
    assert " INFO [dramatiq.MainProcess] Dramatiq " in booting[0], booting  # not dramatiq's "[PID …] [INFO]" format

"""A worker started while its database does not answer: it cannot name its Redis namespace
(:func:`exchange.messaging.names.process_namespace`), so it waits a few seconds and exits, to be started again by its
supervisor; a stop meanwhile ends it at once. Before, it waited without bound and ignored SIGTERM (dramatiq's
master holds signals until its workers have imported their module; the sweeper's handler only sets an event), so
every stop during a database outage ended in a SIGKILL after the supervisor's grace."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from exchange.messaging.names import process_namespace
from tests.integration.redis_support import claimed_database
from tests.integration.worker_processes import start_worker

EXITS_WITHIN_S = 30.0
"""A generous bound on something that either happens within a few seconds or never (not a latency assert)."""


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unreachable_database_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{closed_port()}/exchange"


@pytest.fixture
def redis_url() -> Iterator[str]:
    with claimed_database() as url:
        yield url


def start(kind: str, tmp_path: Path, database_url: str, redis_url: str) -> tuple[subprocess.Popen[bytes], Path]:
    return start_worker([kind], tmp_path, kind, database_url, redis_url)


def wait_for_line(process: subprocess.Popen[bytes], log_path: Path, text: str) -> None:
    deadline = time.monotonic() + EXITS_WITHIN_S
    while text not in log_path.read_text(errors="replace"):
        assert process.poll() is None, log_path.read_text(errors="replace")
        assert time.monotonic() < deadline, log_path.read_text(errors="replace")
        time.sleep(0.05)


def exits_within(process: subprocess.Popen[bytes], seconds: float) -> int | None:
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def test_process_namespace_gives_up_with_a_system_exit_when_the_database_does_not_answer(
    unreachable_database_url: str,
) -> None:
    with pytest.raises(SystemExit, match="the database could not be reached"):
        process_namespace(None, unreachable_database_url, wait_s=0.3, retry_s=0.1)


def test_process_namespace_waits_no_longer_when_it_is_configured(unreachable_database_url: str) -> None:
    assert process_namespace("staging-1", unreachable_database_url, wait_s=0.0) == "staging-1"


def test_process_namespace_still_raises_what_is_not_the_database_being_unreachable() -> None:
    with pytest.raises(psycopg.ProgrammingError):
        process_namespace(None, "postgresql://postgres@127.0.0.1:5432/x?no_such_option=1", wait_s=0.3)


@pytest.mark.parametrize("kind", ["sweeper", "matcher", "webhooks"])
def test_a_worker_stopped_while_it_waits_for_its_database_exits(
    kind: str, tmp_path: Path, unreachable_database_url: str, redis_url: str
) -> None:
    process, log_path = start(kind, tmp_path, unreachable_database_url, redis_url)
    wait_for_line(process, log_path, "waiting for the database to derive the Redis namespace")

    process.send_signal(signal.SIGTERM)

    code = exits_within(process, EXITS_WITHIN_S)
    log = log_path.read_text(errors="replace")
    assert code is not None, log
    if kind == "sweeper":  # its own process: ended by the stop itself, not by the wait's bound
        assert code == 128 + signal.SIGTERM, log
        assert "the database could not be reached" not in log


@pytest.mark.parametrize("kind", ["sweeper", "matcher"])
def test_a_worker_whose_database_does_not_answer_exits_to_be_started_again(
    kind: str, tmp_path: Path, unreachable_database_url: str, redis_url: str
) -> None:
    process, log_path = start(kind, tmp_path, unreachable_database_url, redis_url)

    code = exits_within(process, EXITS_WITHIN_S)

    assert code not in (None, 0), log_path.read_text(errors="replace")
    assert "the database could not be reached" in log_path.read_text(errors="replace")

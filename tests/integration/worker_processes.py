"""Real worker processes (``python -m exchange.cli <kind> …``) for integration tests: an environment of the test's
own (no ``EXCHANGE_``/``dramatiq_`` variable of the caller's, no ``.env``), its output in a log file, its own
session so that it can be stopped with everything it forked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_worker(
    argv: Sequence[str], work: Path, name: str, database_url: str, redis_url: str, **variables: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``exchange <argv>`` on ``database_url`` and ``redis_url`` (plus ``EXCHANGE_<variables>``); returns the
    process and its log file (in ``work``)."""
    (work / "empty.env").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXCHANGE_", "dramatiq_"))}
    env.update(
        EXCHANGE_ENV_FILE=str(work / "empty.env"),
        EXCHANGE_LOG_FORMAT="text",
        EXCHANGE_DATABASE_URL=database_url,
        EXCHANGE_REDIS_URL=redis_url,
        PYTHONUNBUFFERED="1",
    )
    env.update({f"EXCHANGE_{key.upper()}": value for key, value in variables.items()})
    log_path = work / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "exchange.cli", *argv],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log_path


def stop_worker(process: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """SIGTERM to the worker's session, SIGKILL after ``grace_s``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def running_matcher(work: Path, name: str, database_url: str, redis_url: str, partitions: int) -> Iterator[Path]:
    """A real ``exchange matcher`` over every partition, one thread; yields its log file."""
    argv = ["matcher", "--partitions", "all", "--threads", "1"]
    process, log_path = start_worker(argv, work, name, database_url, redis_url, partitions=str(partitions))
    try:
        yield log_path
    finally:
        stop_worker(process)

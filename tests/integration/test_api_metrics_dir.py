"""The api's Prometheus multiprocess directory (``gunicorn.conf.py``): made fresh per gunicorn master when none is
given, removed however the master exits, and a given one is left alone. Real gunicorn processes with the project's
config; the directory they make lands in the test's own ``TMPDIR``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.bench.main import free_port
from tests.integration.redis_support import redis_test_url
from tests.serving import wait_until_answering

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 60.0


def _env(tmp_path: Path, migrated_database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXCHANGE_", "PROMETHEUS_"))}
    env.update(
        TMPDIR=str(tmp_path),
        EXCHANGE_ENV_FILE=str(tmp_path / "empty.env"),
        EXCHANGE_DATABASE_URL=migrated_database_url,
        EXCHANGE_REDIS_URL=redis_test_url(),
        **extra,
    )
    (tmp_path / "empty.env").write_text("")
    return env


def _made_dirs(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("exchange-metrics-*"))


def _gunicorn(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.fixture
def serving(tmp_path: Path, migrated_database_url: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    master = _gunicorn(port, _env(tmp_path, migrated_database_url))
    try:
        _wait_live(port, master)
        yield master, port
    finally:
        if master.poll() is None:
            os.killpg(master.pid, signal.SIGKILL)
        master.wait(timeout=30)


def _wait_live(port: int, master: subprocess.Popen[bytes]) -> None:
    wait_until_answering(f"http://127.0.0.1:{port}/health/live", master, STARTUP_TIMEOUT_S)


def test_a_gunicorn_that_cannot_bind_its_port_leaves_no_metrics_directory(
    tmp_path: Path, migrated_database_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        master = _gunicorn(taken.getsockname()[1], _env(tmp_path, migrated_database_url))
        assert master.wait(timeout=60) != 0  # gunicorn gives up after its bind retries

    assert _made_dirs(tmp_path) == []


def test_a_stopped_gunicorn_removes_the_metrics_directory_it_made(
    serving: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    master, _ = serving
    assert len(_made_dirs(tmp_path)) == 1  # made while it serves

    master.send_signal(signal.SIGTERM)
    master.wait(timeout=60)

    assert _made_dirs(tmp_path) == []


def test_a_served_apis_metrics_hold_no_family_of_another_process_kind(
    serving: tuple[subprocess.Popen[bytes], int],
) -> None:
    _, port = serving  # answered /health/live: that request is counted
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "exchange_http_requests_total{" in text
    foreign = ("exchange_match_", "exchange_book_", "exchange_sweeper_", "exchange_webhook_")
    assert [line for line in text.splitlines() if line.startswith(foreign)] == []  # were there, at 0


def test_a_given_metrics_directory_is_left_in_place(tmp_path: Path, migrated_database_url: str) -> None:
    given = tmp_path / "given"
    given.mkdir()
    port = free_port()
    master = _gunicorn(port, _env(tmp_path, migrated_database_url, PROMETHEUS_MULTIPROC_DIR=str(given)))
    try:
        _wait_live(port, master)
        master.send_signal(signal.SIGTERM)
        master.wait(timeout=60)
    finally:
        if master.poll() is None:
            os.killpg(master.pid, signal.SIGKILL)
            master.wait(timeout=30)

    assert given.is_dir()
    assert _made_dirs(tmp_path) == []


@pytest.mark.parametrize("where", ["environment", "env-file"])
def test_exchange_api_listens_where_exchange_api_bind_says_without_bind(
    tmp_path: Path, migrated_database_url: str, where: str
) -> None:
    port = free_port()
    env = _env(tmp_path, migrated_database_url)
    if where == "environment":
        env["EXCHANGE_API_BIND"] = f"127.0.0.1:{port}"
    else:
        (tmp_path / "empty.env").write_text(f"EXCHANGE_API_BIND=127.0.0.1:{port}\nEXCHANGE_API_WORKERS=1\n")
    master = subprocess.Popen(
        [sys.executable, "-m", "exchange.cli", "api"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_live(port, master)  # was 127.0.0.1:8000 whatever the variable said
    finally:
        if master.poll() is None:
            os.killpg(master.pid, signal.SIGTERM)
        master.wait(timeout=60)


def _api_stderr_lines(tmp_path: Path, env: dict[str, str], command: list[str]) -> list[str]:
    """The non-blank stderr lines of ``command`` (serving on ``EXCHANGE_API_BIND``) from start until it answers
    and stops."""
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        master = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            _wait_live(int(env["EXCHANGE_API_BIND"].rsplit(":", 1)[1]), master)
        finally:
            master.send_signal(signal.SIGTERM)
            master.wait(timeout=60)
    return [line for line in log.read_text().splitlines() if line.strip()]


def _gunicorn_lines(tmp_path: Path, migrated_database_url: str, log_format: str) -> list[str]:
    port = free_port()
    env = _env(tmp_path, migrated_database_url, EXCHANGE_LOG_FORMAT=log_format, EXCHANGE_API_BIND=f"127.0.0.1:{port}")
    argv = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--workers", "1"]
    return _api_stderr_lines(tmp_path, env, argv)


@pytest.mark.parametrize("log_format", ["json", " JSON"])
def test_gunicorns_own_lines_are_json_when_the_log_format_is(
    tmp_path: Path, migrated_database_url: str, log_format: str
) -> None:
    lines = _gunicorn_lines(tmp_path, migrated_database_url, log_format)
    assert any("Starting gunicorn" in line for line in lines), lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line  # was "[…] [pid] [INFO] Starting gunicorn 23…"


def test_uvicorns_json_lines_carry_no_ansi_coloured_copy_of_the_message(
    tmp_path: Path, migrated_database_url: str
) -> None:
    lines = [json.loads(line) for line in _gunicorn_lines(tmp_path, migrated_database_url, "json")]
    assert any(line["logger"].startswith("uvicorn") for line in lines), lines
    assert all("color_message" not in line and "\x1b" not in line["msg"] for line in lines), lines


def test_exchange_api_logs_text_lines_only_when_the_env_file_says_text(
    tmp_path: Path, migrated_database_url: str
) -> None:
    port = free_port()
    env = _env(tmp_path, migrated_database_url)
    (tmp_path / "empty.env").write_text(
        f"EXCHANGE_LOG_FORMAT=text\nEXCHANGE_API_BIND=127.0.0.1:{port}\nEXCHANGE_API_WORKERS=1\n"
    )
    env["EXCHANGE_API_BIND"] = f"127.0.0.1:{port}"  # for _api_stderr_lines to find the port; the file says the same
    lines = _api_stderr_lines(tmp_path, env, [sys.executable, "-m", "exchange.cli", "api"])
    assert any("Starting gunicorn" in line for line in lines), lines
    assert not [line for line in lines if line.startswith("{")], lines  # gunicorn's and uvicorn's were JSON

"""The built distribution, as a user installs it: ``uv build`` (the sdist, and the wheel built from it), the wheel
installed with the lock's dependencies into a fresh virtual environment, and its ``exchange`` command run from a
directory outside the repository against a PostgreSQL database of the test's own (``exchange_wheel_<random>``):
``exchange migrate`` (the alembic scripts), ``exchange dev`` (pgbouncer's script and configuration, the api's
gunicorn configuration, the dramatiq workers) and ``exchange bench`` (the load generator in ``ops``) must find
everything they need inside what was installed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from exchange.db import migrate
from exchange.db.urls import with_database
from ops.bench.main import free_port
from tests.conftest import skip_or_fail
from tests.e2e.conftest import REPO_ROOT, pgbouncer_binary
from tests.integration.redis_support import claimed_database
from tests.serving import wait_until_answering

ADMIN_KEY = "adm_wheel_test"
INSTALL_TIMEOUT_S = 600


@dataclass(frozen=True)
class Installed:
    venv: Path
    work_dir: Path
    """An empty directory outside the repository, the commands' working directory (nothing of the sources in
    reach: ``python -m`` puts the working directory first on ``sys.path``)."""
    env: dict[str, str]

    def exchange(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / "exchange"), *args],
            cwd=self.work_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")  # `uv run` names itself in UV
    if found is None:
        skip_or_fail("uv is not installed")
    return found


def _run(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    uv, dist, venv = _uv(), root / "dist", root / "venv"
    _run([uv, "build", "--out-dir", str(dist)], REPO_ROOT)  # the sdist, then the wheel built from it
    [wheel] = dist.glob("exchange-*.whl")
    requirements = root / "requirements.txt"
    export = [uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "-o", str(requirements)]
    _run(export, REPO_ROOT)
    _run([uv, "venv", "--python", sys.executable, str(venv)], root)
    # --no-deps: the lock's every pin, as resolved with pyproject's override-dependencies (dramatiq-dashboard declares
    # dramatiq<2 and redis<5, which a resolver without the overrides refuses).
    install = [uv, "pip", "install", "--python", str(venv / "bin" / "python"), "--no-deps", "-r", str(requirements)]
    _run([*install, str(wheel)], root)

    work_dir = root / "work"
    work_dir.mkdir()
    (work_dir / "empty.env").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXCHANGE_", "dramatiq_", "UV_", "VIRTUAL_ENV"))}
    env.pop("PYTHONPATH", None)
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        EXCHANGE_ENV_FILE=str(work_dir / "empty.env"),
        EXCHANGE_ADMIN_API_KEY=ADMIN_KEY,
    )
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import exchange; print(exchange.__file__)"],
        cwd=work_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found).is_relative_to(venv), found  # the installed copy, not the sources
    return Installed(venv, work_dir, env)


@pytest.fixture
def wheel_database(postgres_admin_url: str) -> Iterator[str]:
    """A database of the test's own, ``exchange_wheel_<random>``, dropped afterwards."""
    name = f"exchange_wheel_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(postgres_admin_url, name)
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_exchange_migrate_from_the_installed_wheel_upgrades_to_head_and_downgrades_to_base(
    installed: Installed, wheel_database: str
) -> None:
    up = installed.exchange("migrate", "--database-url", wheel_database)
    assert up.returncode == 0, up.stderr  # was "ModuleNotFoundError: No module named 'ops'", then no alembic/
    assert up.stdout.strip() == migrate.head()
    assert migrate.current(wheel_database) == migrate.head()

    down = installed.exchange("migrate", "--database-url", wheel_database, "--downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == "base"


def test_exchange_dev_from_the_installed_wheel_serves_the_orders_its_exchange_bench_sends(
    installed: Installed, wheel_database: str
) -> None:
    port = free_port()
    log_path = installed.work_dir / "dev.log"
    with claimed_database() as redis_url:
        env = {**installed.env, "EXCHANGE_DATABASE_URL": wheel_database, "EXCHANGE_REDIS_URL": redis_url}
        argv = [str(installed.venv / "bin" / "exchange"), "dev", "--port", str(port), "--metrics-port", "0"]
        argv += ["--pgbouncer-port", str(free_port()), "--matchers", "1", "--api-workers", "1"]
        with log_path.open("wb") as log:
            dev = subprocess.Popen(
                argv, cwd=installed.work_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            base = f"http://127.0.0.1:{port}"
            # Ready: migrated by dev with the wheel's alembic scripts (at head), the api up with its gunicorn
            # configuration, through the wheel's pgbouncer script when pgbouncer is installed.
            wait_until_answering(f"{base}/health/ready", dev, 120, details=lambda: log_path.read_text()[-4000:])
            report_path = installed.work_dir / "bench.json"
            bench = installed.exchange(
                *("bench", "--base-url", base, "--admin-key", ADMIN_KEY, "--scale", "5", "--duration", "2"),
                *("--prefill", "1", "--webhook-grace", "1", "--json", str(report_path)),
                timeout=180,
            )
            assert bench.returncode == 0, f"{bench.stdout}\n{bench.stderr}\n{log_path.read_text()[-4000:]}"
            report = json.loads(report_path.read_text())
            assert report["endpoints"]["POST /orders"]["count"] > 0, bench.stdout
            assert report["errors"]["total"] == 0, report["errors"]
        finally:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
                dev.wait()
    output = log_path.read_text()
    assert dev.returncode == 0, output[-4000:]
    if pgbouncer_binary() is not None:
        assert "[pgbouncer]" in output, output[-4000:]  # started from the wheel's ops/scripts/pgbouncer.sh
    # Its state (pgbouncer's run files) in the working directory, not in the installed package's directory.
    assert (installed.work_dir / ".exchange").is_dir(), output[-4000:]

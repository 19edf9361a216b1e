"""End-to-end harness: the whole exchange as real processes against real PostgreSQL, pgbouncer and Redis.

A :class:`Harness` owns, for one fresh migrated database:

* pgbouncer (transaction pooling) on a free 127.0.0.1 port, started with ``ops/scripts/pgbouncer.sh``;
* a Redis database index picked at random in 1..15 (never the api integration tests' shared one) and ``FLUSHDB``-ed
  first;
* ``exchange api`` (gunicorn, 2 uvicorn workers, through pgbouncer), two ``exchange matcher`` processes splitting
  ``EXCHANGE_PARTITIONS=4`` as ``0-1`` and ``2-3``, ``exchange sweeper`` and ``exchange webhooks`` — each started as
  ``[sys.executable, "-m", "exchange.cli", ...]`` in its own process group, with stdout/stderr in a log file.

Start-up waits for ``/health/ready`` and then for one warm-up order per partition to be matched, so every test
starts against a pipeline that is known to work end to end. Teardown sends SIGTERM to each process group it
started, then SIGKILL after a timeout, stops pgbouncer and drops the database.

Fixtures:

* ``e2e_harness`` (session): the shared exchange; tests isolate themselves with :func:`unique_symbol` and fresh
  brokers from :meth:`Harness.register_broker`.
* ``harness_factory`` (function): ``harness_factory("name")`` starts a private exchange (for fault injection);
  it is stopped when the test ends.

pgbouncer missing: the tests are skipped, or fail when ``CI=true``. Log tails of every process are attached to
the report of a failing test.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import psycopg
import pytest
import redis

from exchange.messaging.partitions import partition_of
from ops.bench.main import free_port
from tests.conftest import DatabaseFactory, skip_or_fail
from tests.integration.redis_support import claim_database, database_url, release_database
from tests.invariants import check_invariants
from tests.serving import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
PGBOUNCER_SCRIPT = REPO_ROOT / "ops" / "scripts" / "pgbouncer.sh"
PARTITIONS = 4
MATCHER_SPLITS = {"matcher-a": "0-1", "matcher-b": "2-3"}
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 60
REDIS_SERVER_URL = "redis://127.0.0.1:6379/0"
REDIS_CLAIM_TTL_S = 3600

_REDIS_DBS_IN_USE: set[int] = set()


# ------------------------------------------------------------------------------------------------ helpers


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pid_from(path: Path) -> int | None:
    """The pid a pid file names (None: no file, or nothing readable in it)."""
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def pgbouncer_files(run_dir: Path) -> Path:
    """Where ``ops/scripts/pgbouncer.sh`` keeps the pid file and log of ``run_dir``'s pgbouncer: ``run_dir``, or the
    stand-in directory it records in ``run_dir/pgbouncer.files`` when pgbouncer's user cannot enter ``run_dir``."""
    pointer = run_dir / "pgbouncer.files"
    return Path(pointer.read_text().strip()) if pointer.exists() else run_dir


def require_services() -> None:
    if pgbouncer_binary() is None:
        skip_or_fail("pgbouncer is not installed (ops/scripts/install-system-deps.sh installs it)")
    client = redis.Redis.from_url(REDIS_SERVER_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        skip_or_fail(f"Redis is unreachable at 127.0.0.1:6379: {exc}")
    finally:
        client.close()


def unique_symbol(prefix: str = "T", partitions: set[int] | None = None) -> str:
    """A fresh ticker (<= 10 chars), optionally one that routes to one of ``partitions``."""
    while True:
        symbol = f"{prefix}{uuid.uuid4().hex[: 10 - len(prefix)]}".upper()
        if partitions is None or partition_of(symbol, PARTITIONS) in partitions:
            return symbol


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------ brokers


@dataclass
class Broker:
    """A registered broker and an authenticated view of the api for it."""

    harness: Harness
    broker_id: str
    name: str
    api_key: str
    webhook_secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        return self.harness.client.request(method, path, headers=headers, **kw)

    def place_raw(
        self,
        symbol: str,
        side: str,
        quantity: int,
        price: int | None = None,
        *,
        order_type: str = "limit",
        document_number: str = "12345678900",
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> httpx.Response:
        body: dict[str, Any] = {
            "document_number": document_number,
            "side": side,
            "order_type": order_type,
            "symbol": symbol,
            "quantity": quantity,
            **extra,
        }
        if price is not None:
            body["price"] = price
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        return self.request("POST", "/orders", json=body, headers=headers)

    def place(self, symbol: str, side: str, quantity: int, price: int | None = None, **kw: Any) -> dict[str, Any]:
        """Place an order; asserts 201 and returns the body."""
        response = self.place_raw(symbol, side, quantity, price, **kw)
        assert response.status_code == 201, f"POST /orders -> {response.status_code} {response.text}"
        body: dict[str, Any] = response.json()
        return body

    def order(self, order_id: str) -> dict[str, Any]:
        response = self.request("GET", f"/orders/{order_id}")
        assert response.status_code == 200, f"GET /orders/{order_id} -> {response.status_code} {response.text}"
        body: dict[str, Any] = response.json()
        return body

    def settled(self, order_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The order once the matcher has applied its place command (status open or closed)."""
        return dict(
            wait_until(
                lambda: o if (o := self.order(order_id))["status"] != "pending" else None,
                timeout,
                message=f"order {order_id} to leave pending",
            )
        )

    def cancel(self, order_id: str) -> httpx.Response:
        return self.request("POST", f"/orders/{order_id}/cancel")

    def book(self, symbol: str, depth: int | None = None) -> dict[str, Any]:
        params = {} if depth is None else {"depth": depth}
        response = self.request("GET", f"/stocks/{symbol}/book", params=params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def price(self, symbol: str, trades: int | None = None) -> httpx.Response:
        params = {} if trades is None else {"trades": trades}
        return self.request("GET", f"/stocks/{symbol}/price", params=params)

    def balance(self) -> dict[str, Any]:
        response = self.request("GET", "/balance")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


# ------------------------------------------------------------------------------------------------ harness


@dataclass
class Service:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    """Variables this service gets on top of the harness's (kept across restarts)."""

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Harness:
    """One running exchange (see the module docstring)."""

    name: str
    database_url: str
    work_dir: Path
    admin_key: str = field(default_factory=lambda: f"adm_{secrets.token_urlsafe(18)}")
    run_id: str = field(default_factory=lambda: f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    services: dict[str, Service] = field(default_factory=dict)
    pgbouncer_dir: Path | None = None
    _pgbouncer_start: list[str] = field(default_factory=list)
    """The ``pgbouncer.sh start`` command of the harness's pgbouncer (run again to restart it on the same port)."""
    pooled_url: str = ""
    redis_url: str = ""
    redis_db: int | None = None
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    matcher_metrics_ports: dict[str, int] = field(default_factory=dict)
    """The metrics port of each matcher of ``MATCHER_SPLITS`` (kept when a test restarts it)."""
    _client: httpx.Client | None = None

    # ----------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._start_pgbouncer()
        if not self.redis_url:  # preset: a private Redis of the test's own (tests/e2e/test_faults.py restarts it)
            self._pick_redis_db()
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EXCHANGE_", "dramatiq_"))}
        # Hermetic: an empty dotenv file, so a developer's ./.env cannot change the exchange under test.
        env_file = self.work_dir / "harness.env"
        env_file.write_text("")
        env.update(
            EXCHANGE_ENV_FILE=str(env_file),
            EXCHANGE_LOG_FORMAT="text",
            EXCHANGE_DATABASE_URL=self.database_url,
            EXCHANGE_POOLED_DATABASE_URL=self.pooled_url,
            EXCHANGE_REDIS_URL=self.redis_url,
            EXCHANGE_PARTITIONS=str(PARTITIONS),
            EXCHANGE_ADMIN_API_KEY=self.admin_key,
            EXCHANGE_WEBHOOK_ALLOW_PRIVATE="true",
            # Webhook retries and crash recovery in seconds, not hours (tests/e2e/test_webhooks_e2e.py).
            EXCHANGE_WEBHOOK_RETRY_SCHEDULE="0.2,0.5,1,1,1,1,1,1,1,1,1,1",
            EXCHANGE_WEBHOOK_CONNECT_TIMEOUT_MS="1000",
            EXCHANGE_WEBHOOK_READ_TIMEOUT_MS="2000",
            EXCHANGE_WEBHOOK_LEASE_MS="4500",  # beyond the longest attempt: 2 x 1 s + 2 s + 50 ms
            EXCHANGE_WEBHOOK_REQUEUE_AFTER_MS="1000",
            PYTHONUNBUFFERED="1",
        )
        self.env = env
        self.start_service("api", ["api", "--bind", f"127.0.0.1:{self.port}", "--workers", "2"])
        self.matcher_metrics_ports = {name: free_port() for name in MATCHER_SPLITS}
        for name, spec in MATCHER_SPLITS.items():
            self.start_matcher(name, spec)
        self.start_service("sweeper", ["sweeper"])
        self.webhooks_metrics_port = free_port()
        self.start_service(
            "webhooks", ["webhooks", "--threads", "8"], env={"EXCHANGE_METRICS_PORT": str(self.webhooks_metrics_port)}
        )
        self._client = httpx.Client(base_url=self.base_url, timeout=REQUEST_TIMEOUT_S)
        self._wait_ready()
        self._warm_up()

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.stop_services(list(self.services))
        if self.pgbouncer_dir is not None:
            subprocess.run(["bash", str(PGBOUNCER_SCRIPT), "stop", str(self.pgbouncer_dir)], check=False)
            shutil.rmtree(self.pgbouncer_dir, ignore_errors=True)
            self.pgbouncer_dir = None
        self._release_redis_db()

    def _start_pgbouncer(self) -> None:
        # Not under pytest's tmp dir: pgbouncer runs as the postgres user (as root), which cannot enter it (0700).
        self.pgbouncer_dir = Path(tempfile.mkdtemp(prefix=f"exchange-e2e-{self.name}-pgbouncer-"))
        parts = urlsplit(self.database_url)
        port = free_port()
        user = parts.username or "postgres"
        self._pgbouncer_start = ["bash", str(PGBOUNCER_SCRIPT), "start", str(self.pgbouncer_dir), str(port)]
        self._pgbouncer_start += [parts.hostname or "127.0.0.1", str(parts.port or 5432), user]
        self.start_pgbouncer()
        self.pooled_url = parts._replace(netloc=f"{user}@127.0.0.1:{port}").geturl()

    def start_pgbouncer(self) -> None:
        """Start (or start again, on the same port) the harness's pgbouncer; return once it listens."""
        result = subprocess.run(self._pgbouncer_start, capture_output=True, text=True, check=False, timeout=30)
        if result.returncode != 0:
            pytest.fail(f"pgbouncer did not start:\n{result.stdout}\n{result.stderr}")

    def kill_pgbouncer(self) -> int:
        """SIGKILL the harness's pgbouncer (a crash: every client and server connection drops at once); return its
        pid once it is gone."""
        assert self.pgbouncer_dir is not None
        pid = pid_from(pgbouncer_files(self.pgbouncer_dir) / "pgbouncer.pid")
        assert pid is not None, "the harness's pgbouncer wrote no pid file"
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), timeout=10, interval=0.01, message=f"pgbouncer {pid} to die after SIGKILL")
        return pid

    def _pick_redis_db(self) -> None:
        """A random Redis database in 1..15 (except the api tests' shared one), flushed; a claim key keeps concurrent
        test runs off it."""
        choices = [n for n in range(1, 16) if n not in _REDIS_DBS_IN_USE]
        random.shuffle(choices)
        n = claim_database(REDIS_SERVER_URL, self.run_id, REDIS_CLAIM_TTL_S, choices)
        if n is None:
            pytest.fail("no free Redis database in 1..15 (all claimed by other test runs)")
        self.redis_db = n
        _REDIS_DBS_IN_USE.add(n)
        self.redis_url = database_url(REDIS_SERVER_URL, n)

    def _release_redis_db(self) -> None:
        if self.redis_db is None:
            return
        release_database(self.redis_url, self.run_id)
        _REDIS_DBS_IN_USE.discard(self.redis_db)
        self.redis_db = None

    def _wait_ready(self) -> None:
        def ready() -> bool:
            self.assert_alive()
            try:
                return self.client.get("/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(ready, READY_TIMEOUT_S, interval=0.2, message="GET /health/ready -> 200")
        except BaseException:
            print(self.logs())
            raise

    def _warm_up(self) -> None:
        """One resting order per partition, matched: proves api → queue → every matcher → Postgres works."""
        broker = self.register_broker("warmup")
        for n in range(PARTITIONS):
            broker.place(unique_symbol("W", {n}), "bid", 1, 1)
        try:
            self.drain(READY_TIMEOUT_S)
        except BaseException:
            print(self.logs())
            raise

    # -------------------------------------------------------------------------------------- processes

    def start_service(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Service:
        service = self.services.get(name)
        if service is None:
            service = Service(
                name, [sys.executable, "-m", "exchange.cli", *args], self.work_dir / f"{name}.log", env=env or {}
            )
            self.services[name] = service
        assert not service.alive, f"{name} is already running"
        service.starts += 1
        with service.log_path.open("ab") as log:
            log.write(f"--- start #{service.starts}: {' '.join(service.argv)}\n".encode())
            log.flush()
            service.process = subprocess.Popen(
                service.argv,
                cwd=REPO_ROOT,
                env={**self.env, **service.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: gunicorn/dramatiq children stop with it
            )
        return service

    def start_matcher(self, name: str, partitions: str) -> Service:
        port = self.matcher_metrics_ports.get(name, 0)  # a matcher started by a test on its own: no metrics
        return self.start_service(
            name, ["matcher", "--partitions", partitions], env={"EXCHANGE_METRICS_PORT": str(port)}
        )

    def kill_service(self, name: str) -> None:
        """SIGKILL the service's whole process group (a crash: no cleanup, no acks) and reap it."""
        service = self.services[name]
        assert service.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait(timeout=10)

    def stop_services(self, names: list[str], timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the process groups of ``names``, then SIGKILL what is left after ``timeout``."""
        running = [s for n in names if (s := self.services[n]).process is not None]
        for service in running:
            assert service.process is not None
            if service.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for service in running:
            assert service.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.process.wait(max(0.1, deadline - time.monotonic()))
            # The group may outlive its leader (gunicorn/dramatiq workers): always make sure it is gone.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait()

    def assert_alive(self) -> None:
        dead = [f"{s.name} (exit {s.process.returncode})" for s in self.services.values() if s.process and not s.alive]
        if dead:
            pytest.fail(f"exchange processes died: {', '.join(dead)}\n{self.logs()}")

    def logs(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = [f"===== {s.name} ({s.log_path}) =====\n{tail(s.log_path, lines)}" for s in self.services.values()]
        if self.pgbouncer_dir is not None:
            parts.append(f"===== pgbouncer =====\n{tail(pgbouncer_files(self.pgbouncer_dir) / 'pgbouncer.log', 20)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------- api

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client(self) -> httpx.Client:
        assert self._client is not None, "harness not started"
        return self._client

    def register_broker(self, name: str, webhook_url: str | None = None) -> Broker:
        body: dict[str, Any] = {"name": f"{name}-{uuid.uuid4().hex[:6]}"}
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        response = self.client.post("/register", json=body, headers={"Authorization": f"Bearer {self.admin_key}"})
        assert response.status_code == 201, f"POST /register -> {response.status_code} {response.text}"
        data = response.json()
        return Broker(self, str(data["broker_id"]), data["name"], data["api_key"], data["webhook_secret"])

    # -------------------------------------------------------------------------------------- database

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one read query on the direct URL (autocommit)."""
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=10) as conn:
            return conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: Any = None) -> Any:
        return self.query(sql, params)[0][0]

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Wait until every command is processed and no order is pending."""

        def quiet() -> bool:
            self.assert_alive()
            unprocessed, pending = self.query(
                "SELECT (SELECT count(*) FROM commands WHERE processed_at IS NULL),"
                " (SELECT count(*) FROM orders WHERE status = 'pending')"
            )[0]
            return unprocessed == 0 and pending == 0

        wait_until(quiet, timeout, message="the exchange to drain (no unprocessed command, no pending order)")

    def check_invariants(self) -> None:
        """Drain, then assert DESIGN.md §6 on the whole database."""
        self.drain()
        check_invariants(self.database_url)


# ------------------------------------------------------------------------------------------------ fixtures


def _start_harness(name: str, database_factory: DatabaseFactory, template: str, work_dir: Path) -> Harness:
    require_services()
    url = database_factory.create(template=template)
    harness = Harness(name=name, database_url=url, work_dir=work_dir)
    try:
        harness.start()
    except BaseException:
        harness.stop()
        database_factory.drop(url)
        raise
    return harness


def _stop_harness(harness: Harness, database_factory: DatabaseFactory) -> None:
    try:
        harness.stop()
    finally:
        database_factory.drop(harness.database_url)


@pytest.fixture(scope="session")
def e2e_harness(
    database_factory: DatabaseFactory, _migrated_template_name: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    harness = _start_harness("shared", database_factory, _migrated_template_name, tmp_path_factory.mktemp("e2e"))
    yield harness
    _stop_harness(harness, database_factory)


class HarnessFactory:
    """``factory(name)`` starts a private exchange; :meth:`stop_all` stops every one it started."""

    def __init__(self, database_factory: DatabaseFactory, template: str, tmp_path: Path) -> None:
        self.database_factory = database_factory
        self.template = template
        self.tmp_path = tmp_path
        self.started: list[Harness] = []

    def __call__(self, name: str) -> Harness:
        work_dir = self.tmp_path / name
        work_dir.mkdir()
        harness = _start_harness(name, self.database_factory, self.template, work_dir)
        self.started.append(harness)
        return harness

    def stop_all(self) -> None:
        for harness in self.started:
            _stop_harness(harness, self.database_factory)
        self.started.clear()


@pytest.fixture
def harness_factory(
    database_factory: DatabaseFactory, _migrated_template_name: str, tmp_path: Path
) -> Iterator[HarnessFactory]:
    factory = HarnessFactory(database_factory, _migrated_template_name, tmp_path)
    yield factory
    factory.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the log tails of the item's exchange processes to a failing report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    harnesses: list[Harness] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Harness):
            harnesses.append(value)
        elif isinstance(value, HarnessFactory):
            harnesses.extend(value.started)
    for harness in harnesses:
        report.sections.append((f"exchange logs ({harness.name})", harness.logs()))

"""``exchange dev`` on a machine with no service configured: the README's first five minutes, for real.

Runs the real command with ``EXCHANGE_DATABASE_URL`` / ``EXCHANGE_REDIS_URL`` unset (so it starts embedded
PostgreSQL and Redis), waits for readiness, does what the README's curl example does (register two brokers, cross
two orders: each answered after its match, filled), checks the dramatiq dashboard lists every queue, then sends
SIGTERM twice and checks that every process of the run — children, their workers, pgbouncer, the embedded servers —
is gone. And when dev is killed outright (nothing stopped), its children stop by themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest

from exchange.dev import SETPRIV, stop_pgbouncer
from ops.bench.main import free_port
from tests.e2e.conftest import alive, pgbouncer_files, pid_from
from tests.integration.redis_support import claimed_database
from tests.serving import wait_until_answering
from tests.webhook_receiver import Receiver

ADMIN_KEY = "adm_dev_command_test"
READY_TIMEOUT_S = 120.0
UNSET = ("EXCHANGE_DATABASE_URL", "EXCHANGE_POOLED_DATABASE_URL", "EXCHANGE_REDIS_URL", "EXCHANGE_ENV_FILE")


def run_pids(dev: subprocess.Popen[bytes], state_dir: Path) -> set[int]:
    """Every process this run started: dev's descendants (pgbouncer among them) plus the daemonized embedded servers
    (own sessions)."""
    pids = {p.pid for p in psutil.Process(dev.pid).children(recursive=True)}
    pgbouncer_pid = pgbouncer_files(state_dir / "pgbouncer") / "pgbouncer.pid"
    pid_files = (state_dir / "pgdata/postmaster.pid", state_dir / "redis.pid", pgbouncer_pid)
    for pid in filter(None, (pid_from(path) for path in pid_files)):
        pids.add(pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    return pids


def wait_ready(base: str, dev: subprocess.Popen[bytes], log: Path) -> None:
    wait_until_answering(f"{base}/health/ready", dev, READY_TIMEOUT_S, details=lambda: log.read_text()[-4000:])


def register(client: httpx.Client, name: str) -> str:
    response = client.post("/register", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 201, response.text
    key: str = response.json()["api_key"]
    return key


def place(client: httpx.Client, key: str, side: str) -> dict[str, Any]:
    body = {"document_number": "12345678900", "side": side, "order_type": "limit", "symbol": "PETR4"}
    response = client.post(
        "/orders", json={**body, "price": 3850, "quantity": 100}, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 201, response.text
    order: dict[str, Any] = response.json()
    return order


def filled(client: httpx.Client, key: str, order_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        order: dict[str, Any] = client.get(f"/orders/{order_id}", headers={"Authorization": f"Bearer {key}"}).json()
        if order["status"] == "closed" or time.monotonic() > deadline:
            return order
        time.sleep(0.1)


def start_dev(tmp_path: Path, port: int, state_dir: Path, log: Path, **env_extra: str) -> subprocess.Popen[bytes]:
    """``exchange dev`` (one api worker, one matcher, two partitions) in a session of its own, its output in
    ``log``; services come from ``env_extra`` (``EXCHANGE_DATABASE_URL``…), embedded ones otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env |= {"EXCHANGE_ADMIN_API_KEY": ADMIN_KEY, "EXCHANGE_PARTITIONS": "2", **env_extra}
    argv = [sys.executable, "-m", "exchange.cli", "dev", "--port", str(port), "--state-dir", str(state_dir)]
    argv += ["--pgbouncer-port", str(free_port()), "--metrics-port", "0", "--matchers", "1", "--api-workers", "1"]
    with log.open("wb") as out:
        # cwd: an empty directory, so no developer's .env can configure services behind the test's back.
        return subprocess.Popen(
            argv, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def still_alive_after(pids: set[int], timeout_s: float) -> set[int]:
    """The processes of ``pids`` still running once they all ended or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_exchange_dev_without_configured_services_fills_the_readme_example_and_stops_cleanly(tmp_path: Path) -> None:
    port, state_dir, log = free_port(), tmp_path / "state", tmp_path / "dev.log"
    # A long wait for the matcher's result (the first order also waits for the matcher's start-up, on a busy CI
    # machine): an answer still `pending` then means the api never heard it. A working one answers at once.
    dev = start_dev(tmp_path, port, state_dir, log, EXCHANGE_ORDER_WAIT_MS="30000")
    pids: set[int] = set()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, dev, log)
        assert "embedded PostgreSQL" in log.read_text()
        assert "embedded Redis" in log.read_text()
        with httpx.Client(base_url=base, timeout=45) as client:
            seller, buyer = register(client, "seller"), register(client, "buyer")
            ask = place(client, seller, "ask")
            bid = place(client, buyer, "bid")
            # Each 201 is the order after its match, heard over the embedded Redis (a unix socket) at once
            assert ask["status"] == "open", ask
            assert (bid["status"], bid["close_reason"]) == ("closed", "filled"), bid
            assert filled(client, buyer, bid["order_id"])["close_reason"] == "filled"
            assert filled(client, seller, ask["order_id"])["close_reason"] == "filled"
            dashboard = client.get("/ops/dramatiq/", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert dashboard.status_code == 200
            for queue in ("matching.0", "matching.1", "webhooks"):
                assert f"/ops/dramatiq/queues/{queue}" in dashboard.text
        pids = run_pids(dev, state_dir)
        assert len(pids) >= 5  # api master + worker, matcher, webhooks, sweeper, servers
    finally:
        if dev.poll() is None:
            # Twice, as a process-group kill under `uv run` delivers it (the group's and uv's forwarded copy): a
            # supervisor whose handler took a lock hung on the second one with every child still serving.
            dev.send_signal(signal.SIGTERM)
            dev.send_signal(signal.SIGTERM)
        try:
            code = dev.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            pytest.fail(f"exchange dev did not stop within 60 s of SIGTERM:\n{log.read_text()[-4000:]}")
    assert code == 0, log.read_text()[-4000:]
    left = still_alive_after(pids, 10)
    assert not left, f"processes left after exchange dev stopped: {[psutil.Process(p).cmdline() for p in left]}"
    with pytest.raises(ProcessLookupError):
        os.killpg(dev.pid, 0)


def test_exchange_dev_killed_outright_takes_its_children_with_it(tmp_path: Path, fresh_database_url: str) -> None:
    """SIGKILL (or the OOM killer) gives dev no chance to stop anything: its children must still not live on as
    orphans taking matching work from Redis and the database."""
    if SETPRIV is None:
        pytest.skip("no setpriv with --pdeathsig (util-linux 2.33+, Linux)")
    port, state_dir, log = free_port(), tmp_path / "state", tmp_path / "dev.log"
    with claimed_database() as redis_url:
        services = {"EXCHANGE_DATABASE_URL": fresh_database_url, "EXCHANGE_REDIS_URL": redis_url}
        dev = start_dev(tmp_path, port, state_dir, log, **services)
        children: set[int] = set()
        try:
            wait_ready(f"http://127.0.0.1:{port}", dev, log)
            children = {p.pid for p in psutil.Process(dev.pid).children(recursive=True)}
            assert len(children) >= 5  # api master + worker, matcher, webhooks, sweeper
            dev.kill()
            dev.wait(10)
            left = still_alive_after(children, 30)
            assert not left, f"orphans of a killed exchange dev: {[psutil.Process(p).cmdline() for p in left]}"
        finally:
            for pid in {dev.pid} | children:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            stop_pgbouncer(state_dir / "pgbouncer")  # its stand-in directory, which only dev's own stop removes


def _children(dev: subprocess.Popen[bytes], name: str) -> list[psutil.Process]:
    """dev's running children whose command line names ``name`` (through setpriv, the child is the program itself:
    setpriv execs it)."""
    found = []
    for child in psutil.Process(dev.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if name in {Path(arg).name for arg in child.cmdline()} and alive(child.pid):
                found.append(child)
    return found


def _restarted(dev: subprocess.Popen[bytes], name: str, killed: psutil.Process) -> psutil.Process | None:
    """The child named ``name`` that replaced ``killed``, once dev started it (None after 5 s)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if found := next((p for p in _children(dev, name) if p.pid != killed.pid), None):
            return found
        time.sleep(0.01)
    return None


@dataclass(frozen=True)
class DevRun:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path


@contextlib.contextmanager
def ready_dev(tmp_path: Path, database_url: str, **env_extra: str) -> Iterator[DevRun]:
    """``exchange dev`` on ``database_url`` and a claimed Redis database (and ``env_extra``), ready; stopped
    (SIGTERM, then SIGKILL after 60 s) afterwards, with its pgbouncer's stand-in directory."""
    port, state_dir, log = free_port(), tmp_path / "state", tmp_path / "dev.log"
    with claimed_database() as redis_url:
        services = {"EXCHANGE_DATABASE_URL": database_url, "EXCHANGE_REDIS_URL": redis_url, **env_extra}
        dev = start_dev(tmp_path, port, state_dir, log, **services)
        try:
            wait_ready(f"http://127.0.0.1:{port}", dev, log)
            yield DevRun(dev, f"http://127.0.0.1:{port}", log)
        finally:
            if dev.poll() is None:
                dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
            stop_pgbouncer(state_dir / "pgbouncer")


def test_exchange_dev_restarts_a_killed_child_after_a_100_ms_pause(tmp_path: Path, fresh_database_url: str) -> None:
    with ready_dev(tmp_path, fresh_database_url) as dev:
        (sweeper,) = _children(dev.process, "sweeper")
        os.killpg(sweeper.pid, signal.SIGKILL)
        assert _restarted(dev.process, "sweeper", sweeper) is not None, dev.log.read_text()[-4000:]
        assert "dev: sweeper exited with -9; restarting in 0.1s" in dev.log.read_text()


def test_exchange_dev_restarts_a_killed_pgbouncer_and_accepts_orders_again(
    tmp_path: Path, fresh_database_url: str
) -> None:
    with ready_dev(tmp_path, fresh_database_url) as dev, httpx.Client(base_url=dev.base_url, timeout=10) as client:
        key = register(client, "broker")
        (pgbouncer,) = _children(dev.process, "pgbouncer")
        os.killpg(pgbouncer.pid, signal.SIGKILL)
        assert _restarted(dev.process, "pgbouncer", pgbouncer) is not None, dev.log.read_text()[-4000:]
        assert "dev: pgbouncer exited with -9; restarting in 0.1s" in dev.log.read_text()
        # The api's pool drops the connections pgbouncer's death broke: until it has new ones, a request may be
        # answered 503, never 500, and an order is accepted again within seconds.
        body = {"document_number": "12345678900", "side": "bid", "order_type": "limit", "symbol": "PETR4"}
        body |= {"price": 3850, "quantity": 100}
        statuses: list[int] = []
        deadline = time.monotonic() + 15
        while (not statuses or statuses[-1] != 201) and time.monotonic() < deadline:
            response = client.post("/orders", json=body, headers={"Authorization": f"Bearer {key}"})
            statuses.append(response.status_code)
            if response.status_code != 201:
                time.sleep(0.1)
        assert statuses[-1] == 201, (statuses, dev.log.read_text()[-4000:])
        assert set(statuses) <= {201, 503}, statuses


def test_exchange_dev_hands_its_children_the_configured_pooled_url_and_starts_no_pgbouncer(
    tmp_path: Path, fresh_database_url: str
) -> None:
    # It was ignored: the children got dev's own pgbouncer (or the direct URL) whatever the operator configured.
    pooled = f"{fresh_database_url}{'&' if '?' in fresh_database_url else '?'}application_name=operator-pool"
    with ready_dev(tmp_path, fresh_database_url, EXCHANGE_POOLED_DATABASE_URL=pooled) as dev:
        with httpx.Client(base_url=dev.base_url, timeout=30) as client:
            seller, buyer = register(client, "seller"), register(client, "buyer")
            place(client, seller, "ask")
            assert place(client, buyer, "bid")["status"] == "closed"
        assert _children(dev.process, "pgbouncer") == []
        assert f"  database   {pooled}\n" in dev.log.read_text()
        assert "no pgbouncer of dev's own" in dev.log.read_text()


def _events(database_url: str, broker: str) -> list[tuple[str, str, int]]:
    """``(id, status, attempts)`` of every webhook event of the broker named ``broker``."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT e.id::text, e.status, e.attempts FROM webhook_events e JOIN brokers b ON b.id = e.broker_id"
            " WHERE b.name = %s ORDER BY e.sequence",
            (broker,),
        ).fetchall()
    return [(str(id_), str(status), int(attempts)) for id_, status, attempts in rows]


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout_s:g}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def test_ctrl_c_while_a_webhook_is_in_flight_records_it_delivered_once(tmp_path: Path, fresh_database_url: str) -> None:
    # dev signalled each child's whole process group: dramatiq's worker process got SIGTERM from dev and again from
    # its master, and exits at once on a second one ("Killing worker process"), so the delivery in flight was cut
    # (broken pipe), never recorded, and sent again after the next start (attempts=2). (Two SIGTERMs arriving before
    # the worker's handler ran count as one, so without the fix this failed 3 runs in 4, not always: the unit test
    # test_stopping_a_child_sends_sigterm_to_its_leader_alone_so_its_workers_get_it_once is the deterministic one.)
    with Receiver() as receiver, ready_dev(tmp_path, fresh_database_url) as dev:
        with httpx.Client(base_url=dev.base_url, timeout=30) as client:
            response = client.post(
                "/register",
                json={"name": "hooked", "webhook_url": receiver.url},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            assert response.status_code == 201, response.text
            hooked, other = response.json()["api_key"], register(client, "other")
            receiver.hang()  # every delivery is held open until released
            place(client, hooked, "bid")
            place(client, other, "ask")
        _wait_for(
            lambda: (events := _events(fresh_database_url, "hooked")) != [] and all(a == 1 for _, _, a in events),
            30,
            "every event of the hooked broker claimed (in flight)",
            dev.log,
        )
        dev.process.send_signal(signal.SIGINT)  # Ctrl-C
        _wait_for(
            lambda: any(
                line.startswith("[webhooks]") and "Stopping worker process" in line
                for line in dev.log.read_text().splitlines()
            ),
            30,
            "the webhook worker process stopping",
            dev.log,
        )
        receiver.release()  # the receiver answers only now, while the worker stops
        try:
            code = dev.process.wait(90)  # the webhook worker's grace is 60 s; this one drains in about a second
        except subprocess.TimeoutExpired:
            pytest.fail(f"exchange dev did not stop:\n{dev.log.read_text()[-4000:]}")
        assert code == 0, dev.log.read_text()[-4000:]

    events = _events(fresh_database_url, "hooked")
    assert events
    assert {(status, attempts) for _, status, attempts in events} == {("delivered", 1)}, dev.log.read_text()[-4000:]
    sent = [body["event_id"] for body in receiver.bodies()]
    assert sorted(sent) == sorted(id_ for id_, _, _ in events)  # each once

"""``exchange dev``'s supervision of its children, with real processes: a dead child's workers do not outlive it,
each child waits out only its own restart delay, a taken port is refused before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from exchange.config import Settings
from exchange.dev import (
    Child,
    StopRequest,
    _spawn,
    _stop,
    holding_state_dir,
    port_in_use,
    run_dev,
    watch,
    webhooks_stop_grace_s,
)
from tests.serving import wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status != "Z"


@contextmanager
def _watching(children: list[Child]) -> Iterator[None]:
    stopping = StopRequest()
    thread = threading.Thread(target=watch, args=(children, dict(os.environ), stopping), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.requested = True
        thread.join(5)
        _stop(children, grace_s=2)


def _leaves_a_worker(pidfile: Path) -> Child:
    """A child whose leader forks a long-lived worker (its pid written to ``pidfile``), then dies."""
    return Child("leader", ["sh", "-c", f'sleep 30 & echo $! > "{pidfile}"; sleep 0.2; exit 3'])


def test_a_dead_childs_worker_is_killed_before_the_child_is_started_again(tmp_path: Path) -> None:
    pidfile = tmp_path / "worker.pid"
    child = _leaves_a_worker(pidfile)
    _spawn(child, dict(os.environ))
    wait_until(pidfile.exists)
    wait_until(lambda: pidfile.read_text().strip() != "")
    worker = int(pidfile.read_text())
    first = child.process

    with _watching([child]):
        wait_until(lambda: child.process is not first)

        wait_until(lambda: not _alive(worker), timeout=1)  # an orphaned gunicorn worker kept the api's port


def test_stopping_kills_the_workers_a_dead_leader_left(tmp_path: Path) -> None:
    pidfile = tmp_path / "worker.pid"
    child = _leaves_a_worker(pidfile)
    _spawn(child, dict(os.environ))
    assert child.process is not None
    child.process.wait(5)
    worker = int(pidfile.read_text())
    assert _alive(worker)

    _stop([child], grace_s=2)

    wait_until(lambda: not _alive(worker), timeout=1)


FORWARDING_LEADER = """
import os, signal, sys, time
signals = sys.argv[1]
worker = os.fork()
if worker == 0:  # a dramatiq worker process: it counts the SIGTERMs it gets, and stops a little after the first
    got = []
    def count(signum, frame):
        got.append(signum)
        with open(signals, "a") as out:
            out.write("TERM\\n")
    signal.signal(signal.SIGTERM, count)
    open(signals + ".ready", "w").close()
    while not got:
        time.sleep(0.01)
    time.sleep(0.3)  # draining: a second SIGTERM now would kill it (dramatiq's "Killing worker process")
    os._exit(0)
def forward(signum, frame):  # as dramatiq's master does, a moment later (it logs first): never at the same instant
    time.sleep(0.1)
    os.kill(worker, signal.SIGTERM)
signal.signal(signal.SIGTERM, forward)
while True:
    try:
        os.waitpid(worker, 0)
        break
    except InterruptedError:
        pass
"""


def test_stopping_a_child_sends_sigterm_to_its_leader_alone_so_its_workers_get_it_once(tmp_path: Path) -> None:
    signals = tmp_path / "signals"
    child = Child("forwarding", [sys.executable, "-c", FORWARDING_LEADER, str(signals)])
    _spawn(child, dict(os.environ))
    wait_until(lambda: Path(f"{signals}.ready").exists())

    _stop([child], grace_s=10)

    assert signals.read_text().splitlines() == ["TERM"]  # before: twice, the group's and the master's


def test_a_child_that_ignores_sigterm_is_killed_after_its_own_grace_and_the_others_stop_meanwhile(
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    stubborn = Child("stubborn", ["sh", "-c", f"trap '' TERM; touch {ready}; while :; do sleep 0.05; done"])
    stubborn.stop_grace_s = 0.5
    quick = Child("quick", ["sleep", "30"])  # the default grace (10 s), unused: it stops at once
    for child in (stubborn, quick):
        _spawn(child, dict(os.environ))
    wait_until(ready.exists)

    _stop([stubborn, quick])

    assert stubborn.process is not None
    assert stubborn.process.returncode == -signal.SIGKILL
    assert quick.process is not None
    assert quick.process.returncode == -signal.SIGTERM


def test_webhooks_get_compose_files_grace_or_more_when_their_timeouts_make_the_drain_longer() -> None:
    assert webhooks_stop_grace_s(Settings.from_env({})) == 60.0  # compose.yaml's stop_grace_period
    slow = Settings.from_env({"EXCHANGE_WEBHOOK_READ_TIMEOUT_MS": "120000", "EXCHANGE_WEBHOOK_LEASE_MS": "180000"})
    assert webhooks_stop_grace_s(slow) > 120


def test_one_childs_long_restart_delay_does_not_hold_up_another_childs_restart() -> None:
    backing_off = Child("backing-off", ["sh", "-c", "exit 1"])
    other = Child("other", ["sh", "-c", "sleep 0.3; exit 1"])
    _spawn(backing_off, dict(os.environ))
    backing_off.restart_delay_s = 6.4  # died soon after each of its last starts: its next delay is 10 s
    _spawn(other, dict(os.environ))
    first = other.process

    with _watching([backing_off, other]):
        started = time.monotonic()
        wait_until(lambda: other.process is not first, timeout=3)

        assert time.monotonic() - started < 2
        assert backing_off.restart_at is not None
        assert backing_off.restart_at - time.monotonic() > 5


def test_a_port_something_listens_on_is_in_use_and_a_free_one_is_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening:
        taken = listening.getsockname()[1]
        assert port_in_use(taken)
    assert not port_in_use(taken)


def test_a_second_exchange_dev_on_the_same_state_dir_is_refused_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with holding_state_dir(tmp_path):
        code = run_dev(Settings.from_env({}), port=1, matchers=1, api_workers=1, pgbouncer_port=1, state_dir=tmp_path)

    assert code == 1
    assert f"another exchange dev (pid {os.getpid()}) runs with state dir {tmp_path}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.lock"]  # no embedded server was started


def test_the_state_dir_is_free_again_once_its_run_ends(tmp_path: Path) -> None:
    with holding_state_dir(tmp_path):
        pass
    with holding_state_dir(tmp_path):
        pass


def test_a_pooled_url_without_a_database_url_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The children would use that pooled database while dev migrated an embedded one.
    monkeypatch.chdir(tmp_path)  # no developer's .env
    for name in ("EXCHANGE_DATABASE_URL", "EXCHANGE_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EXCHANGE_POOLED_DATABASE_URL", "postgresql://postgres@127.0.0.1:6432/elsewhere")
    state_dir = tmp_path / "state"

    code = run_dev(Settings.from_env({}), port=1, matchers=1, api_workers=1, pgbouncer_port=1, state_dir=state_dir)

    assert code == 2
    assert "EXCHANGE_POOLED_DATABASE_URL is set but EXCHANGE_DATABASE_URL is not" in capsys.readouterr().err
    assert not state_dir.exists()  # no embedded server was started

"""A database host that goes silent under the pools' connections (a half-open connection: the host lost, a network
cut) fails the statement sent on it within :data:`exchange.db.engines.DEAD_PEER_S` and a probe, instead of the
kernel's ~15 minutes (or for ever, for a statement it had taken), and the pools replace the connection; so does
pgbouncer for its own server connections (``ops/pgbouncer.ini``); and the api's result subscriber gives up a silent
Redis as soon.

The silence is real: ``dead_peer_probe`` runs in a network namespace of its own (``unshare -n``, which needs root,
as CI has: skipped without it, failed in CI) and takes its loopback down under both pools' warm connections; the
packets are dropped and no end learns of it from the other. Without the pools' keepalive and ``tcp_user_timeout``
options the statements wait out the subprocess's timeout and the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from exchange.db.engines import DEAD_PEER_S
from exchange.db.urls import libpq_url
from tests.conftest import DatabaseFactory, skip_or_fail

REPO = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT_S = DEAD_PEER_S * 15 + 30
"""The probe's five silences take about 70 s; without the options, any of them waits until this."""


def _namespaces_allowed() -> bool:
    unshare = shutil.which("unshare")
    return unshare is not None and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0


def _unix_socket(database_url: str) -> str | None:
    """The server's own unix socket, which a process in another network namespace still reaches."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        directories, port = conn.execute(
            "SELECT current_setting('unix_socket_directories'), current_setting('port')"
        ).fetchone() or ("", "")
    for directory in str(directories).split(","):
        path = Path(directory.strip()) / f".s.PGSQL.{port}"
        if directory.strip() and path.is_socket():
            return str(path)
    return None


@pytest.fixture(scope="module")
def dead_peer_outcome(database_factory: DatabaseFactory) -> Iterator[dict[str, Any]]:
    """One probe for the module's tests (about 70 s)."""
    if not _namespaces_allowed():
        skip_or_fail("needs a network namespace of its own (unshare -n: root or CAP_SYS_ADMIN)")
    database_url = database_factory.create()
    try:
        yield _probe(database_url)
    finally:
        database_factory.drop(database_url)


def _probe(database_url: str) -> dict[str, Any]:
    unix_path = _unix_socket(database_url)
    if unix_path is None:
        pytest.skip("the test PostgreSQL has no unix socket to forward to")
    parts = urlsplit(database_url)
    probe = subprocess.Popen(
        ["unshare", "-n", sys.executable, "-m", "tests.integration.dead_peer_probe", unix_path,
         parts.path.lstrip("/"), parts.username or "postgres"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        stdout, stderr = probe.communicate(timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(probe.pid, signal.SIGKILL)  # the probe and its redis-server: the namespace goes with them
        probe.communicate()
        raise
    assert probe.returncode == 0, stderr[-2000:]
    outcome: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return outcome


SILENCES = {
    "unacknowledged": "timed out",
    "unanswered": "timed out",
    "behind_pgbouncer_unacknowledged": "server conn crashed",
    "behind_pgbouncer_unanswered": "server conn crashed",
}
"""Each silence, and what the statement fails with. A statement sent after the host went silent is never
acknowledged (``tcp_user_timeout`` gives up); one taken before is never answered (the keepalive probes give up).
Behind pgbouncer only pgbouncer's server connections go silent (its clients reach it over a unix socket): its own
``ops/pgbouncer.ini`` bounds give up, and it tells its client the server connection crashed."""


@dataclass(frozen=True)
class Silenced:
    """One pool's statement in one silence: what it raised and which backends the pool used around it."""

    silence: str
    path: str
    outcome: dict[str, Any]

    @property
    def seen(self) -> dict[str, Any]:
        seen: dict[str, Any] = self.outcome[self.path]
        return seen


@pytest.fixture(params=[(silence, path) for silence in SILENCES for path in ("engine", "api_pool")], ids="-".join)
def silenced(request: pytest.FixtureRequest, dead_peer_outcome: dict[str, Any]) -> Silenced:
    silence, path = request.param
    if silence not in dead_peer_outcome:
        skip_or_fail(f"no {silence} here: pgbouncer is not installed")
    return Silenced(silence, path, dead_peer_outcome[silence])


def test_a_statement_to_a_silent_database_host_fails_within_the_dead_peer_limit(silenced: Silenced) -> None:
    # an unanswered silence is the keepalive path only if the forwarder had taken both statements before it began
    assert "unanswered" not in silenced.silence or silenced.outcome["taken"], silenced.outcome
    seen = silenced.seen
    assert seen["error"] is not None, seen
    assert SILENCES[silenced.silence] in seen["message"], seen
    # the kernel gives up after DEAD_PEER_S (and one unanswered probe); its own default is ~15 minutes, or never
    assert seen["waited_s"] < DEAD_PEER_S * 2, seen


def test_the_pool_replaces_a_connection_to_a_silent_host_once_the_network_is_back(silenced: Silenced) -> None:
    assert silenced.outcome["after"][silenced.path] != silenced.outcome["before"][silenced.path]


def test_the_result_subscriber_gives_up_a_silent_redis_within_the_dead_peer_limit(
    dead_peer_outcome: dict[str, Any],
) -> None:
    """Idle between results, it would otherwise wait for Linux's two hours of keepalive, readiness saying
    ``results`` all the while and every new order answered ``pending``; once it gives up, it reconnects."""
    seen = dead_peer_outcome["result_subscriber"]
    if "skipped" in seen:
        pytest.skip(seen["skipped"])
    assert seen["subscribed_before"], seen
    assert not seen["subscribed_after"], seen
    assert seen["waited_s"] < DEAD_PEER_S * 2, seen

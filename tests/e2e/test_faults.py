"""Fault injection under steady load (issue 6, Build 4): every process and both servers fail in turn, nothing is lost.

One private exchange runs on its OWN PostgreSQL cluster and Redis server (:mod:`tests.e2e.private_services`:
the machine's shared servers are never restarted). A background thread posts orders (and some cancels) across 20
symbols at crossing prices for four brokers whose webhooks go to a real receiver, retrying every error or timeout
with the same ``client_order_id`` as a broker would. Meanwhile the module's scenario injects, in turn:

1. SIGKILL of one api gunicorn worker (gunicorn replaces it), and SIGSTOP of one for 4 s (the other serves);
2. SIGKILL of one matcher (restarted after 100 ms, as ``exchange dev`` and Docker would), then again beside a hot
   standby on the same partitions, and SIGSTOP of it for 4 s beside the standby (a hung process, not a dead one);
3. SIGKILL of the webhooks worker (restarted);
4. SIGKILL of the sweeper (restarted);
5. SIGKILL of pgbouncer (restarted on the same port after 100 ms): every client and server connection of the
   pool drops at once, mid-transaction or mid-commit;
6. a Redis restart (SIGTERM, down ~2 s, started again on the same port and append-only file);
7. a Redis crash that loses its data (SIGKILL, append-only file deleted, started empty after 100 ms): every queued
   message, wake-up and partition flag is gone, and PostgreSQL alone must bring every command and event through;
8. Redis out of memory for ~2 s (``maxmemory`` under what it holds, ``noeviction``): it refuses every write — the
   api's wake-ups, the matchers' after-commit scripts and acknowledgements, the webhook hints, the sweeper's
   re-nudges — while it still answers reads and ``PUBLISH``; orders must still be accepted (PostgreSQL takes them)
   and everything must go through once it has room again;
9. a PostgreSQL restart (``pg_ctl stop -m fast``, down ~3 s, ``start``): no exchange process is touched;
10. PostgreSQL's disk full for 3 s or more (:meth:`~tests.e2e.private_services.PowerLossMount.fill`): no table or index
    can grow, so every statement that needs a new page fails (``53100 disk_full``) — the api's accepts, the
    matchers' batches, the webhook records — while reads and writes into pages already there go on; the api must
    answer 503, never 500, the matchers must retry rather than reject a command, and all must go through once
    there is room, with no process restarted;
11. a power loss under PostgreSQL: its cluster runs with ``fsync = on`` on a filesystem that keeps, at a power cut,
    only what was synced (:class:`~tests.e2e.private_services.PowerLossPostgres`). With every other writer of the
    exchange stopped (SIGSTOP of the matchers, the webhooks worker and the sweeper), so that the api's statements are
    the only commits, its WAL writer is stopped too under the load (WAL_WRITER_STOPPED_S; a probe places orders,
    amends one and cancels one meanwhile); then the power goes: the disk loses everything unsynced and every process
    of the cluster dies at once, and the start replays the write-ahead log the disk kept. Every order answered 2xx,
    every fill and every event a broker received must have been durably committed before it was answered or sent,
    so none may be missing or changed after the replay. In the spell no process syncs a commit's WAL promptly but the
    committing session itself (a synchronous commit syncs the WAL up to its own record; the WAL writer syncs an
    asynchronous one's later; the background writer, the checkpointer or a full WAL buffer may sync some, which can
    only hide a lost answer): an api answer sent before its own commit's WAL was on the disk
    (``synchronous_commit = off``, or a commit that reached the kernel's cache only) is a write the replay does not
    know, and the tests of the spell's orders, cancels and amends fail.

After each fault it waits for one probe order per partition to be matched (the pipeline works again), then keeps
the load steady for a few seconds. Then the load stops, the exchange drains, and the tests below each check one
behaviour on the recorded run, in SQL and over HTTP. The matcher failover time (kill → first command on its
partitions processed by a live matcher, from the database's ``processed_at``) and the fault timeline are printed, never
asserted.

``FAULTS_SOAK_SECONDS=N`` (for humans, default off) repeats the fault cycle until N seconds have passed, with longer
steady spells in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exchange.db import migrate
from exchange.dev import FIRST_RESTART_DELAY_S
from exchange.messaging.partitions import partition_of
from exchange.orders.accept import amend_payload
from tests.conftest import in_ci, skip_or_fail
from tests.e2e.conftest import (
    PARTITIONS,
    Broker,
    Harness,
    free_port,
    require_services,
    unique_symbol,
)
from tests.e2e.private_services import (
    PowerLossPostgres,
    PrivatePostgres,
    PrivateRedis,
    child_pids,
    power_loss_missing,
    private_services_missing,
)
from tests.invariants import check_invariants
from tests.webhook_receiver import Receiver

SOAK_SECONDS = float(os.environ.get("FAULTS_SOAK_SECONDS", "0") or 0)
STEADY_S = 10.0 if SOAK_SECONDS else 2.5
"""Steady load after each fault has recovered (and before the first)."""
RESTART_DELAY_S = FIRST_RESTART_DELAY_S
"""What a supervisor waits before restarting a dead process (``exchange dev`` and Docker: 100 ms)."""
REDIS_DOWN_S = 2.0
REDIS_FULL_S = 2.0
DISK_FULL_S = 3.0
DISK_FULL_MAX_S = 15.0
"""The disk stays full DISK_FULL_S, and longer until a request was answered 503 for it, up to this: statements that
fit in pages already there (free space that vacuum found) succeed, and in one spell of a soak only 4 of the load's
orders needed a new page in 3 s."""
FREEZE_S = 4.0
"""How long a matcher stays stopped (SIGSTOP): longer than the database lets it hold its books idle."""
POSTGRES_DOWN_S = 3.0
WAL_WRITER_STOPPED_S = 1.0
"""How long the load runs with PostgreSQL's WAL writer stopped before the power loss (at least: the probe's orders,
amend and cancel are answered in it too)."""
RECOVERY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 90.0

BROKERS = 4
SYMBOLS_PER_PARTITION = 5
LOAD_TASKS = 6
PACE_S = 0.03
"""Pause between two requests of one load task: ~150 requests/s in all, leaving CPU for restarts."""
CANCEL_SHARE = 0.15
AMEND_SHARE = 0.1
"""Of the requests that do not cancel: amends lock the order's row and write a command in one statement, which
every fault may cut."""
AMEND_ANSWERS = frozenset({200, 409, 422})
"""Applied; refused by the matcher (`amend_rejected`) or the order closed meanwhile (`order_closed`); a price for a
market order."""
REQUEST_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 0.2
GIVE_UP_AFTER_S = 90.0
MATCHER_KILLED = "matcher-a"
MATCHER_KILLED_PARTITIONS = "0-1"
STANDBY = "matcher-a-standby"
HTTP_CHECK_SAMPLE = 400


# ------------------------------------------------------------------------------------------------ load


@dataclass(frozen=True)
class Call:
    at: float
    """time.monotonic() when the answer (or the transport error) came."""
    op: str
    status: int | None
    error: str | None = None


@dataclass(frozen=True)
class Accepted:
    broker: int
    order_id: str
    client_order_id: str
    status: str
    """As the 201 answered it."""
    answered_at: float
    """time.monotonic() just after the 201 came."""


@dataclass(frozen=True)
class Change:
    answered_at: float
    """time.monotonic() just after the answer came."""
    kind: str
    """``cancel`` (answered 204) or ``amend`` (answered 200)."""
    order_id: str
    amend: dict[str, int] | None = None
    """The amend's body: a new ``quantity`` or ``price``."""

    @property
    def command_payload(self) -> dict[str, int | None]:
        """The amend command's payload as the api writes it."""
        assert self.amend is not None
        return amend_payload(self.amend.get("quantity"), self.amend.get("price"))


class Load:
    """Posts orders and cancels from a background thread until :meth:`stop`; every call is recorded."""

    def __init__(self, base_url: str, brokers: list[Broker], symbols: list[str], seed: int = 20240611) -> None:
        self.base_url = base_url
        self.brokers = brokers
        self.symbols = symbols
        self.seed = seed
        self.calls: list[Call] = []
        self.accepted: dict[str, Accepted] = {}
        self.rejected: list[str] = []
        self.gave_up: list[str] = []
        self.expired_before_accepted = 0
        self.placed_states: list[tuple[float, str]] = []
        self.amended: Counter[int] = Counter()
        """The final answer of every amend, by status."""
        self.changes: list[Change] = []
        """Every cancel answered 204 and amend answered 200."""
        self._mine: list[list[str]] = [[] for _ in brokers]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="fault-load", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = GIVE_UP_AFTER_S + 30) -> None:
        self._stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the load thread did not stop"

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=LOAD_TASKS * 2)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
            await asyncio.gather(*(self._task(client, n) for n in range(LOAD_TASKS)))

    def _order(self, rng: random.Random, n: int, i: int) -> dict[str, Any]:
        side = rng.choice(["bid", "ask"])
        body: dict[str, Any] = {
            "document_number": f"{rng.randint(1, 3):011d}",
            "side": side,
            "symbol": rng.choice(self.symbols),
            "quantity": rng.randint(1, 5),
            "client_order_id": f"f{n}-{i}-{uuid.uuid4().hex[:10]}",
        }
        if rng.random() < 0.05:
            body["order_type"] = "market"
            return body
        body["order_type"] = "limit"
        # Bids 98..104 over asks 96..102: most orders cross something.
        body["price"] = rng.randint(98, 104) if side == "bid" else rng.randint(96, 102)
        if rng.random() < 0.1:  # good-till-date orders that expire while the faults go on
            body["valid_until"] = (datetime.now(UTC) + timedelta(seconds=rng.uniform(1, 6))).isoformat()
        return body

    async def _task(self, client: httpx.AsyncClient, n: int) -> None:
        rng = random.Random(self.seed + n)
        i = 0
        while not self._stop.is_set():
            await asyncio.sleep(PACE_S)
            b = rng.randrange(len(self.brokers))
            broker = self.brokers[b]
            mine = self._mine[b]
            if mine and rng.random() < CANCEL_SHARE:
                order_id = mine.pop(rng.randrange(len(mine)))
                answer = await self._send(client, "cancel", broker, f"/orders/{order_id}/cancel", None)
                if answer is not None and answer.status_code == 204:
                    self.changes.append(Change(time.monotonic(), "cancel", order_id))
                continue
            if mine and rng.random() < AMEND_SHARE:
                # A new total quantity or limit price: the same amend sent twice (a retry) sets the same values.
                change = {"quantity": rng.randint(1, 6)} if rng.random() < 0.5 else {"price": rng.randint(96, 104)}
                order_id = rng.choice(mine)
                answer = await self._send(client, "amend", broker, f"/orders/{order_id}", change, "PATCH")
                if answer is None:
                    self.gave_up.append(f"PATCH /orders/{order_id}")
                else:
                    self.amended[answer.status_code] += 1
                    if answer.status_code == 200:
                        self.changes.append(Change(time.monotonic(), "amend", order_id, change))
                    if answer.status_code == 409 and order_id in mine:  # another task may have taken it meanwhile
                        mine.remove(order_id)  # amend (and cancel) the orders still open
                continue
            i += 1
            body = self._order(rng, n, i)
            response = await self._send(client, "place", broker, "/orders", body)
            if response is None:
                self.gave_up.append(body["client_order_id"])
            elif response.status_code == 201:
                data = response.json()
                answered_at = time.monotonic()
                self.accepted[body["client_order_id"]] = Accepted(
                    b, data["order_id"], body["client_order_id"], data["status"], answered_at
                )
                self.placed_states.append((answered_at, data["status"]))
                if data["status"] != "closed":
                    mine.append(data["order_id"])
            elif "valid_until" in body and response.status_code == 422 and "valid_until" in response.text:
                self.expired_before_accepted += 1  # retried past its own valid_until: rightly refused
            else:
                self.rejected.append(f"{body['client_order_id']}: {response.status_code} {response.text}")

    async def _send(
        self,
        client: httpx.AsyncClient,
        op: str,
        broker: Broker,
        path: str,
        body: dict[str, Any] | None,
        method: str = "POST",
    ) -> httpx.Response | None:
        """Send until a non-5xx answer, retrying the SAME request on transport errors, timeouts and 5xx."""
        deadline = time.monotonic() + GIVE_UP_AFTER_S
        while True:
            try:
                response = await client.request(method, path, json=body, headers=broker.headers)
            except httpx.HTTPError as exc:
                self.calls.append(Call(time.monotonic(), op, None, type(exc).__name__))
            else:
                self.calls.append(Call(time.monotonic(), op, response.status_code))
                if response.status_code < 500:
                    return response
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(RETRY_PAUSE_S)


# ------------------------------------------------------------------------------------------------ record


@dataclass
class Fault:
    name: str
    injected_at: float
    recovered_after_s: float | None = None
    """Injection → one probe order per partition matched again (None: never within RECOVERY_TIMEOUT_S)."""
    note: str = ""


@dataclass
class PostgresOutage:
    down_at: float = 0.0
    up_at: float = 0.0
    probes: list[Call] = field(default_factory=list)
    starts_before: dict[str, int] = field(default_factory=dict)
    starts_after: dict[str, int] = field(default_factory=dict)
    dead_after: list[str] = field(default_factory=list)
    first_201_after_s: float | None = None
    """pg_ctl start returned → first POST /orders answered 201."""


@dataclass
class UnsyncedWalSpell:
    """The spell before a power loss in which PostgreSQL's WAL writer was stopped."""

    stopped_at: float
    stopped_wall: float
    """time.time() at the spell's start: nothing of the exchange but the api wrote from then on."""
    power_lost_at: float
    """Just before the power loss: every answer recorded by then came before it."""
    probe_orders: list[str]
    """Probe orders answered 201 in the spell."""
    probe_changes: list[Change]
    """The probe's amend (answered 200) and cancel (answered 204) of its orders in the spell."""
    probe_answers: dict[str, int | None]
    """The status each of the probe's changes was answered with (None: no answer)."""

    def load_orders(self, load: Load) -> list[str]:
        """The load's orders answered 201 in the spell."""
        return [a.order_id for a in load.accepted.values() if self.stopped_at <= a.answered_at <= self.power_lost_at]

    def changes(self, load: Load) -> list[Change]:
        """The cancels and amends acknowledged in the spell: the probe's, then the load's."""
        return self.probe_changes + [c for c in load.changes if self.stopped_at <= c.answered_at <= self.power_lost_at]


@dataclass
class RedisFull:
    """A spell in which Redis refused every write for want of memory."""

    started_at: float
    ended_at: float
    refused: int
    """Commands Redis rejected or failed in the spell (:meth:`PrivateRedis.refused_commands`)."""


@dataclass
class DiskFull:
    """A spell in which PostgreSQL's disk was full."""

    started_at: float
    ended_at: float
    refused: int
    """Writes and truncations the disk refused (``ENOSPC``) in the spell."""
    starts_before: dict[str, int]
    checkpointer_before: int
    """PostgreSQL's checkpointer: another one after the spell means PostgreSQL crashed and restarted (a PANIC)."""
    starts_after: dict[str, int] = field(default_factory=dict)
    """Each exchange process's start count once the pipeline worked again."""
    dead_after: list[str] = field(default_factory=list)
    checkpointer_after: int | None = None
    counted_by_the_api: float = 0.0
    """How much the api's ``exchange_database_errors_total{sqlstate="53100"}`` grew in the spell (what an operator
    sees)."""


@dataclass
class FaultRun:
    harness: Harness
    receiver: Receiver
    load: Load
    brokers: list[Broker]
    symbols: list[str]
    faults: list[Fault] = field(default_factory=list)
    outages: list[PostgresOutage] = field(default_factory=list)
    unsynced_wal: list[UnsyncedWalSpell] = field(default_factory=list)
    redis_full: list[RedisFull] = field(default_factory=list)
    disk_full: list[DiskFull] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)
    frozen_matching_after_s: list[float | None] = field(default_factory=list)
    """SIGSTOP of a matcher beside its hot standby → a new order on every partition matched (None: never)."""
    after_recovery: list[Callable[[], None]] = field(default_factory=list)
    api_workers_replaced: list[bool] = field(default_factory=list)
    api_frozen_matching_after_s: list[float | None] = field(default_factory=list)
    """SIGSTOP of an api worker → a new order on every partition accepted by another worker and matched."""
    probe_accepted: list[tuple[Broker, str]] = field(default_factory=list)
    drained: bool = False
    webhooks_settled: bool = False
    elapsed_s: float = 0.0

    def calls_between(self, start: float, end: float) -> list[Call]:
        return [c for c in self.load.calls if start <= c.at <= end]


# ------------------------------------------------------------------------------------------------ helpers


def _poll(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Like conftest.wait_until, but returns None on timeout instead of failing (the tests judge the record)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (httpx.HTTPError, psycopg.Error):
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


class Prober:
    """One resting probe order per partition (price 1: never trades), each on a symbol of its own."""

    def __init__(self, harness: Harness, broker: Broker, *, fresh_connections: bool = False) -> None:
        self.harness = harness
        self.broker = broker
        self.symbols = [unique_symbol("P", {n}) for n in range(PARTITIONS)]
        # A connection of its own per request goes to a worker that accepts it: not one kept alive with a stopped one.
        limits = httpx.Limits(max_keepalive_connections=0) if fresh_connections else httpx.Limits()
        timeout = 1.0 if fresh_connections else REQUEST_TIMEOUT_S
        self.client = httpx.Client(base_url=harness.base_url, timeout=timeout, headers=broker.headers, limits=limits)
        self.accepted: list[str] = []

    def place(self, symbol: str) -> str | None:
        body = {"document_number": "00000000001", "side": "bid", "order_type": "limit", "symbol": symbol}
        body |= {"price": 1, "quantity": 1, "client_order_id": f"probe-{uuid.uuid4().hex}"}

        def post() -> str | None:
            response = self.client.post("/orders", json=body)
            return str(response.json()["order_id"]) if response.status_code == 201 else None

        order_id: str | None = _poll(post, RECOVERY_TIMEOUT_S, interval=0.2)
        if order_id is not None:
            self.accepted.append(order_id)
        return order_id

    def amend_and_cancel(self, order_ids: list[str]) -> tuple[list[Change], dict[str, int | None]]:
        """Amend the first of ``order_ids`` (a new quantity) and cancel the second (each retried on a 5xx or a
        transport error, as a broker would): the changes answered 200 and 204, and every answer's status by kind
        (None: no answer)."""
        change = {"quantity": 2}
        calls = [("amend", "PATCH", "", change, 200), ("cancel", "POST", "/cancel", None, 204)]
        done: list[Change] = []
        answers: dict[str, int | None] = {}
        for (kind, method, suffix, body, expected), order_id in zip(calls, order_ids, strict=False):

            def send(method: str = method, path: str = f"/orders/{order_id}{suffix}", body: Any = body) -> int:
                return self.client.request(method, path, json=body).status_code

            answers[kind] = _poll(lambda: (code := send()) < 500 and code, RECOVERY_TIMEOUT_S, interval=0.2)
            if answers[kind] == expected:
                done.append(Change(time.monotonic(), kind, order_id, change if kind == "amend" else None))
        return done, answers

    def pipeline_works(self, since: float) -> float | None:
        """Seconds from ``since`` until a new probe order on every partition left ``pending`` (None: never)."""
        for symbol in self.symbols:
            order_id = self.place(symbol)
            if order_id is None:
                return None

            def settled(order_id: str = order_id) -> bool:
                response = self.client.get(f"/orders/{order_id}")
                return response.status_code == 200 and response.json()["status"] != "pending"

            if not _poll(settled, RECOVERY_TIMEOUT_S):
                return None
        return time.monotonic() - since

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------------------------------------ faults


def _api_workers(run: FaultRun) -> tuple[int, set[int]]:
    """The gunicorn master's pid and its workers' pids."""
    api = run.harness.services["api"]
    assert api.process is not None
    workers = child_pids(api.process.pid)
    assert workers, "no gunicorn worker found"
    return api.process.pid, workers


@contextmanager
def stopped(send: Callable[[signal.Signals], None], at_least_s: float = FREEZE_S) -> Iterator[float]:
    """SIGSTOP through ``send``, and SIGCONT when the block ends but not before ``at_least_s``; yields the stop's
    time."""
    send(signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        yield stopped_at
    finally:
        time.sleep(max(0.0, at_least_s - (time.monotonic() - stopped_at)))
        send(signal.SIGCONT)


def kill_api_worker(run: FaultRun) -> str:
    master, workers = _api_workers(run)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    replaced = _poll(lambda: (w := child_pids(master)) and victim not in w and len(w) == len(workers), 30)
    run.api_workers_replaced.append(bool(replaced))
    return f"killed worker pid {victim}; {'replaced by gunicorn' if replaced else 'NOT replaced within 30 s'}"


def freeze_api_worker(run: FaultRun) -> str:
    """SIGSTOP one gunicorn worker for FREEZE_S while probing the pipeline on connections of its own (a client kept
    alive with the stopped worker waits for its timeout and retries, as the load's clients do), then SIGCONT it."""
    victim = min(_api_workers(run)[1])
    broker = run.harness.register_broker(f"probe-api-{len(run.api_frozen_matching_after_s)}")
    prober = Prober(run.harness, broker, fresh_connections=True)
    try:
        with stopped(lambda sig: os.kill(victim, sig)) as stopped_at:
            run.api_frozen_matching_after_s.append(prober.pipeline_works(stopped_at))
    finally:
        prober.close()
        run.probe_accepted += [(prober.broker, order_id) for order_id in prober.accepted]
    return (
        f"worker pid {victim} stopped {time.monotonic() - stopped_at:.1f}s; while stopped, the other served and "
        f"matching on every partition after {run.api_frozen_matching_after_s[-1]}s"
    )


@dataclass(frozen=True)
class Failover:
    setup: str
    first_processed_s: float | None
    """SIGKILL → first command of the killed matcher's symbols processed by a live matcher (database
    ``processed_at``). Only commands stamped after the killed process was reaped count: between the kill's timestamp
    and the signal's delivery the dying matcher can still commit one transaction, which is not a failover."""
    reaped_after_s: float
    """SIGKILL's timestamp → the killed process reaped (the window in which it could still commit)."""
    backlog_cleared_s: float | None
    """SIGKILL → every command of those symbols created before the kill processed (the worst stall)."""


def _start_standby(run: FaultRun) -> None:
    """A second matcher on the killed matcher's partitions (DESIGN §7), consuming once this returns; the fault's
    injection time is reset to after its start."""
    h = run.harness
    log = h.work_dir / f"{STANDBY}.log"
    offset = log.stat().st_size if log.exists() else 0  # the log is appended to on every (soak) cycle
    h.start_matcher(STANDBY, MATCHER_KILLED_PARTITIONS)
    ready = _poll(lambda: b"ready for action" in log.read_bytes()[offset:], RECOVERY_TIMEOUT_S)
    assert ready, f"the standby matcher did not start:\n{h.logs()}"
    run.faults[-1].injected_at = time.monotonic()  # the fault is what follows, not the standby's start


def _stop_standby(run: FaultRun) -> None:
    run.harness.stop_services([STANDBY])
    run.harness.services.pop(STANDBY)  # stopped on purpose: not a dead process for assert_alive


_IDLE_BOOK_HOLDERS = """
SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND a.state = 'idle in transaction'
  AND a.state_change < clock_timestamp() - interval '100 milliseconds'
"""


def freeze_matcher(prober: Prober) -> Callable[[FaultRun], str]:
    """SIGSTOP every process of matcher-a (partitions 0-1) beside a hot standby, probe the pipeline while it is
    stopped, and SIGCONT it after at least FREEZE_S: a matcher stopped inside its transaction holds its books until
    PostgreSQL ends the idle transaction (``exchange.db.engines.IDLE_HOLDER_LIMIT_MS``), then the standby
    matches them; when it wakes, its transaction is gone and what it had fetched is done already."""

    def fault(run: FaultRun) -> str:
        h = run.harness
        _start_standby(run)
        process = h.services[MATCHER_KILLED].process
        assert process is not None
        with stopped(lambda sig: os.killpg(process.pid, sig)) as stopped_at:
            # Every live matcher's transaction ends in milliseconds: one still idle is the stopped one's.
            time.sleep(0.2)
            holding = h.scalar(_IDLE_BOOK_HOLDERS) > 0
            run.frozen_matching_after_s.append(prober.pipeline_works(stopped_at))
        run.after_recovery.append(lambda: _stop_standby(run))
        return (
            f"stopped {time.monotonic() - stopped_at:.1f}s beside a hot standby "
            f"({'inside' if holding else 'outside'} a transaction holding its books); while stopped, matching on "
            f"every partition after {run.frozen_matching_after_s[-1]}s (recovery below counts from the SIGSTOP)"
        )

    return fault


def kill_matcher(standby: bool) -> Callable[[FaultRun], str]:
    """SIGKILL matcher-a (partitions 0-1) and restart it after RESTART_DELAY_S, as a supervisor would; with
    ``standby``, a second matcher already consumes the same partitions (DESIGN §7) and is stopped afterwards."""

    def fault(run: FaultRun) -> str:
        h = run.harness
        if standby:
            _start_standby(run)
        killed = [s for s in run.symbols if partition_of(s, PARTITIONS) in {0, 1}]
        t_kill: datetime = h.scalar("SELECT clock_timestamp()")
        h.kill_service(MATCHER_KILLED)
        # processed_at is the database clock read when the matcher's transaction took its locks, so every command
        # the killed process committed (even one whose COMMIT arrives after its death) is stamped before it was
        # reaped: counting only later stamps measures the live matchers.
        t_reaped: datetime = h.scalar("SELECT clock_timestamp()")
        time.sleep(RESTART_DELAY_S)
        h.start_matcher(MATCHER_KILLED, MATCHER_KILLED_PARTITIONS)
        first_sql = "SELECT min(processed_at) FROM commands WHERE symbol = ANY(%s) AND processed_at > %s"
        first: datetime | None = _poll(lambda: h.scalar(first_sql, (killed, t_reaped)), RECOVERY_TIMEOUT_S)
        left_sql = "SELECT count(*) FROM commands WHERE symbol = ANY(%s) AND created_at <= %s AND processed_at IS NULL"
        cleared = _poll(lambda: h.scalar(left_sql, (killed, t_kill)) == 0, RECOVERY_TIMEOUT_S)
        last: datetime | None = None
        if cleared:
            last_sql = "SELECT max(processed_at) FROM commands WHERE symbol = ANY(%s) AND created_at <= %s"
            last = h.scalar(last_sql, (killed, t_kill))
        if standby:  # after the recovery probe (not timed): the next faults run with one matcher per partition
            run.after_recovery.append(lambda: _stop_standby(run))
        setup = "hot standby on the same partitions" if standby else f"restarted after {RESTART_DELAY_S}s, no standby"
        failover = Failover(
            setup=setup,
            first_processed_s=None if first is None else (first - t_kill).total_seconds(),
            reaped_after_s=(t_reaped - t_kill).total_seconds(),
            backlog_cleared_s=None if last is None else max(0.0, (last - t_kill).total_seconds()),
        )
        run.failovers.append(failover)
        return (
            f"{failover.setup}: first processed {failover.first_processed_s}s, backlog {failover.backlog_cleared_s}s, "
            f"reaped {failover.reaped_after_s}s"
        )

    return fault


def restart_service(name: str, args: list[str]) -> Callable[[FaultRun], str]:
    def fault(run: FaultRun) -> str:
        run.harness.kill_service(name)
        time.sleep(RESTART_DELAY_S)
        run.harness.start_service(name, args)
        return f"SIGKILL, restarted after {RESTART_DELAY_S}s"

    return fault


def restart_pgbouncer(run: FaultRun) -> str:
    pid = run.harness.kill_pgbouncer()
    time.sleep(RESTART_DELAY_S)
    run.harness.start_pgbouncer()
    return f"SIGKILL of pid {pid}, restarted on the same port after {RESTART_DELAY_S}s"


def restart_redis(redis_server: PrivateRedis, *, lose_data: bool) -> Callable[[FaultRun], str]:
    """A Redis restart: SIGTERM (it writes its append-only file) and down REDIS_DOWN_S, or with ``lose_data`` a
    crash (SIGKILL) whose append-only file is lost, started again empty after RESTART_DELAY_S."""

    def fault(run: FaultRun) -> str:
        if lose_data:
            redis_server.kill_and_lose_data()
            down_s, how = RESTART_DELAY_S, "SIGKILL, append-only file deleted, started empty"
        else:
            redis_server.stop()
            down_s, how = REDIS_DOWN_S, "SIGTERM, append-only file kept"
        time.sleep(down_s)
        redis_server.start()
        return f"redis-server down {down_s}s ({how})"

    return fault


def _starts(h: Harness) -> dict[str, int]:
    """How many times each process of the exchange was started."""
    return {name: service.starts for name, service in h.services.items()}


def _dead(h: Harness) -> list[str]:
    return [name for name, service in h.services.items() if not service.alive]


def _api_database_errors(h: Harness, sqlstate: str) -> float:
    """``exchange_database_errors_total`` of ``sqlstate`` on the api's ``/metrics`` (every worker's, summed)."""
    text = httpx.get(f"{h.base_url}/metrics", timeout=REQUEST_TIMEOUT_S).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "exchange_database_errors_total" and sample.labels.get("sqlstate") == sqlstate
    )


def _checkpointer(pg: PrivatePostgres) -> int:
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'").fetchone()
    assert row is not None, "no checkpointer"
    return int(row[0])


def fill_redis(redis_server: PrivateRedis) -> Callable[[FaultRun], str]:
    """Redis out of memory for REDIS_FULL_S (:meth:`PrivateRedis.refuse_writes`), then room again."""

    def fault(run: FaultRun) -> str:
        refused_before = redis_server.refused_commands()
        started_at = time.monotonic()
        try:
            redis_server.refuse_writes(True)
            time.sleep(REDIS_FULL_S)
        finally:
            redis_server.refuse_writes(False)
        spell = RedisFull(started_at, time.monotonic(), redis_server.refused_commands() - refused_before)
        run.redis_full.append(spell)
        return f"out of memory {REDIS_FULL_S}s (maxmemory 1 byte, noeviction): {spell.refused} commands refused"

    return fault


def fill_postgres_disk(pg: PowerLossPostgres) -> Callable[[FaultRun], str]:
    """PostgreSQL's disk full (DISK_FULL_S, longer until a request was answered 503 for it), then room again (an
    operator freed some); no process is touched. A checkpoint first recycles the WAL segments it no longer needs
    into the next ones, so the WAL has segments to switch into without growing a file: one it had to create would
    be a PANIC of PostgreSQL's (a crash, which the other faults cover), not a full disk under a running server."""

    def fault(run: FaultRun) -> str:
        h = run.harness
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        spell = DiskFull(time.monotonic(), 0.0, 0, _starts(h), _checkpointer(pg))
        counted_before = _api_database_errors(h, "53100")
        first_call = len(run.load.calls)
        try:
            pg.fs.fill()
            time.sleep(DISK_FULL_S)
            _poll(lambda: any(c.status == 503 for c in run.load.calls[first_call:]), DISK_FULL_MAX_S - DISK_FULL_S)
        finally:
            spell.refused = pg.fs.make_room()
        spell.ended_at = time.monotonic()
        run.disk_full.append(spell)

        def recovered() -> None:
            spell.starts_after, spell.dead_after = _starts(h), _dead(h)
            spell.checkpointer_after = _checkpointer(pg)
            spell.counted_by_the_api = _api_database_errors(h, "53100") - counted_before  # (only the spell's)

        run.after_recovery.append(recovered)
        return f"disk full {spell.ended_at - spell.started_at:.1f}s: {spell.refused} writes refused (ENOSPC)"

    return fault


def power_loss_with_the_wal_writer_stopped(pg: PowerLossPostgres, prober: Prober, run: FaultRun) -> None:
    """Stop (SIGSTOP) every process of the exchange but the api (the matchers, the webhooks worker, the sweeper:
    every other writer), then PostgreSQL's WAL writer, for the spell under the load (probe orders placed meanwhile);
    then cut the power under PostgreSQL (:meth:`PowerLossPostgres.power_loss`: its disk keeps what was synced, its
    processes die at once) and let the exchange's processes go on. What a commit left unsynced, in the WAL buffers
    for the WAL writer or in the kernel's cache, is gone."""
    h = run.harness
    groups = [svc.process.pid for name, svc in h.services.items() if name != "api" and svc.process is not None]
    with contextlib.ExitStack() as writers_stopped:
        for group in groups:
            writers_stopped.enter_context(stopped(lambda sig, group=group: os.killpg(group, sig), at_least_s=0))
        walwriter = pg.stop_waiting("walwriter")
        try:
            stopped_at, stopped_wall = time.monotonic(), time.time()
            probe_orders = [order_id for symbol in prober.symbols if (order_id := prober.place(symbol)) is not None]
            probe_changes, probe_answers = prober.amend_and_cancel(probe_orders)
            time.sleep(max(0.0, WAL_WRITER_STOPPED_S - (time.monotonic() - stopped_at)))
            spell = UnsyncedWalSpell(
                stopped_at, stopped_wall, time.monotonic(), probe_orders, probe_changes, probe_answers
            )
            run.unsynced_wal.append(spell)
        except BaseException:
            os.kill(walwriter, signal.SIGCONT)
            raise
        pg.power_loss()  # the WAL writer with the rest, never continued


def restart_postgres(pg: PrivatePostgres, prober: Prober, *, power_loss: bool = False) -> Callable[[FaultRun], str]:
    """Stop PostgreSQL for POSTGRES_DOWN_S (probing the api meanwhile) and start it again: cleanly (``fast``: a
    checkpoint) or, with ``power_loss``, by a power loss with the WAL writer stopped
    (:func:`power_loss_with_the_wal_writer_stopped`; no checkpoint, the start replays the WAL the disk kept)."""

    def fault(run: FaultRun) -> str:
        h = run.harness
        outage = PostgresOutage(starts_before=_starts(h))
        run.outages.append(outage)
        client = prober.client
        broker_order = prober.accepted[0]
        body = {"document_number": "00000000001", "side": "bid", "order_type": "limit", "symbol": prober.symbols[0]}
        body |= {"price": 1, "quantity": 1}
        if power_loss:
            assert isinstance(pg, PowerLossPostgres)
            power_loss_with_the_wal_writer_stopped(pg, prober, run)
        else:
            pg.stop("fast")
        outage.down_at = time.monotonic()
        while time.monotonic() - outage.down_at < POSTGRES_DOWN_S:
            probes: list[tuple[str, Callable[[], httpx.Response]]] = [
                ("place", lambda: client.post("/orders", json=body | {"client_order_id": f"pg-{uuid.uuid4().hex}"})),
                ("get_order", lambda: client.get(f"/orders/{broker_order}")),
                ("balance", lambda: client.get("/balance")),
                ("ready", lambda: client.get("/health/ready")),
            ]
            for op, call in probes:
                try:
                    response = call()
                except httpx.HTTPError as exc:
                    outage.probes.append(Call(time.monotonic(), op, None, type(exc).__name__))
                    continue
                outage.probes.append(Call(time.monotonic(), op, response.status_code, response.text[:200]))
                if op == "place" and response.status_code == 201:
                    run.probe_accepted.append((prober.broker, str(response.json()["order_id"])))
            time.sleep(0.1)
        pg.start()
        outage.up_at = time.monotonic()
        first_201 = prober.place(prober.symbols[0])
        if first_201 is not None:
            outage.first_201_after_s = time.monotonic() - outage.up_at
        outage.starts_after, outage.dead_after = _starts(h), _dead(h)
        return f"postgres down {POSTGRES_DOWN_S}s; first 201 {outage.first_201_after_s}s after start"

    return fault


# ------------------------------------------------------------------------------------------------ scenario


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, PrivatePostgres, PrivateRedis]]:
    """A private exchange on its own PostgreSQL cluster and Redis server (both restartable by the scenario). The
    cluster's disk can lose power where a FUSE mount is possible (:func:`power_loss_missing`: required in CI);
    elsewhere every fault but the power loss runs."""
    require_services()
    missing = private_services_missing() or (in_ci() and power_loss_missing())
    if missing:
        skip_or_fail(missing)
    pg = PrivatePostgres(free_port()) if power_loss_missing() else PowerLossPostgres(free_port())
    redis_server = PrivateRedis(free_port())
    harness: Harness | None = None
    try:
        pg.init()
        pg.start()
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE exchange")
        migrate.upgrade(pg.url("exchange"))
        redis_server.start()
        harness = Harness(
            name="faults",
            database_url=pg.url("exchange"),
            work_dir=tmp_path_factory.mktemp("faults"),
            redis_url=redis_server.url,
        )
        harness.start()
        yield harness, pg, redis_server
    finally:
        if harness is not None:
            harness.stop()
        redis_server.close()
        pg.close()


@pytest.fixture(scope="module")
def fault_run(fault_stack: tuple[Harness, PrivatePostgres, PrivateRedis]) -> Iterator[FaultRun]:
    h, pg, redis_server = fault_stack
    started = time.monotonic()
    with Receiver() as receiver:
        brokers = [h.register_broker(f"fault{n}", f"{receiver.url}/{n}") for n in range(BROKERS)]
        symbols = [unique_symbol("F", {p}) for p in range(PARTITIONS) for _ in range(SYMBOLS_PER_PARTITION)]
        prober = Prober(h, h.register_broker("probe"))
        load = Load(h.base_url, brokers, symbols)
        run = FaultRun(h, receiver, load, brokers, symbols)
        faults: list[tuple[str, Callable[[FaultRun], str]]] = [
            ("api worker SIGKILL", kill_api_worker),
            ("api worker SIGSTOP", freeze_api_worker),
            ("matcher SIGKILL", kill_matcher(standby=False)),
            ("matcher SIGKILL with a hot standby", kill_matcher(standby=True)),
            ("matcher SIGSTOP with a hot standby", freeze_matcher(prober)),
            ("webhooks SIGKILL", restart_service("webhooks", ["webhooks", "--threads", "8"])),
            ("sweeper SIGKILL", restart_service("sweeper", ["sweeper"])),
            ("pgbouncer SIGKILL", restart_pgbouncer),
            ("redis restart", restart_redis(redis_server, lose_data=False)),
            ("redis data lost", restart_redis(redis_server, lose_data=True)),
            ("redis out of memory", fill_redis(redis_server)),
            ("postgres restart", restart_postgres(pg, prober)),
        ]
        if isinstance(pg, PowerLossPostgres):
            faults.append(("postgres disk full", fill_postgres_disk(pg)))
            faults.append(("postgres power loss", restart_postgres(pg, prober, power_loss=True)))
        try:
            assert prober.pipeline_works(time.monotonic()) is not None, "the pipeline does not work before faults"
            load.start()
            time.sleep(STEADY_S)
            cycle_started = time.monotonic()
            while True:
                for name, inject in faults:
                    fault = Fault(name, time.monotonic())
                    run.faults.append(fault)
                    fault.note = inject(run)
                    fault.recovered_after_s = prober.pipeline_works(fault.injected_at)
                    while run.after_recovery:
                        run.after_recovery.pop()()
                    time.sleep(STEADY_S)
                if time.monotonic() - cycle_started >= SOAK_SECONDS:
                    break
        finally:
            load.stop()
            prober.close()
        run.probe_accepted += [(prober.broker, order_id) for order_id in prober.accepted]
        # Drained: every command applied, no order pending, and every good-till-date order expired (valid_until is
        # at most 6 s out): its expiry notice is an event too, and must exist before the webhooks settle.
        unsettled = (
            "SELECT (SELECT count(*) FROM commands WHERE processed_at IS NULL)"
            " + (SELECT count(*) FROM orders WHERE status = 'pending')"
            " + (SELECT count(*) FROM orders WHERE status = 'open' AND valid_until IS NOT NULL)"
        )
        run.drained = bool(_poll(lambda: h.scalar(unsettled) == 0, DRAIN_TIMEOUT_S, interval=0.2))
        undelivered = "SELECT count(*) FROM webhook_events WHERE status = 'pending'"
        run.webhooks_settled = bool(_poll(lambda: h.scalar(undelivered) == 0, DRAIN_TIMEOUT_S, interval=0.2))
        run.elapsed_s = time.monotonic() - started
        yield run


# ------------------------------------------------------------------------------------------------ tests


def test_every_order_answered_2xx_exists_and_ends_open_or_closed(
    fault_stack: tuple[Harness, PrivatePostgres, PrivateRedis], fault_run: FaultRun
) -> None:
    h = fault_stack[0]
    accepted = list(fault_run.load.accepted.values())
    assert len(accepted) > 100, f"too little load to judge: {len(accepted)} orders accepted"
    assert fault_run.load.rejected == []
    ids = [a.order_id for a in accepted] + [order_id for _, order_id in fault_run.probe_accepted]
    assert len(set(ids)) == len(ids), "two client_order_ids were answered with the same order"
    rows = h.query("SELECT id::text, status, client_order_id FROM orders WHERE id = ANY(%s::uuid[])", (ids,))
    states = {order_id: status for order_id, status, _ in rows}
    missing = set(ids) - set(states)
    assert not missing, f"{len(missing)} orders answered 2xx are not in Postgres, e.g. {sorted(missing)[:5]}"
    not_final = {i: s for i, s in states.items() if s not in {"open", "closed"}}
    assert not not_final, f"{len(not_final)} accepted orders are neither open nor closed: {list(not_final.items())[:5]}"
    by_cid = {cid: order_id for order_id, _, cid in rows}
    assert all(by_cid[a.client_order_id] == a.order_id for a in accepted)

    rng = random.Random(7)
    for a in rng.sample(accepted, min(HTTP_CHECK_SAMPLE, len(accepted))):
        body = fault_run.brokers[a.broker].order(a.order_id)
        assert body["status"] in {"open", "closed"}, body


def test_an_order_answered_closed_is_still_closed(
    fault_stack: tuple[Harness, PrivatePostgres, PrivateRedis], fault_run: FaultRun
) -> None:
    """A 201 that answers ``closed`` reports a committed fill, cancel or expiry: nothing afterwards (amends, cancels,
    faults, a power loss and its WAL replay) may reopen the order."""
    closed = [a.order_id for a in fault_run.load.accepted.values() if a.status == "closed"]
    assert closed, "no order was answered closed: the load did not cross"
    rows = fault_stack[0].query("SELECT id::text, status FROM orders WHERE id = ANY(%s::uuid[])", (closed,))
    reopened = [(order_id, status) for order_id, status in rows if status != "closed"]
    assert len(rows) == len(closed)
    assert not reopened, f"{len(reopened)} orders answered closed are not closed: {reopened[:5]}"


def _require_power_loss_fs() -> None:
    """Skip where PostgreSQL's disk cannot be the power-loss filesystem (:func:`power_loss_missing`; never in CI)."""
    if power_loss_missing() and not in_ci():
        pytest.skip(f"no power-loss filesystem here: {power_loss_missing()}")


def _require_power_loss(run: FaultRun) -> None:
    _require_power_loss_fs()
    assert run.unsynced_wal, "postgres never lost power with its WAL writer stopped"


def test_orders_answered_while_the_wal_writer_was_stopped_survive_a_power_loss(
    fault_stack: tuple[Harness, PrivatePostgres, PrivateRedis], fault_run: FaultRun
) -> None:
    """A 201 is sent only after the order's commit is in the WAL on the disk: in the spell, with the api the only
    writer and the WAL writer stopped, that is the api's own session syncing it before it answers
    (``synchronous_commit = on``, ``fsync = on``), which a power loss keeps. (The load's orders are checked with all
    the others above; here the spell's own, with the probe orders.)"""
    _require_power_loss(fault_run)
    for spell in fault_run.unsynced_wal:
        ids = spell.probe_orders + spell.load_orders(fault_run.load)
        assert spell.probe_orders, "no probe order was answered 201 while the WAL writer was stopped"
        found = fault_stack[0].scalar("SELECT count(*) FROM orders WHERE id = ANY(%s::uuid[])", (ids,))
        assert found == len(ids), f"{len(ids) - found} of {len(ids)} orders answered in the spell were lost"


def test_cancels_and_amends_acknowledged_while_the_wal_writer_was_stopped_survive_a_power_loss(
    fault_stack: tuple[Harness, PrivatePostgres, PrivateRedis], fault_run: FaultRun
) -> None:
    """A cancel's 204 and an amend's 200 are sent only after their command is committed: each cancel answered in the
    spell has a cancel command, unless its order was closed before the spell began (a no-op: nothing to write), and
    each amend a command with its payload."""
    h = fault_stack[0]
    _require_power_loss(fault_run)
    lost: list[Change] = []
    for spell in fault_run.unsynced_wal:
        assert {c.kind for c in spell.probe_changes} == {"cancel", "amend"}, f"probe answers: {spell.probe_answers}"
        changes = spell.changes(fault_run.load)
        ids = [c.order_id for c in changes]
        commands = h.query(
            "SELECT kind, order_id::text, payload FROM commands WHERE kind IN ('cancel', 'amend')"
            " AND order_id = ANY(%s::uuid[])",
            (ids,),
        )
        cancelled = {order_id for kind, order_id, _ in commands if kind == "cancel"}
        closed_before = {
            order_id
            for (order_id,) in h.query(
                "SELECT id::text FROM orders WHERE id = ANY(%s::uuid[]) AND status = 'closed'"
                " AND updated_at < to_timestamp(%s)",
                (ids, spell.stopped_wall),
            )
        }
        amends = Counter((order_id, json.dumps(payload, sort_keys=True)) for kind, order_id, payload in commands)
        for c in changes:
            if c.kind == "cancel" and c.order_id not in cancelled | closed_before:
                lost.append(c)
            elif c.kind == "amend":
                key = (c.order_id, json.dumps(c.command_payload, sort_keys=True))
                if amends[key] <= 0:
                    lost.append(c)
                amends[key] -= 1
    assert not lost, f"{len(lost)} cancels and amends acknowledged in a spell were lost, e.g. {lost[:5]}"


def test_invariants_hold_after_every_fault(
    fault_stack: tuple[Harness, PrivatePostgres, PrivateRedis], fault_run: FaultRun
) -> None:
    assert fault_run.drained, "the exchange did not drain (unprocessed commands or pending orders remain)"
    check_invariants(fault_stack[0].database_url)


def test_every_fill_event_reaches_the_receiver_with_contiguous_per_broker_sequences(
    fault_stack: tuple[Harness, PrivatePostgres, PrivateRedis], fault_run: FaultRun
) -> None:
    h = fault_stack[0]
    assert fault_run.webhooks_settled, "webhook events are still pending after the drain"
    received: dict[str, dict[str, dict[str, Any]]] = {}
    for request in fault_run.receiver.accepted():
        if len(request.body) != int(request.headers.get("content-length", -1)):
            continue  # cut short by the SIGKILL of the sending worker: the receiver never got this event
        body = request.json
        received.setdefault(request.path.rsplit("/", 1)[1], {})[body["event_id"]] = body
    fills = 0
    for n, broker in enumerate(fault_run.brokers):
        # Every event of the broker (fills, and cancel/expiry notices, which share its sequence).
        stored = h.query(
            "SELECT id::text, sequence, type, status, attempts, last_error FROM webhook_events WHERE broker_id = %s",
            (broker.broker_id,),
        )
        event_seq = h.scalar("SELECT event_seq FROM brokers WHERE id = %s", (broker.broker_id,))
        got = received.get(str(n), {})
        not_delivered = [row for row in stored if row[3] != "delivered"]
        assert not not_delivered, f"broker {n}: {len(not_delivered)} events not delivered, e.g. {not_delivered[:5]}"
        missing = [row for row in stored if row[0] not in got]
        assert not missing, f"broker {n}: {len(missing)} events never reached the receiver, e.g. {missing[:5]}"
        # An event is sent only after the transaction that wrote it committed: one the receiver got cannot have
        # been lost by a power loss (and, with the unique (broker, sequence), its number given to another event).
        stored_ids = {row[0] for row in stored}
        phantoms = [event_id for event_id in got if event_id not in stored_ids]
        assert not phantoms, f"broker {n}: {len(phantoms)} events received are not in PostgreSQL: {phantoms[:5]}"
        sequences = sorted({b["sequence"] for b in got.values()})
        assert sequences == list(range(1, event_seq + 1)), f"broker {n}: sequences received are not 1..{event_seq}"
        fills += sum(row[2] == "order.fill" for row in stored)
    assert fills > 0, "no fill happened: the load did not cross"


def test_api_answers_503_not_500_while_postgres_is_down(fault_run: FaultRun) -> None:
    assert fault_run.outages, "postgres was never restarted"
    for outage in fault_run.outages:
        seen = outage.probes + fault_run.calls_between(outage.down_at, outage.up_at)
        statuses = Counter((c.op, c.status or c.error) for c in seen)
        server_errors = [c for c in seen if c.status is not None and c.status >= 500 and c.status != 503]
        assert not server_errors, f"5xx other than 503 while postgres was down: {server_errors[:5]}; all: {statuses}"
        assert any(c.status == 503 and c.op != "ready" for c in outage.probes), f"no 503 from the api: {statuses}"
        assert any(c.op == "ready" and c.status == 503 for c in outage.probes), f"/health/ready not 503: {statuses}"
        # Answered, not left hanging: pgbouncer fails a query no server took within query_wait_timeout (3 s, below
        # the probes' 5 s timeout); with its default (120 s) some probes timed out instead of getting a 503.
        unanswered = [c for c in outage.probes if c.status is None]
        assert not unanswered, f"probes unanswered while postgres was down: {unanswered[:5]}; all: {statuses}"


def test_api_recovers_from_a_postgres_restart_without_any_process_restart(fault_run: FaultRun) -> None:
    assert fault_run.outages, "postgres was never restarted"
    for outage in fault_run.outages:
        assert outage.first_201_after_s is not None, "POST /orders never answered 201 after postgres came back"
        assert outage.starts_after == outage.starts_before, "a process was (re)started during the postgres outage"
        assert outage.dead_after == [], f"processes died during the postgres outage: {outage.dead_after}"


def test_no_request_is_answered_500_under_faults(fault_run: FaultRun) -> None:
    errors = [c for c in fault_run.load.calls if c.status is not None and c.status >= 500 and c.status != 503]
    assert not errors, f"{len(errors)} requests answered 5xx other than 503, e.g. {errors[:5]}"
    assert fault_run.load.gave_up == [], f"{len(fault_run.load.gave_up)} requests never got an answer"


def test_amends_under_faults_are_applied_and_answered_as_documented(fault_run: FaultRun) -> None:
    amended = fault_run.load.amended
    assert amended[200] > 0, f"no amend was applied: {dict(amended)}"
    assert set(amended) <= AMEND_ANSWERS, f"amends answered {dict(amended)}"


def test_api_answers_503_not_500_while_postgres_disk_is_full(fault_run: FaultRun) -> None:
    _require_power_loss_fs()
    assert fault_run.disk_full, "postgres's disk never filled"
    for spell in fault_run.disk_full:
        assert spell.refused > 0, "the disk refused no write: the spell tested nothing"
        seen = fault_run.calls_between(spell.started_at, spell.ended_at)
        statuses = Counter(f"{c.op}:{c.status or c.error}" for c in seen)
        # (No 5xx but 503 there: test_no_request_is_answered_500_under_faults covers every call.)
        assert any(c.status == 503 for c in seen), f"no request was refused while the disk was full: {dict(statuses)}"
        assert spell.counted_by_the_api > 0, "the api's metrics counted no disk_full error (53100) for its operators"


def test_no_order_is_rejected_under_faults(
    fault_stack: tuple[Harness, PrivatePostgres, PrivateRedis], fault_run: FaultRun
) -> None:
    """Every order of the load and the probes is valid, so none may close ``rejected``: a matcher quarantines a
    command only for a failure of its own data (SQLSTATE class 22 or 23), never for the database's state — a full
    disk, a lost connection, a shutdown — which its retry outlives."""
    assert fault_run.drained, "the exchange did not drain (unprocessed commands or pending orders remain)"
    rejected = fault_stack[0].query("SELECT id::text, symbol FROM orders WHERE close_reason = 'rejected'")
    assert rejected == [], f"{len(rejected)} orders closed rejected: {rejected[:5]}"


def test_exchange_recovers_from_a_full_disk_without_any_process_restart(fault_run: FaultRun) -> None:
    _require_power_loss_fs()
    assert fault_run.disk_full, "postgres's disk never filled"
    for spell in fault_run.disk_full:
        assert spell.starts_after == spell.starts_before, "a process was (re)started after the disk filled"
        assert spell.dead_after == [], f"processes died after the disk filled: {spell.dead_after}"
        assert spell.checkpointer_after == spell.checkpointer_before, "PostgreSQL crashed in the spell (a PANIC)"


def test_api_accepts_every_order_while_redis_refuses_writes(fault_run: FaultRun) -> None:
    """The wake-ups are lost, not the orders: PostgreSQL accepts them, and the sweeper's re-nudges and the drain
    (the other tests) bring them through once Redis has room again."""
    assert fault_run.redis_full, "redis never ran out of memory"
    for spell in fault_run.redis_full:
        assert spell.refused > 0, "redis refused no command: the spell tested nothing"
        placed = [c for c in fault_run.calls_between(spell.started_at, spell.ended_at) if c.op == "place"]
        statuses = Counter(c.status or c.error for c in placed)
        assert placed, "no order was placed while redis refused writes"
        assert set(statuses) == {201}, f"orders answered while redis refused writes: {dict(statuses)}"


def test_gunicorn_replaces_a_killed_api_worker(fault_run: FaultRun) -> None:
    assert fault_run.api_workers_replaced, "no api worker was killed"
    assert all(fault_run.api_workers_replaced), "gunicorn did not replace a killed worker within 30 s"


def test_a_stopped_api_worker_leaves_the_other_serving_and_matching(fault_run: FaultRun) -> None:
    assert fault_run.api_frozen_matching_after_s, "no api worker was stopped"
    assert None not in fault_run.api_frozen_matching_after_s, fault_run.api_frozen_matching_after_s


def test_pipeline_matches_new_orders_again_after_every_fault(fault_run: FaultRun) -> None:
    stuck = [f"{f.name} ({f.note})" for f in fault_run.faults if f.recovered_after_s is None]
    assert not stuck, f"no probe order was matched within {RECOVERY_TIMEOUT_S}s after: {stuck}"
    fault_run.harness.assert_alive()


def test_a_stopped_matchers_partitions_are_matched_by_its_standby_while_it_is_stopped(fault_run: FaultRun) -> None:
    assert fault_run.frozen_matching_after_s, "no matcher was stopped"
    assert None not in fault_run.frozen_matching_after_s, fault_run.frozen_matching_after_s


def test_killed_matchers_partitions_are_processed_again(
    fault_run: FaultRun, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(_report(fault_run))
    assert fault_run.failovers, "no matcher was killed"
    for failover in fault_run.failovers:
        assert failover.first_processed_s is not None, f"{failover.setup}: partitions never processed after the kill"
        assert failover.backlog_cleared_s is not None, f"{failover.setup}: the killed matcher's backlog remained"


def _report(run: FaultRun) -> str:
    lines = [
        f"\n[faults] {len(run.load.accepted)} orders accepted, {len(run.load.calls)} calls, "
        f"{run.elapsed_s:.1f}s in all (soak {SOAK_SECONDS:.0f}s)"
    ]
    for f in run.faults:
        recovered = "never" if f.recovered_after_s is None else f"{f.recovered_after_s:.2f}s"
        lines.append(f"  - {f.name}: pipeline matching again after {recovered}; {f.note}")
    for f in run.failovers:
        lines.append(
            f"  matcher failover ({f.setup}): kill -> first processed command on its partitions "
            f"{f.first_processed_s}s (killed process reaped after {f.reaped_after_s}s); "
            f"-> every command accepted before the kill processed {f.backlog_cleared_s}s"
        )
    for outage in run.outages:
        seen = outage.probes + run.calls_between(outage.down_at, outage.up_at)
        statuses = Counter(f"{c.op}:{c.status or c.error}" for c in seen)
        lines.append(f"  postgres outage statuses: {dict(statuses)}; first 201 after {outage.first_201_after_s}s")
    for full in run.redis_full:
        answers = Counter(f"{c.op}:{c.status or c.error}" for c in run.calls_between(full.started_at, full.ended_at))
        lines.append(f"  redis out of memory: {full.refused} commands refused; answers meanwhile {dict(answers)}")
    for disk in run.disk_full:
        answers = Counter(f"{c.op}:{c.status or c.error}" for c in run.calls_between(disk.started_at, disk.ended_at))
        lines.append(
            f"  postgres disk full: {disk.refused} writes refused, {disk.counted_by_the_api:.0f} errors 53100 counted "
            f"by the api; answers meanwhile {dict(answers)}"
        )
    for spell in run.unsynced_wal:
        lines.append(
            f"  WAL writer stopped {spell.power_lost_at - spell.stopped_at:.2f}s before the power loss: "
            f"{len(spell.load_orders(run.load))} load orders and {len(spell.probe_orders)} probe orders answered 201, "
            f"{dict(Counter(c.kind for c in spell.changes(run.load)))} acknowledged"
        )
    edges = [f.injected_at for f in run.faults] + [float("inf")]
    for name, start, end in zip(["before faults", *(f.name for f in run.faults)], [0.0, *edges], edges, strict=False):
        states = Counter(state for at, state in run.load.placed_states if start <= at < end)
        lines.append(f"  POST /orders 201 states from '{name}' on: {dict(states)}")
    lines.append(f"  load calls by status: {dict(Counter(f'{c.op}:{c.status or c.error}' for c in run.load.calls))}")
    return "\n".join(lines)

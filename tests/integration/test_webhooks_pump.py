"""The pump under stress of its own: hanging DNS, hanging receivers, failing callbacks, concurrent broker writers
(real PostgreSQL, real HTTP receivers on 127.0.0.1; only DNS is stood in for: a blocking lookup that hangs)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import uvloop
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from exchange.webhooks import pump as pump_module
from exchange.webhooks import ssrf, store
from exchange.webhooks.outcomes import DeliveryResult, Kind, Outcome, Verdict
from exchange.webhooks.pump import FAN_OUT_INTERVAL_S, Pump, PumpDiedError, PumpThread
from tests.integration.webhook_support import (
    FAST,
    attempts_of,
    broker_row,
    broker_with_endpoint,
    events_of,
    fills,
    status_counts,
)
from tests.webhook_receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(pump: Pump) -> AsyncIterator[asyncio.Task[None]]:
    """``pump`` running on this loop; stopped (and drained) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(pump.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await task


# ------------------------------------------------------------------------------------------------------ DNS


class Dns:
    """Stands in for getaddrinfo + the SSRF check (:func:`ssrf.resolve_host`): ``*.hang.example`` blocks until
    ``release()`` (a DNS server that does not answer), any other name is 127.0.0.1 at once. Counts lookups."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._open = threading.Event()

    def __call__(self, host: str, allow_private: bool) -> ssrf.IPAddress:
        with self._lock:
            self.calls[host] += 1
        if host.endswith(".hang.example") and not self._open.wait(30):
            raise ssrf.UnsafeWebhookUrlError(f"cannot resolve host {host!r}: timed out")
        return ipaddress.ip_address("127.0.0.1")

    def release(self) -> None:
        self._open.set()


def test_hosts_whose_dns_hangs_delay_neither_other_brokers_nor_recording_and_are_looked_up_once(
    engine: Engine,
) -> None:
    dns = Dns()
    with Receiver() as fast:
        healthy, _ = broker_with_endpoint(engine, f"http://fast.example:{fast.port}/hook")
        # More hanging hosts than asyncio's default executor has threads (6 on 2 cores), where claims and records
        # used to run too.
        hanging = [broker_with_endpoint(engine, f"http://h{i}.hang.example/hook")[0] for i in range(8)]
        seller, _ = broker_with_endpoint(engine, None)
        for broker in hanging:
            fills(engine, broker, seller, n=2)  # first in line: the oldest due events
        fills(engine, healthy, seller, n=10)
        config = replace(FAST, connect_timeout_s=0.3, retry_schedule=(0.05,) * 50, lease_s=30.0)
        pump = Pump(engine, config, capacity=16, resolve_host=dns)

        def attempted_again() -> bool:
            with engine.connect() as conn:
                least = conn.execute(
                    text("SELECT min(attempts) FROM webhook_events WHERE broker_id = ANY(:b)"), {"b": hanging}
                ).scalar_one()
            return bool(least >= 3)

        async def scenario() -> None:
            async with running(pump):
                try:
                    await eventually(lambda: status_counts(engine, healthy) == {"delivered": 10}, timeout=5)
                    await eventually(attempted_again)  # many batches, each giving up on DNS after 0.3 s
                    assert all(status_counts(engine, b).keys() <= {"pending", "claimed"} for b in hanging)
                finally:
                    dns.release()

        asyncio.run(scenario())

    # a lookup still running is joined, not started again; an answer is reused across batches
    assert dns.calls == {"fast.example": 1} | {f"h{i}.hang.example": 1 for i in range(8)}
    attempt = attempts_of(engine, events_of(engine, hanging[0])[0].id)[0]
    assert attempt.error == "refused: cannot resolve host 'h0.hang.example': no answer within 0.3 s"


# ------------------------------------------------------------------------------------------------- claiming


def _served_beside(
    engine: Engine,
    pump: Pump,
    slow: Receiver,
    hung: uuid.UUID,
    hanging: dict[str, int],
    healthy: uuid.UUID,
    seller: uuid.UUID,
    *,
    settle_s: float = 0.0,
) -> dict[str, int]:
    """Run ``pump`` until ``hung``'s events are ``hanging`` on ``slow``; then a fill of ``healthy``'s and the hint its
    commit sends. Returns ``hung``'s events' state once ``healthy``'s event was delivered (within 5 s)."""

    async def scenario() -> dict[str, int]:
        async with running(pump):
            try:
                await eventually(lambda: status_counts(engine, hung) == hanging)
                await asyncio.sleep(settle_s)
                await asyncio.to_thread(fills, engine, healthy, seller)
                pump.wake()
                await eventually(lambda: status_counts(engine, healthy) == {"delivered": 1}, timeout=5)
                return status_counts(engine, hung)
            finally:
                slow.release()

    return asyncio.run(scenario())


def test_one_free_slot_is_refilled_at_once_while_other_deliveries_hang(engine: Engine) -> None:
    with Receiver() as slow, Receiver() as fast:
        slow.hang()
        hung, _ = broker_with_endpoint(engine, slow.url)
        healthy, _ = broker_with_endpoint(engine, fast.url)
        seller, _ = broker_with_endpoint(engine, None)
        fills(engine, hung, seller, n=3)
        pump = Pump(engine, replace(FAST, read_timeout_s=20.0, lease_s=60.0), capacity=4)

        while_hanging = _served_beside(engine, pump, slow, hung, {"claimed": 3}, healthy, seller)  # 3 of 4 slots hang

    assert while_hanging == {"claimed": 3}  # delivered well before the hanging ones' 20 s read timeout


def test_a_hint_claims_another_brokers_events_while_a_hanging_broker_at_its_cap_has_more_due(
    engine: Engine,
) -> None:
    with Receiver() as slow, Receiver() as fast:
        slow.hang()
        hung, _ = broker_with_endpoint(engine, slow.url)
        healthy, _ = broker_with_endpoint(engine, fast.url)
        seller, _ = broker_with_endpoint(engine, None)
        fills(engine, hung, seller, n=3)  # 3 events due, at most 2 in flight: the claimer waits for room
        pump = Pump(engine, replace(FAST, read_timeout_s=20.0, lease_s=60.0, max_in_flight=2), capacity=4)

        # settle: the claim that found only the held-back event has returned
        hanging = {"claimed": 2, "pending": 1}
        while_hanging = _served_beside(engine, pump, slow, hung, hanging, healthy, seller, settle_s=0.2)

    assert while_hanging == {"claimed": 2, "pending": 1}  # well before the hanging ones' 20 s read timeout


def test_a_claim_that_gets_fewer_events_than_it_asked_for_ends_the_round_without_claiming_again(
    engine: Engine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every hint used to cost a second claim that found nothing. Events committed after a claim hint again (the
    # hint is cleared before the pump is woken), so a short claim with no broker held back at its cap is the last.
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=2)  # 2 events to deliver, 2 to skip (no URL): 4 < the room of 8
    claims: list[int] = []
    real_claim = store.claim

    def counted_claim(*args: object, **kwargs: object) -> store.Claimed:
        claimed = real_claim(*args, **kwargs)  # type: ignore[arg-type]
        claims.append(len(claimed.claims) + len(claimed.skipped))
        return claimed

    monkeypatch.setattr(store, "claim", counted_claim)
    pump = Pump(engine, FAST, capacity=8)

    async def scenario() -> None:
        async with running(pump):  # a pump starts by claiming whatever is due
            await eventually(lambda: status_counts(engine, buyer) == {"delivered": 2})
            await asyncio.sleep(0.3)  # room for a further claim, if one were coming

    asyncio.run(scenario())

    assert claims == [4]


def test_events_held_back_by_a_brokers_room_are_claimed_though_a_delivery_ended_during_the_claim(
    engine: Engine, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short claim ends the round only when nothing it held back can be claimed now. A broker that got as many
    # events as it had room for may have more due; a delivery of its own that ended during the claim leaves it below
    # its cap once the claim returns, yet the claim did not see that room. The round used to end there, and its
    # last events waited for the next hint (the sweeper's, in the worst case) while the worker sat idle.
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=4)  # 4 events to deliver to the buyer, at most 2 at once
    gates = [threading.Event(), threading.Event()]  # the first two deliveries wait for theirs
    started: list[uuid.UUID] = []
    real_attempt = pump_module.attempt

    async def gated_attempt(http: object, endpoints: object, claim: store.Claim, config: object) -> store.Attempt:
        started.append(claim.event_id)
        if len(started) <= len(gates):
            gate = gates[len(started) - 1]
            while not gate.is_set():
                await asyncio.sleep(0.01)
        return await real_attempt(http, endpoints, claim, config)  # type: ignore[arg-type]

    pump = Pump(engine, replace(FAST, max_in_flight=2), capacity=4)
    real_claim = store.claim
    ended_during_a_claim = threading.Event()

    def claim_while_a_delivery_ends(*args: object, **kwargs: object) -> store.Claimed:
        claimed = real_claim(*args, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("busy") == {buyer: 1} and not ended_during_a_claim.is_set():
            gates[1].set()  # the other delivery in flight ends before this claim's result is seen
            deadline = time.monotonic() + 5
            while pump._running and time.monotonic() < deadline:
                time.sleep(0.01)
            ended_during_a_claim.set()
        return claimed

    monkeypatch.setattr(pump_module, "attempt", gated_attempt)
    monkeypatch.setattr(store, "claim", claim_while_a_delivery_ends)

    async def scenario() -> None:
        async with running(pump):
            await eventually(lambda: len(started) == 2)  # the buyer at its cap, both deliveries held
            gates[0].set()
            await eventually(ended_during_a_claim.is_set)
            await eventually(lambda: status_counts(engine, buyer) == {"delivered": 4}, timeout=5)

    asyncio.run(scenario())


def test_a_worker_woken_while_full_passes_the_hint_on(engine: Engine, receiver: Receiver) -> None:
    receiver.hang()
    hung, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, hung, seller, n=3)
    hints: list[int] = []
    pump = Pump(engine, replace(FAST, read_timeout_s=20.0, lease_s=60.0), capacity=2, fan_out=lambda: hints.append(1))

    async def scenario() -> None:
        async with running(pump):
            try:
                await eventually(lambda: len(hints) == 1)  # the claim that filled it
                await asyncio.sleep(FAN_OUT_INTERVAL_S * 2)
                pump.wake()  # a hint for an event this worker has no room for
                await eventually(lambda: len(hints) == 2, timeout=2)
            finally:
                receiver.release()

    asyncio.run(scenario())


# ----------------------------------------------------------------------------------------------- supervision


def test_an_observer_that_raises_loses_its_report_not_the_recorder(
    engine: Engine, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)

    def observe(result: DeliveryResult) -> None:
        raise RuntimeError("a bug in the metrics")

    pump = Pump(engine, FAST, capacity=4, observe=observe)

    async def scenario() -> None:
        async with running(pump) as task:
            await asyncio.wait_for(pump.idle(), 10)
            await asyncio.to_thread(fills, engine, buyer, seller)  # a second batch after the failed reports
            pump.wake()
            await asyncio.wait_for(pump.idle(), 10)
            assert not task.done()

    with caplog.at_level(logging.ERROR, logger="exchange.webhooks"):
        asyncio.run(scenario())

    assert [e.status for e in events_of(engine, buyer)] == ["delivered", "delivered"]
    assert len(receiver.received) == 2
    assert "webhook result observer failed" in caplog.text


class Fatal(BaseException):
    """Not an ``Exception``: escapes the per-report isolation and kills the recorder, as a bug in it would."""


def test_a_dead_recorder_stops_the_pump_loudly(
    engine: Engine, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)

    def observe(result: DeliveryResult) -> None:
        if result.outcome is Outcome.DELIVERED:  # reported by the recorder
            raise Fatal

    crashes: list[BaseException] = []
    crashed = threading.Event()

    def on_crash(error: BaseException) -> None:
        crashes.append(error)
        crashed.set()

    worker = PumpThread(Pump(engine, FAST, capacity=4, observe=observe), on_crash=on_crash)
    with caplog.at_level(logging.ERROR, logger="exchange.webhooks"):
        worker.start()
        assert crashed.wait(10), "the pump went on without its recorder"

    (error,) = crashes
    assert isinstance(error, PumpDiedError)
    assert isinstance(error.__cause__, Fatal)
    assert "the webhook pump's recorder died" in caplog.text
    worker.stop()  # a dead pump's thread: returns at once
    worker.wake()


def test_a_pump_thread_runs_its_pump_on_uvloop(engine: Engine) -> None:
    worker = PumpThread(Pump(engine, FAST, capacity=4))
    running = threading.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    def note() -> None:
        loops.append(asyncio.get_running_loop())
        running.set()

    worker._loop.call_soon(note)  # the first callback of the pump's loop once its thread runs it
    worker.start()
    try:
        assert running.wait(10)
    finally:
        worker.stop()

    assert [type(loop) for loop in loops] == [uvloop.Loop]  # the api's loop too: callbacks and sockets in C


def test_stopping_a_pump_thread_records_the_deliveries_in_flight(engine: Engine, receiver: Receiver) -> None:
    receiver.delay_s = 1.0
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller, n=2)
    pump = Pump(engine, FAST, capacity=4)
    worker = PumpThread(pump)
    worker.start()
    deadline = time.monotonic() + 10
    while status_counts(engine, buyer) != {"claimed": 2}:
        assert time.monotonic() < deadline
        time.sleep(0.02)

    worker.stop()  # waits as long as the drain may take, not the fixed connect + read + 5 s of before

    assert status_counts(engine, buyer) == {"delivered": 2}
    config = FAST
    assert pump.drain_s == 2 * config.connect_timeout_s + config.read_timeout_s + config.lease_s / 2


# ------------------------------------------------------------------------------------------------ recording


def _counting_records(monkeypatch: pytest.MonkeyPatch) -> list[set[uuid.UUID]]:
    """The event ids of every record statement the pumps send from now on (the real statement still runs)."""
    calls: list[set[uuid.UUID]] = []
    real = store.record

    def record(engine: Engine, attempts: Sequence[store.Attempt], *, disable_after: int) -> list[Outcome]:
        calls.append({a.claim.event_id for a in attempts})
        return real(engine, attempts, disable_after=disable_after)

    monkeypatch.setattr(store, "record", record)
    return calls


def test_attempts_ending_within_the_record_linger_are_recorded_in_one_statement(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _counting_records(monkeypatch)
    with Receiver() as now, Receiver() as later, Receiver() as last:
        later.delay_s, last.delay_s = 0.15, 0.3  # three deliveries ending 150 ms apart, each a record of its own
        seller, _ = broker_with_endpoint(engine, None)
        buyers = [broker_with_endpoint(engine, r.url)[0] for r in (now, later, last)]
        for buyer in buyers:
            fills(engine, buyer, seller)
        ours = {event.id for buyer in buyers for event in events_of(engine, buyer)}
        pump = Pump(engine, replace(FAST, record_linger_s=1.0), capacity=8)

        async def scenario() -> None:
            async with running(pump):
                await eventually(lambda: all(status_counts(engine, b) == {"delivered": 1} for b in buyers))

        asyncio.run(scenario())

    assert len(ours) == 3
    assert [ids & ours for ids in records if ids & ours] == [ours]


def test_a_stopping_pump_records_at_once_instead_of_lingering(engine: Engine, receiver: Receiver) -> None:
    buyer, _ = broker_with_endpoint(engine, receiver.url)
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, buyer, seller)
    # The linger outlasts the drain's wait for records (half a lease): a stop that waited it out would leave the
    # delivered event unrecorded.
    pump = Pump(engine, replace(FAST, record_linger_s=30.0), capacity=4)

    async def scenario() -> None:
        async with running(pump):
            await eventually(lambda: len(receiver.received) == 1)

    asyncio.run(scenario())

    assert status_counts(engine, buyer) == {"delivered": 1}


def test_recording_locks_broker_rows_in_id_order_like_the_matcher(engine: Engine) -> None:
    brokers = sorted(broker_with_endpoint(engine, "http://127.0.0.1:9/hook")[0] for _ in range(12))
    seller, _ = broker_with_endpoint(engine, None)
    # Fills update broker rows: in descending id order, the table's physical order (in which a plan that scans
    # brokers visits them) is the reverse of the lock order the matcher uses.
    for broker in reversed(brokers):
        fills(engine, broker, seller)
    claims = store.claim(engine, limit=1000, lease_s=30, per_broker=1000).claims
    gone = Verdict(Kind.GONE, disable_reason="receiver answered 410 Gone")
    batch = [store.Attempt(c, gone, datetime.now(UTC), 3, 410, "HTTP 410", "") for c in claims]
    *first, last = brokers

    def locked(broker: uuid.UUID) -> bool:
        with engine.connect() as probe:
            try:
                probe.execute(text("SELECT 1 FROM brokers WHERE id = :id FOR NO KEY UPDATE NOWAIT"), {"id": broker})
            except OperationalError:  # lock_not_available
                return True
            finally:
                probe.rollback()
            return False

    with engine.connect() as holder:  # the matcher, say, holds the broker with the highest id
        holder.execute(text("SELECT 1 FROM brokers WHERE id = :id FOR NO KEY UPDATE"), {"id": last})
        holder_pid = holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
        recording = threading.Thread(target=store.record, args=(engine, batch), kwargs={"disable_after": 5})
        recording.start()
        deadline = time.monotonic() + 10
        with engine.connect() as conn:
            while not conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                {"pid": holder_pid},
            ).scalar_one():
                conn.rollback()
                assert time.monotonic() < deadline, "the record statement never waited for the held row"
                time.sleep(0.02)
        # Sorted like the matcher's: every lower id is already locked when it waits for the highest one.
        locked_while_waiting = [b for b in first if locked(b)]
        holder.rollback()
    recording.join(10)

    assert locked_while_waiting == first
    assert not any(broker_row(engine, b).webhook_enabled for b in brokers)


def test_nul_characters_in_an_answer_or_an_error_are_stored_replaced(engine: Engine) -> None:
    broker, _ = broker_with_endpoint(engine, "http://127.0.0.1:9/hook")
    seller, _ = broker_with_endpoint(engine, None)
    fills(engine, broker, seller)
    (claim,) = store.claim(engine, limit=1000, lease_s=30, per_broker=1000).claims
    retry = Verdict(Kind.RETRY, retry_in_s=60.0)

    store.record(
        engine, [store.Attempt(claim, retry, datetime.now(UTC), 3, 500, "HTTP 500\x00", "a\x00b")], disable_after=5
    )

    (logged,) = attempts_of(engine, claim.event_id)
    assert (logged.error, logged.response_excerpt) == ("HTTP 500\ufffd", "a\ufffdb")
    assert events_of(engine, broker)[0].last_error == "HTTP 500\ufffd"


def test_a_receiver_answering_a_status_beyond_599_holds_back_no_other_brokers_record(engine: Engine) -> None:
    with Receiver() as odd, Receiver() as fine:
        odd.always_status = 999  # three digits, which llhttp reads as a status, but no HTTP status
        seller, _ = broker_with_endpoint(engine, None)
        (a, _), (b, _) = broker_with_endpoint(engine, odd.url), broker_with_endpoint(engine, fine.url)
        fills(engine, a, seller)
        fills(engine, b, seller)
        (odd_event,) = events_of(engine, a)
        pump = Pump(engine, replace(FAST, record_linger_s=0.3), capacity=8)  # both attempts in one record

        async def scenario() -> None:
            async with running(pump):
                await eventually(lambda: status_counts(engine, b) == {"delivered": 1})
                await eventually(lambda: len(attempts_of(engine, odd_event.id)) > 0)

        asyncio.run(scenario())

    first = attempts_of(engine, odd_event.id)[0]
    assert first.status_code is None
    assert "999 is not an HTTP status" in first.error


def test_a_record_the_database_refuses_is_retried_one_attempt_at_a_time(engine: Engine) -> None:
    (a, _), (b, _) = broker_with_endpoint(engine, "http://127.0.0.1:9/a"), broker_with_endpoint(engine, None)
    fills(engine, a, b)
    with engine.begin() as conn:  # b's event deliverable too, without a receiver: only the record is tested here
        conn.execute(text("UPDATE brokers SET webhook_url = 'http://127.0.0.1:9/b' WHERE id = :id"), {"id": b})
    claims = {c.broker_id: c for c in store.claim(engine, limit=1000, lease_s=30, per_broker=1000).claims}
    now = datetime.now(UTC)
    refused = store.Attempt(claims[a], Verdict(Kind.RETRY, retry_in_s=60.0), now, 3, 500, "HTTP 500", "")
    good = store.Attempt(claims[b], Verdict(Kind.DELIVERED), now, 3, 200, None, "ok")
    with engine.begin() as conn:  # a row the attempts' table refuses whatever its texts: no such event (23503)
        conn.execute(text("DELETE FROM webhook_events WHERE id = :id"), {"id": claims[a].event_id})
    pump = Pump(engine, FAST, capacity=4)

    recorded = asyncio.run(pump._record([refused, good]))

    assert recorded == [(good, Outcome.DELIVERED)]
    assert status_counts(engine, b) == {"delivered": 1}
    assert attempts_of(engine, claims[a].event_id) == []
